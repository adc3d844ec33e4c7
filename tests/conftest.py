"""Shared test fixtures. Importing nl_plugin here applies the BasicSR compatibility fixes once.

Devices: a test that takes the ``device`` fixture runs once per available device: on the CPU, and on
CUDA where a GPU is visible, that parameter marked ``cuda`` (``pytest -m cuda`` runs only those: the
same comparisons of fast paths with their CPU-built references, on the GPU). Without a GPU no cuda
parameter is generated. Tests marked ``slow`` run only with ``--run-slow``.
"""
import os
import sys

import pytest
import torch

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
