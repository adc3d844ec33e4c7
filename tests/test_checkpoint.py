"""Atomic writes, non-finite steps and checkpoints, and safe loading of user-supplied weights (no CLI)."""
import os

import pytest
import torch
from basicsr.models import build_model

from conftest import make_opt, model_batch
from nl_plugin.fileio import WriteError, atomic_torch_save, atomic_write


def test_failed_write_keeps_the_previous_file_and_names_it(tmp_path):
    path = tmp_path / 'net_g_5.pth'
    atomic_torch_save({'w': torch.ones(3)}, path)

    def half_then_fail(f):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')

    with pytest.raises(WriteError, match=f"cannot write '{path}': OSError: .*No space left on device"):
        atomic_write(path, half_then_fail)
    assert torch.equal(torch.load(path, weights_only=True)['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['net_g_5.pth']  # no temporary file left
    with pytest.raises(WriteError, match='nowhere'):
        atomic_torch_save({}, tmp_path / 'nowhere' / 'x.pth')


def test_nan_policy_skip_leaves_weights_optimizer_and_ema_untouched(tmp_path):
    model = build_model(make_opt(tmp_path, train={'nan_policy': 'skip', 'ema_decay': 0.9}))
    model.feed_data(model_batch())
    model.optimize_parameters(1)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    ema = {k: v.clone() for k, v in model.net_g_ema.state_dict().items()}
    adam = {k: v.clone() for k, v in model.optimizer_g.state[next(model.net_g.parameters())].items()}
    bad = model_batch()
    bad['lq'][0, 0, 0, 0] = float('nan')
    model.feed_data(bad)
    model.optimize_parameters(2)
    assert all(torch.equal(v, before[k]) for k, v in model.net_g.state_dict().items())
    assert all(torch.equal(v, ema[k]) for k, v in model.net_g_ema.state_dict().items())
    state = model.optimizer_g.state[next(model.net_g.parameters())]
    assert all(torch.equal(v, adam[k]) for k, v in state.items())
    model.feed_data(model_batch())
    model.optimize_parameters(3)  # training goes on with the next finite batch
    assert not all(torch.equal(v, before[k]) for k, v in model.net_g.state_dict().items())


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    model = build_model(make_opt(tmp_path))
    os.makedirs(model.opt['path']['models'])
    os.makedirs(model.opt['path']['training_states'])
    model.save(0, 3)
    with torch.no_grad():
        next(model.net_g.parameters())[0].fill_(float('inf'))
    with pytest.raises(FloatingPointError, match=r"iter 4: not writing '.*net_g_4\.pth': 1 tensor\(s\) hold NaN/Inf"):
        model.save(0, 4)
    assert sorted(os.listdir(model.opt['path']['models'])) == ['net_g_3.pth']


class _RunsCode:
    """Unpickling this calls os.makedirs(target): the kind of payload weights_only refuses."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_crafted_pretrained_file_is_refused_even_when_torch_is_told_otherwise(tmp_path, monkeypatch):
    marker = tmp_path / 'code_ran'
    crafted = tmp_path / 'crafted.pth'
    torch.save({'params': _RunsCode(str(marker))}, crafted)
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    with pytest.warns(UserWarning):  # this is what BasicSR's plain torch.load did with the variable set
        torch.load(crafted)
    assert marker.is_dir()
    os.rmdir(marker)
    opt = make_opt(tmp_path, is_train=False, val={'metrics': {}})
    opt['path']['pretrain_network_g'] = str(crafted)
    with pytest.raises(ValueError, match=r"path:pretrain_network_g: '.*crafted\.pth' is not a plain weights file .*"
                                         r"makedirs"):
        build_model(opt)
    assert not marker.exists()


def test_full_disk_names_the_cause_for_a_large_checkpoint(tmp_path):
    """torch's zip writer hides the OSError of a failing write behind 'unexpected pos'; it is reported as is."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(disk)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip('cannot mount a tmpfs here')
    try:
        with pytest.raises(WriteError, match=r"cannot write '.*big\.pth': OSError: \[Errno 28\] No space left"):
            atomic_torch_save({'w': torch.zeros(100_000)}, disk / 'big.pth')
        assert os.listdir(disk) == []
    finally:
        subprocess.run(['umount', str(disk)], capture_output=True, check=False)
