"""End to end through the real ``basicsr`` command: train, auto-resume, test, torchrun (2 CPU processes).

Data: tiny images written here, read back from a real LMDB made by scripts/create_lmdb.py.
"""
import csv
import glob
import os
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from conftest import ROOT, basicsr_cmd

ARCH = {'type': 'DnCNN', 'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 8, 'depth': 3}


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    rng = np.random.default_rng(0)
    for split, n, size in (('train', 6, 40), ('val', 3, 24)):
        os.makedirs(root / split)
        for i in range(n):
            base = cv2.GaussianBlur(rng.integers(0, 256, (size, size + 4 * i), dtype=np.uint8), (5, 5), 0)
            cv2.imwrite(str(root / split / f'img{i}.png'), base)
    for split in ('train', 'val'):
        subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'create_lmdb.py'), str(root / split),
                        str(root / f'{split}.lmdb')], check=True, capture_output=True)
    return root


def write_opt(workdir, name, total_iter=4, **extra):
    opt = {
        'name': name, 'model_type': 'RestorationModel', 'num_gpu': 'auto', 'manual_seed': 10,
        'datasets': {
            'train': {'name': 'tiny', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(workdir / 'train.lmdb'),
                      'io_backend': {'type': 'lmdb'}, 'sigma': 25, 'gt_size': 24, 'use_hflip': True,
                      'use_rot': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 2},
            'val': {'name': 'tinyval', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(workdir / 'val.lmdb'),
                    'io_backend': {'type': 'lmdb'}, 'sigma': 25},
        },
        'network_g': dict(ARCH),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [100],
                  'gamma': 0.5}, 'total_iter': total_iter, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'SquaredErrorLoss'}, 'grad_clip': {'mode': 'per_tensor', 'max_norm': 2.5}},
        'val': {'val_freq': 2, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False},
        'dist_params': {'backend': 'gloo', 'port': 29500},
    }
    for key, value in extra.items():
        opt[key] = value
    path = workdir / f'{name}.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


def run(args, cwd, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300, **kw)


def read_log(exp_dir):
    return '\n'.join(open(p).read() for p in sorted(glob.glob(os.path.join(exp_dir, 'train_*.log'))))


def test_train_then_auto_resume(workdir):
    opt = write_opt(workdir, 'resume')
    r = run([basicsr_cmd(), 'train', '-opt', str(opt)], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    exp = workdir / 'experiments' / 'resume'
    assert (exp / 'models' / 'net_g_4.pth').is_file() and (exp / 'training_states' / '4.state').is_file()
    log = read_log(exp)
    assert 'Validation tinyval' in log and '# psnr:' in log

    # continue to iteration 6 from the saved state, on the CPU
    r = run([basicsr_cmd(), 'train', '-opt', str(opt), '--auto_resume', '--force_yml', 'train:total_iter=6'], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(exp)
    assert 'Resuming training from epoch' in log and 'iter: 4.' in log
    assert (exp / 'models' / 'net_g_6.pth').is_file()
    assert not glob.glob(str(workdir / 'experiments' / 'resume_archived_*'))


def test_test_command_writes_per_image_csv(workdir):
    opt = write_opt(workdir, 'fortest', total_iter=2)
    assert run([basicsr_cmd(), 'train', '-opt', str(opt)], workdir).returncode == 0
    weights = workdir / 'experiments' / 'fortest' / 'models' / 'net_g_latest.pth'
    test_opt = {
        'name': 'tested', 'model_type': 'RestorationModel', 'num_gpu': 'auto', 'manual_seed': 0,
        'datasets': {'test_1': {'name': 'tinyval', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(workdir / 'val'),
                                'sigma': 25}},
        'network_g': dict(ARCH),
        'path': {'pretrain_network_g': str(weights), 'strict_load_g': True},
        'val': {'save_img': True, 'suffix': 'out', 'self_ensemble': True,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
                            'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}}},
    }
    path = workdir / 'test.yml'
    path.write_text(yaml.safe_dump(test_opt))
    r = run([sys.executable, '-m', 'nl_plugin.test', '-opt', str(path)], workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(workdir / 'results' / 'tested' / 'tinyval_metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['image'] for r in rows] == ['img0', 'img1', 'img2', 'MEAN']
    for row in rows:
        assert 5 < float(row['psnr']) < 60 and 0 < float(row['ssim']) <= 1 and 15 < float(row['psnr_input']) < 25
    assert (workdir / 'results' / 'tested' / 'visualization' / 'tinyval' / 'img1_out.png').is_file()


def test_bad_option_fails_before_touching_previous_run(workdir):
    opt = write_opt(workdir, 'keep', total_iter=2)
    assert run([basicsr_cmd(), 'train', '-opt', str(opt)], workdir).returncode == 0
    bad = write_opt(workdir, 'keep', total_iter=2, network_g=dict(ARCH, num_feats=4))
    r = run([basicsr_cmd(), 'train', '-opt', str(bad)], workdir)
    assert r.returncode != 0 and "unknown option key(s) ['num_feats']" in r.stderr
    assert (workdir / 'experiments' / 'keep' / 'models' / 'net_g_2.pth').is_file()
    assert not glob.glob(str(workdir / 'experiments' / 'keep_archived_*'))
    missing = write_opt(workdir, 'keep', total_iter=2)
    text = missing.read_text().replace(str(workdir / 'val.lmdb'), str(workdir / 'nowhere'))
    missing.write_text(text)
    r = run([basicsr_cmd(), 'train', '-opt', str(missing)], workdir)
    assert r.returncode != 0 and 'datasets:val' in r.stderr and 'nowhere' in r.stderr


def test_torchrun_two_cpu_processes(workdir):
    opt = write_opt(workdir, 'ddp', total_iter=4, dist_backend='gloo')
    cmd = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
           f'--master_port={_free_port()}', basicsr_cmd(), 'train', '-opt', str(opt), '--launcher', 'pytorch']
    r = run(cmd, workdir)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    exp = workdir / 'experiments' / 'ddp'
    log = read_log(exp)
    assert 'World size (gpu number): 2' in log and 'Final weights of all 2 ranks are equal' in log
    assert log.count('Validation tinyval') >= 2  # at iter 2 and 4 (and the final one)
    assert (exp / 'models' / 'net_g_latest.pth').is_file()
