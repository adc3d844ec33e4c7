"""``dist_backend`` (top level of an option file) chooses the process group's backend of ``--launcher pytorch``."""
import pytest
import torch

from nl_plugin import compat


def test_dist_backend_is_read_from_the_option_file_and_force_yml(tmp_path):
    opt = tmp_path / 'o.yml'
    opt.write_text('name: x\ndist_backend: gloo\n')
    assert compat.dist_backend_option(['-opt', str(opt), '--launcher', 'pytorch']) == 'gloo'
    assert compat.dist_backend_option(['-opt', str(opt), '--force_yml', 'train:total_iter=2']) == 'gloo'
    plain = tmp_path / 'plain.yml'
    plain.write_text('name: x\n')
    assert compat.dist_backend_option(['-opt', str(plain)]) is None
    assert compat.dist_backend_option(['-opt', str(plain), '--force_yml', 'dist_backend=gloo']) == 'gloo'
    bad = tmp_path / 'bad.yml'
    bad.write_text('name: x\ndist_backend: glo\n')
    with pytest.raises(ValueError, match=r"bad.yml: dist_backend must be one of \('nccl', 'gloo'\), got 'glo' "
                                         r"\(did you mean 'gloo'\?\)"):
        compat.dist_backend_option(['-opt', str(bad)])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="dist_backend 'nccl' needs a GPU"):
            compat.dist_backend_option(['-opt', str(plain), '--force_yml', 'dist_backend=nccl'])
