"""Shared test fixtures. Importing nl_plugin here applies the BasicSR compatibility fixes once.

Devices: a test that takes the ``device`` fixture runs once per available device: on the CPU, and on
CUDA where a GPU is visible, that parameter marked ``cuda`` (``pytest -m cuda`` runs only those: the
same comparisons of fast paths with their CPU-built references, on the GPU). Without a GPU no cuda
parameter is generated. Tests marked ``slow`` run only with ``--run-slow``.
"""
import glob
import os
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

import nl_plugin  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

#: devices the device-parametrised tests run on
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def pytest_addoption(parser):
    parser.addoption('--run-slow', action='store_true', default=False, help='also run the tests marked slow')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--run-slow'):
        return
    skip = pytest.mark.skip(reason='slow: run with --run-slow')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[pytest.param(d, marks=pytest.mark.cuda) if d == 'cuda' else d for d in DEVICES])
def device(request):
    """Each available device in turn (cuda parameters carry the ``cuda`` marker). On CUDA, TF32 is off
    during the test: the comparisons with the references are at fp32 (or float64) precision."""
    if request.param != 'cuda':
        yield torch.device(request.param)
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device('cuda')
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def basicsr_cmd():
    """The installed ``basicsr`` console script of the running interpreter's environment."""
    return os.path.join(BIN, 'basicsr')


@pytest.fixture
def one_thread():
    """Small tensors: one thread avoids thread hand-off costs (large when the machine is busy)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def free_port():
    """A TCP port free on this machine now (torchrun's master port, a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run(args, cwd, **kw):
    """A command (the ``basicsr`` CLI, torchrun, a script) with one thread and unbuffered output, captured."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300, **kw)


def read_log(exp_dir):
    """The text of every ``train_*.log`` of an experiment folder, in name order."""
    return '\n'.join(open(p).read() for p in sorted(glob.glob(os.path.join(exp_dir, 'train_*.log'))))


# --- The ``basicsr`` command on tiny data: a real LMDB and an option file of a tiny DnCNN. ---

CLI_ARCH = {'type': 'DnCNN', 'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 8, 'depth': 3}


def write_tiny_images(root, splits, seed, widen, name='img'):
    """Blurred random grey images ``root/<split>/<name><i>.png`` for ``splits`` = ((split, count, size), ...):
    image i is ``size`` x ``size + widen * i`` (sizes differ, as in real data sets)."""
    rng = np.random.default_rng(seed)
    for split, n, size in splits:
        os.makedirs(root / split)
        for i in range(n):
            img = cv2.GaussianBlur(rng.integers(0, 256, (size, size + widen * i), dtype=np.uint8), (5, 5), 0)
            cv2.imwrite(str(root / split / f'{name}{i}.png'), img)


@pytest.fixture(scope='module')
def cli_workdir(tmp_path_factory):
    """A folder with tiny train/val images and their LMDBs made by scripts/create_lmdb.py (one per test module)."""
    root = tmp_path_factory.mktemp('cli')
    write_tiny_images(root, (('train', 6, 40), ('val', 3, 24)), seed=0, widen=4)
    for split in ('train', 'val'):
        subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'create_lmdb.py'), str(root / split),
                        str(root / f'{split}.lmdb')], check=True, capture_output=True)
    return root


def write_cli_opt(workdir, name, total_iter=4, **extra):
    """An option file training ``CLI_ARCH`` on ``cli_workdir``'s data; ``extra`` replaces top-level sections."""
    opt = {
        'name': name, 'model_type': 'RestorationModel', 'num_gpu': 'auto', 'manual_seed': 10,
        'datasets': {
            'train': {'name': 'tiny', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(workdir / 'train.lmdb'),
                      'io_backend': {'type': 'lmdb'}, 'sigma': 25, 'gt_size': 24, 'use_hflip': True,
                      'use_rot': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 2},
            'val': {'name': 'tinyval', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(workdir / 'val.lmdb'),
                    'io_backend': {'type': 'lmdb'}, 'sigma': 25},
        },
        'network_g': dict(CLI_ARCH),
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


# --- RestorationModel built from an option dict (no CLI) around a tiny per-pixel network. ---

class _TestPointNet(nn.Module):
    """Tiny per-pixel network, registered for the tests only."""

    def __init__(self, num_in_ch=1, num_out_ch=1, num_feat=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(num_in_ch, num_feat, 1), nn.ReLU(), nn.Conv2d(num_feat, num_out_ch, 1))

    def forward(self, x):
        return self.body(x)


def _register_test_net():
    from basicsr.utils.registry import ARCH_REGISTRY  # basicsr after nl_plugin (its compatibility fixes first)
    if '_TestPointNet' not in ARCH_REGISTRY:
        ARCH_REGISTRY.register(_TestPointNet)


_register_test_net()


def make_opt(tmp_path, train=None, val=None, **top):
    """Options of a RestorationModel around ``_TestPointNet``; ``train``/``val`` update those sections."""
    opt = {
        'name': 'unit', 'model_type': 'RestorationModel', 'is_train': True, 'dist': False, 'num_gpu': 0,
        'rank': 0, 'world_size': 1, 'scale': 1,
        'network_g': {'type': '_TestPointNet', 'num_in_ch': 1, 'num_out_ch': 1},
        'path': {'models': str(tmp_path / 'models'), 'training_states': str(tmp_path / 'states')},
        'train': {'total_iter': 10, 'optim_g': {'type': 'Adam', 'lr': 1e-3},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [5], 'gamma': 0.5},
                  'pixel_opt': {'type': 'SquaredErrorLoss'}},
    }
    if train:
        opt['train'].update(train)
    if val is not None:
        opt['val'] = val
    opt.update(top)
    return opt


def model_batch(c=1):
    """A batch for ``make_opt``'s model: 2 random 8x8 images, target half the input."""
    x = torch.rand(2, c, 8, 8)
    return {'lq': x, 'gt': x * 0.5, 'lq_path': ['a.png', 'b.png']}
