"""NonLocalInjection through the real ``basicsr`` command: train from a trained base, test on a larger image.

Tiny EDSR x2 + N3Block and RRDBNet x4 + window-scope WindowedNonLocalBlock on small RGB images degraded
on the fly; the training runs log to TensorBoard (validation images) and their logs feed plot_curves.
"""
import csv
import glob
import importlib.util
import os
import subprocess

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

from conftest import basicsr_cmd
from nl_plugin.archs.nonlocal_injection_arch import NonLocalInjection

NETS = {
    'edsr_n3': {'scale': 2, 'gt_size': 16, 'base': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8,
                                                   'num_block': 2, 'upscale': 2},
                'blocks': [{'after': 'body.0', 'type': 'N3Block', 'k': 2, 'embed_feat': 8, 'patch_size': 4,
                            'stride': 2, 'search_size': 5}]},
    'rrdb_window': {'scale': 4, 'gt_size': 32, 'base': {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3,
                                                       'scale': 4, 'num_feat': 8, 'num_block': 2, 'num_grow_ch': 4},
                    'blocks': [{'after': 'body.1', 'type': 'WindowedNonLocalBlock', 'nl_scope': 'window',
                                'window_size': 5, 'num_embed': 4}]},
}
TEST_SIZE = (48, 56)     # HR test image; larger than the training crops (16 and 32)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('inject')
    rng = np.random.default_rng(0)
    for split, n, size in (('train', 3, (40, 40)), ('val', 1, (32, 32)), ('test', 1, TEST_SIZE)):
        os.makedirs(root / split)
        for i in range(n):
            img = cv2.GaussianBlur(rng.integers(0, 256, size + (3, ), dtype=np.uint8), (5, 5), 0)
            cv2.imwrite(str(root / split / f'img{i}.png'), img)
    return root


def _dataset(folder, **kw):
    return dict({'name': os.path.basename(folder), 'type': 'BicubicDegradationDataset', 'dataroot_gt': folder,
                 'color': 'rgb', 'upsample': False}, **kw)


def _start(args, cwd):
    """Start a ``basicsr`` run; the two networks' runs go side by side (two cores)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out + err)[-3000:]


def _train(workdir, name):
    """Start training the wrapped network from a saved (stand-in for trained) base: (base, experiment, process)."""
    spec = NETS[name]
    torch.manual_seed(1)
    opt = dict(spec['base'])
    base = ARCH_REGISTRY.get(opt.pop('type'))(**opt)
    torch.save({'params': base.state_dict()}, workdir / f'{name}_base.pth')
    net_opt = {'type': 'NonLocalInjection', 'base': spec['base'], 'blocks': spec['blocks'],
               'base_pretrained': str(workdir / f'{name}_base.pth')}
    opt = {
        'name': name, 'model_type': 'RestorationModel', 'scale': spec['scale'], 'num_gpu': 'auto', 'manual_seed': 0,
        'datasets': {'train': _dataset(str(workdir / 'train'), gt_size=spec['gt_size'], num_worker_per_gpu=0,
                                       batch_size_per_gpu=2, dataset_enlarge_ratio=4),
                     'val': _dataset(str(workdir / 'val'))},
        'network_g': net_opt,
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 2e-3}, 'total_iter': 4, 'warmup_iter': -1,
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                  'pixel_opt': {'type': 'L1Loss'}},
        'val': {'val_freq': 2, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 4, 'use_tb_logger': True},
    }
    path = workdir / f'{name}.yml'
    path.write_text(yaml.safe_dump(opt))
    return base, workdir / 'experiments' / name, _start([basicsr_cmd(), 'train', '-opt', str(path)], workdir)


@pytest.fixture(scope='module')
def trained(workdir):
    runs = {name: _train(workdir, name) for name in NETS}
    for _, _, proc in runs.values():
        _finish(proc)
    return {name: run[:2] for name, run in runs.items()}


@pytest.fixture(scope='module')
def tested(trained, workdir):
    procs = [_start([basicsr_cmd(), 'test', '-opt', _test_opt(workdir, name, trained[name][1])], workdir)
             for name in NETS]
    for proc in procs:
        _finish(proc)


@pytest.mark.parametrize('name', sorted(NETS))
def test_training_changes_the_output_of_the_base(trained, workdir, name):
    base, exp = trained[name]
    spec = NETS[name]
    net = NonLocalInjection(spec['base'], spec['blocks'])
    start = NonLocalInjection(spec['base'], spec['blocks'], base_pretrained=str(workdir / f'{name}_base.pth'))
    net.load_state_dict(torch.load(exp / 'models' / 'net_g_4.pth', weights_only=True)['params'], strict=True)
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert (start(x) - base(x)).abs().max() <= 1e-6    # the run started from the base's output
        assert (net(x) - base(x)).abs().max() > 1e-3
    changed = [(a - b).abs().max() > 0 for a, b in zip(net.blocks.parameters(), start.blocks.parameters())]
    assert sum(changed) >= len(changed) // 2     # the inserted blocks learned, not only the base


def _test_opt(workdir, name, exp):
    spec = NETS[name]
    opt = {
        'name': f'{name}_test', 'model_type': 'RestorationModel', 'scale': spec['scale'], 'num_gpu': 'auto',
        'datasets': {'test_1': _dataset(str(workdir / 'test'))},
        'network_g': {'type': 'NonLocalInjection', 'base': spec['base'], 'blocks': spec['blocks']},
        'path': {'pretrain_network_g': str(exp / 'models' / 'net_g_latest.pth'), 'strict_load_g': True},
        'val': {'save_img': True, 'suffix': 'out',
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
    }
    path = workdir / f'{name}_test.yml'
    path.write_text(yaml.safe_dump(opt))
    return str(path)


@pytest.mark.parametrize('name', sorted(NETS))
def test_basicsr_test_on_an_image_larger_than_the_crops(tested, workdir, name):
    out = cv2.imread(str(workdir / 'results' / f'{name}_test' / 'visualization' / 'test' / 'img0_out.png'))
    assert out.shape == TEST_SIZE + (3, )
    with open(workdir / 'results' / f'{name}_test' / 'test_metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['image'] for r in rows] == ['img0', 'MEAN'] and 0 < float(rows[0]['psnr']) < 60


def test_validation_images_in_tensorboard(trained, workdir):
    ea_mod = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    for name, spec in NETS.items():
        events = glob.glob(str(workdir / 'tb_logger' / name / 'events.out.tfevents.*'))
        assert events
        acc = ea_mod.EventAccumulator(os.path.dirname(events[0]), size_guidance={'images': 0, 'scalars': 0})
        acc.Reload()
        assert 'metrics/val/psnr' in acc.Tags()['scalars'] and 'losses/l_pix' in acc.Tags()['scalars']
        images = acc.Images('val_images/val/img0')
        assert {2, 4} <= {im.step for im in images}
        # 32x32 HR validation image: degraded (enlarged) | restored | ground truth, 2-pixel gaps
        assert (images[-1].height, images[-1].width) == (32, 3 * 32 + 2 * 2)
        strip = cv2.imdecode(np.frombuffer(images[-1].encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
        gt = cv2.imread(str(workdir / 'val' / 'img0.png'))
        assert np.abs(strip[:, -32:].astype(int) - gt).max() <= 1     # the last panel is the ground truth


def test_plot_curves_of_the_training_runs(trained, tmp_path):
    pytest.importorskip('matplotlib')
    from nl_plugin.analysis.commands import plot_curves
    exp = trained['rrdb_window'][1]
    curves, written = plot_curves([str(exp), '--out', str(tmp_path / 'log')])
    assert sorted(written) == ['loss.png', 'psnr.png']
    assert cv2.imread(str(tmp_path / 'log' / 'psnr.png')).shape == (400, 640, 3)
    assert [it for it, _ in curves['loss']['l_pix']] == [1, 2, 3, 4]
    assert [it for it, _ in curves['metric']['val/psnr']] == [2, 4]
    if importlib.util.find_spec('tensorboard') is not None:    # the log and the events agree
        tb_curves, _ = plot_curves(['--tb', str(exp.parent.parent / 'tb_logger' / 'rrdb_window'),
                                    '--out', str(tmp_path / 'tb')])
        tb_psnr = dict(tb_curves['metric']['val/psnr'])
        for it, value in curves['metric']['val/psnr']:
            assert abs(tb_psnr[it] - value) < 1e-4
        for (it, value), (tb_it, tb_value) in zip(curves['loss']['l_pix'], tb_curves['loss']['l_pix']):
            assert it == tb_it and abs(value - tb_value) <= 1e-4 * abs(tb_value)   # the log prints 5 digits
