"""Shared test fixtures. Importing nl_plugin here applies the BasicSR compatibility fixes once."""
import os
import sys

import pytest
import torch

import nl_plugin  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


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
