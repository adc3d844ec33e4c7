"""Long runs through the real ``basicsr`` command: a kill in the middle of a checkpoint write, torn training
states, resume equal to an uninterrupted run, determinism, EMA with BatchNorm, a full disk, torchrun.

Every run is a few iterations of a tiny DnCNN on tiny images (num_worker_per_gpu: 0, the setting under
which a resumed run is bit-identical to an uninterrupted one).
"""
import glob
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import basicsr_cmd, free_port, read_log, write_tiny_images
from nl_plugin.checkpoint import load_state
from nl_plugin.data.lmdb_writer import create_lmdb
from nl_plugin.weights import read_all

BN_ARCH = {'type': 'DnCNN', 'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 8, 'depth': 3}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('rel')
    write_tiny_images(root, (('train', 6, 32), ('val', 2, 24)), seed=1, widen=2, name='im')
    for split in ('train', 'val'):
        create_lmdb(str(root / split), str(root / f'{split}.lmdb'), progress=False)
    return root


def write_opt(root, name, total_iter=8, arch=BN_ARCH, train=None, **top):
    """6 images x enlarge 2 / batch 2 = 6 iterations an epoch: 8 iterations cross an epoch boundary."""
    opt = {
        'name': name, 'model_type': 'RestorationModel', 'num_gpu': 0, 'manual_seed': 7, 'deterministic': True,
        'datasets': {
            'train': {'name': 'tr', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(root / 'train.lmdb'),
                      'io_backend': {'type': 'lmdb'}, 'sigma': 25, 'gt_size': 16, 'use_hflip': True, 'use_rot': True,
                      'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 2},
            'val': {'name': 'va', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(root / 'val.lmdb'),
                    'io_backend': {'type': 'lmdb'}, 'sigma': 25},
        },
        'network_g': dict(arch),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 2e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [5],
                  'gamma': 0.5}, 'total_iter': total_iter, 'ema_decay': 0.5,
                  'pixel_opt': {'type': 'SquaredErrorLoss'}},
        'val': {'val_freq': 4, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 1, 'use_tb_logger': False},
    }
    opt['train'].update(train or {})
    opt.update(top)
    path = root / f'{name}.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


def run(args, cwd, env=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env or {}))
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def train(root, opt, *extra, env=None):
    return run([basicsr_cmd(), 'train', '-opt', str(opt), *extra], root, env)


def weights(path):
    """``{param_key: state_dict}`` of a checkpoint (its arch/pipeline metadata left out)."""
    return read_all(path)[0]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for group in a:
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f'{group}.{k}'


@pytest.fixture(scope='module')
def straight(data):
    """One uninterrupted 8-iteration run: the reference for resume, determinism and EMA."""
    r = train(data, write_opt(data, 'straight'))
    assert r.returncode == 0, r.stderr[-3000:]
    return weights(data / 'experiments' / 'straight' / 'models' / 'net_g_latest.pth')


def test_same_config_twice_gives_identical_weights(data, straight):
    r = train(data, write_opt(data, 'again'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(straight, weights(data / 'experiments' / 'again' / 'models' / 'net_g_latest.pth'))


def test_kill_during_save_then_auto_resume_matches_uninterrupted_run(data, straight):
    opt = write_opt(data, 'killed')
    exp = data / 'experiments' / 'killed'
    # 2 files per iteration (net_g_<i>.pth, then <i>.state): the 8th write is 4.state
    r = train(data, opt, env={'NL_PLUGIN_FAULT': 'kill_during_save:8'})
    assert r.returncode == -9, r.stderr[-3000:]
    states = exp / 'training_states'
    names = sorted(os.listdir(states))
    assert names[1:] == ['1.state', '2.state', '3.state'] and names[0].startswith('.4.state.'), names
    assert (exp / 'models' / 'net_g_4.pth').is_file()
    # a torn state of a later iteration, as a plain torch.save killed mid-write leaves it
    blob = (states / '3.state').read_bytes()
    (states / '5.state').write_bytes(blob[:len(blob) // 2])

    r = train(data, opt, '--auto_resume')
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(exp)
    assert 'skipped the state of iteration 5' in log and '5.state.corrupt' in log
    assert 'Resuming training from epoch: 0, iter: 3.' in log and 'continues after its first 3 batch(es)' in log
    assert (states / '5.state.corrupt').is_file() and not glob.glob(str(states / '.*'))
    assert_same(straight, weights(exp / 'models' / 'net_g_latest.pth'))


def test_ema_keeps_batchnorm_statistics_of_the_trained_net(data, straight):
    from basicsr.metrics import calculate_psnr

    from nl_plugin.archs.dncnn_arch import DnCNN
    # The EMA of every BN statistic, replayed from the trained net's statistics after each iteration (a
    # checkpoint per iteration): ema_0 = BatchNorm's initial statistics, ema_t = d ema_{t-1} + (1 - d) b_t
    # (compat fix 11, d = ema_decay = 0.5, exact in fp32); integer buffers (batch counts) are copied.
    models = data / 'experiments' / 'straight' / 'models'
    stats = [k for k in straight['params'] if k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert stats
    ema = {k: torch.ones_like(straight['params'][k]) if k.endswith('running_var')
           else torch.zeros_like(straight['params'][k]) for k in stats}
    for t in range(1, 9):
        ckpt = straight if t == 8 else weights(models / f'net_g_{t}.pth')
        for k in stats:
            b = ckpt['params'][k]
            ema[k] = ema[k].clone().mul_(0.5).add_(b, alpha=0.5) if torch.is_floating_point(b) else b.clone()
            assert torch.equal(ckpt['params_ema'][k], ema[k]), f'iteration {t}: {k}'
    assert all(not torch.equal(ema[k], straight['params'][k]) for k in stats if k.endswith('running_mean'))
    psnr = {}
    gen = torch.Generator().manual_seed(0)
    clean = [torch.from_numpy(cv2.imread(str(p), 0)).float()[None, None] / 255
             for p in sorted((data / 'val').iterdir())]
    noisy = [c + torch.randn(c.shape, generator=gen) * 25 / 255 for c in clean]
    for key in ('params', 'params_ema'):
        net = DnCNN(**{k: v for k, v in BN_ARCH.items() if k != 'type'}).eval()
        net.load_state_dict(straight[key])
        with torch.no_grad():
            psnr[key] = np.mean([calculate_psnr(net(n)[0].numpy() * 255, c[0].numpy() * 255, 0, 'CHW')
                                 for n, c in zip(noisy, clean)])
    assert abs(psnr['params'] - psnr['params_ema']) < 0.5, psnr


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    if shutil.which('mount') is None or os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root and mount(8)')
    res = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {res.stderr.decode().strip()}')


def test_full_disk_stops_with_error_naming_the_file(data, tmp_path):
    disk = tmp_path / 'disk'
    # 40 pages: the log, the option file and a few iterations' checkpoints (2 small files each) fit, 200 do not
    _mount_tmpfs(disk, 40 * os.sysconf('SC_PAGE_SIZE'))
    try:
        opt = write_opt(data, 'full', total_iter=200, val=None)
        r = run([basicsr_cmd(), 'train', '-opt', str(opt), '--root_path', str(disk)], data)
        assert r.returncode != 0
        assert 'No space left on device' in r.stderr, r.stderr[-3000:]
        exp = disk / 'experiments' / 'full'
        named = [ln for ln in r.stderr.splitlines() if 'cannot write' in ln]
        assert named and str(exp) in named[-1], r.stderr[-3000:]
        files = glob.glob(str(exp / 'models' / '*.pth')) + glob.glob(str(exp / 'training_states' / '*.state'))
        assert len(files) >= 2 and not glob.glob(str(exp / '*' / '.*.tmp'))
        for f in files:  # every file left is complete
            assert weights(f) if f.endswith('.pth') else load_state(f, 'cpu')
        last = max(int(os.path.basename(f)[:-len('.state')]) for f in files if f.endswith('.state'))
        assert last < 200 and (exp / 'models' / f'net_g_{last}.pth').is_file()
    finally:
        subprocess.run(['umount', str(disk)], capture_output=True)


PLAIN_ARCH = {'type': 'DnCNN', 'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 8, 'depth': 3, 'bn': False}


@pytest.fixture(scope='module')
def paired(data):
    """Noisy/clean pairs on disk, cropped to their full size, no flips: samples that do not depend on RNG."""
    rng = np.random.default_rng(3)
    for sub in ('gt', 'lq'):
        os.makedirs(data / 'paired' / sub)
    for i in range(8):
        gt = cv2.GaussianBlur(rng.integers(0, 256, (16, 16), dtype=np.uint8), (5, 5), 0)
        lq = np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(data / 'paired' / 'gt' / f'p{i}.png'), gt)
        cv2.imwrite(str(data / 'paired' / 'lq' / f'p{i}.png'), lq)
    return data / 'paired'


def paired_opt(data, paired, name, batch, arch=PLAIN_ARCH, ema=0):
    ds = {'name': 'pairs', 'type': 'PairedImageDataset', 'dataroot_gt': str(paired / 'gt'),
          'dataroot_lq': str(paired / 'lq'), 'io_backend': {'type': 'disk'}, 'gt_size': 16, 'use_hflip': False,
          'use_rot': False, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': batch}
    return write_opt(data, name, total_iter=4, arch=dict(arch, num_in_ch=3, num_out_ch=3), scale=1,
                     datasets={'train': ds}, val=None, train={'ema_decay': ema})


def torchrun(data, opt):
    return run([os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                f'--master_port={free_port()}', basicsr_cmd(), 'train', '-opt', str(opt), '--launcher', 'pytorch'],
               data)


def test_two_processes_match_one_with_the_same_global_batch_and_exit_cleanly(data, paired):
    r = train(data, paired_opt(data, paired, 'one', batch=4))
    assert r.returncode == 0, r.stderr[-3000:]
    one = weights(data / 'experiments' / 'one' / 'models' / 'net_g_latest.pth')['params']
    r = torchrun(data, paired_opt(data, paired, 'two', batch=2))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    two = weights(data / 'experiments' / 'two' / 'models' / 'net_g_latest.pth')['params']
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6) for k in one)
    first = weights(data / 'experiments' / 'one' / 'models' / 'net_g_1.pth')['params']
    assert not all(torch.equal(one[k], first[k]) for k in one)  # the comparison is not between untrained nets
    # a finished two-process run exits 0 every time; with BatchNorm and EMA the EMA copy holds rank 0's statistics
    for i in range(2):
        r = torchrun(data, paired_opt(data, paired, f'twobn{i}', batch=2, arch=BN_ARCH, ema=0.5))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        sd = weights(data / 'experiments' / f'twobn{i}' / 'models' / 'net_g_latest.pth')
        means = [k for k in sd['params_ema'] if k.endswith('running_mean')]
        assert means and all(sd['params_ema'][k].abs().sum() > 0 for k in means)

