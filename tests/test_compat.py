"""nl_plugin.compat: one test per numbered BasicSR fix, each asserting the corrected behaviour itself.

The end-to-end effect of several fixes is also covered through the real CLI in test_cli.py; these tests pin
each fix down on its own so that a failure names the fix.
"""
import collections
import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from basicsr.utils.registry import ARCH_REGISTRY
from torch.nn.parallel import DistributedDataParallel

from conftest import free_port
from nl_plugin import compat


@pytest.fixture
def process_group(monkeypatch):
    """A real single-process group made by the fixed ``init_dist``; destroyed (and the start method reset)
    afterwards so that the rest of the session is not affected."""
    for key, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), RANK='0', LOCAL_RANK='0',
                           WORLD_SIZE='1').items():
        monkeypatch.setenv(key, value)
    start_method = mp.get_start_method(allow_none=True)
    compat.init_dist('pytorch')
    yield dist.get_backend()
    dist.destroy_process_group()
    mp.set_start_method(start_method, force=True)


def test_fix1_functional_tensor_alias():
    ft = importlib.import_module('torchvision.transforms.functional_tensor')
    assert callable(ft.rgb_to_grayscale)
    degradations = importlib.import_module('basicsr.data.degradations')  # imports the old module name
    assert callable(degradations.random_add_gaussian_noise_pt)


def test_fix2_init_dist_picks_gloo_without_gpu(process_group):
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options as options
    assert dist_util.init_dist is options.init_dist is compat.init_dist
    assert process_group == ('nccl' if torch.cuda.is_available() else 'gloo')
    assert dist.get_rank() == 0 and dist.get_world_size() == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU branch')
def test_fix3_ddp_on_cpu_without_device_ids(process_group):
    from basicsr.models.base_model import BaseModel
    model = types.SimpleNamespace(device=torch.device('cpu'), opt={'dist': True, 'num_gpu': 0})
    net = BaseModel.model_to_device(model, torch.nn.Linear(3, 2))
    assert isinstance(net, DistributedDataParallel) and net.device_ids is None
    x = torch.randn(4, 3)
    assert torch.equal(net(x), net.module(x))
    plain = BaseModel.model_to_device(types.SimpleNamespace(device=torch.device('cpu'),
                                                            opt={'dist': False, 'num_gpu': 0}), torch.nn.Linear(3, 2))
    assert isinstance(plain, torch.nn.Linear)


def test_fix4_auto_resume_under_root_path_on_cpu_with_counter(tmp_path, monkeypatch):
    import basicsr.train as bsr_train

    from nl_plugin.archs.dncnn_arch import DnCNN
    from nl_plugin.weights import save_weights
    assert bsr_train.load_resume_state is compat.load_resume_state
    monkeypatch.setattr(compat, '_validate_once', lambda opt: None)  # fix 8 has its own test
    run = tmp_path / 'root' / 'experiments' / 'run'
    states, models = run / 'training_states', run / 'models'
    states.mkdir(parents=True)
    models.mkdir()
    sched = torch.optim.lr_scheduler.MultiStepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1),
                                                 milestones=[3, 5])
    for it in (2, 10):  # 10 > 2 numerically, not as text
        torch.save({'iter': it, 'epoch': 0, 'optimizers': [], 'schedulers': [sched.state_dict()],
                    'w': torch.full((2,), float(it))}, str(states / f'{it}.state'))
        save_weights(DnCNN().state_dict(), str(models / f'net_g_{it}.pth'), arch={'type': 'DnCNN'})
    monkeypatch.chdir(tmp_path)  # a working directory without experiments/run
    opt = {'name': 'run', 'auto_resume': True, 'num_gpu': 1, 'network_g': {'type': 'DnCNN'},
           'path': {'training_states': str(states), 'models': str(models)}}
    state = compat.load_resume_state(opt)
    assert state['iter'] == 10 and opt['path']['resume_state'] == str(states / '10.state')
    assert isinstance(state['schedulers'][0]['milestones'], collections.Counter)
    assert state['w'].device.type == ('cuda' if torch.cuda.is_available() else 'cpu')  # num_gpu: 1, no GPU
    assert opt['path']['pretrain_network_g'].endswith('net_g_10.pth')
    opt = {'auto_resume': False, 'num_gpu': 0, 'path': {'resume_state': str(tmp_path / 'none.state')}}
    with pytest.raises(FileNotFoundError, match='none.state'):
        compat.load_resume_state(opt)


def test_fix5_registry_miss_says_did_you_mean(capsys):
    with pytest.raises(KeyError, match=r"no object named 'DnCN' in BasicSR's 'arch' registry\. Did you mean 'DnCNN'"):
        ARCH_REGISTRY.get('DnCN')
    assert capsys.readouterr().out == ''  # no misleading "use name: ..._basicsr!" line
    assert ARCH_REGISTRY.get('DnCNN').__name__ == 'DnCNN'


def test_fix6_unknown_network_key_is_named():
    import basicsr.archs
    assert basicsr.archs.build_network is compat.build_network
    with pytest.raises(KeyError) as err:
        compat.build_network({'type': 'DnCNN', 'num_feats': 8})
    msg = err.value.args[0]
    assert "unknown option key(s) ['num_feats']" in msg and "did you mean 'num_feat'" in msg
    assert 'Valid keys:' in msg and "'num_in_ch'" in msg
    assert compat.build_network({'type': 'DnCNN', 'num_feat': 8, 'depth': 3}).__class__.__name__ == 'DnCNN'


@pytest.mark.skipif(torch.cuda.is_available(), reason='the fallback applies only without a GPU')
def test_fix7_num_gpu_falls_back_to_cpu_with_warning(tmp_path, monkeypatch, capsys):
    path = tmp_path / 'opt.yml'
    path.write_text(yaml.safe_dump({'name': 'x', 'model_type': 'RestorationModel', 'num_gpu': 1, 'manual_seed': 0,
                                    'datasets': {}, 'path': {}}))
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', str(path)])
    opt, _ = compat.parse_options(str(tmp_path), is_train=True)
    assert opt['num_gpu'] == 0
    assert 'num_gpu: 1 was requested but no CUDA device is available' in capsys.readouterr().out
    assert opt['path']['training_states'] == os.path.join(str(tmp_path), 'experiments', 'x', 'training_states')


def test_fix8_bad_option_leaves_existing_experiment_untouched(tmp_path):
    import basicsr.train as bsr_train
    assert bsr_train.make_exp_dirs is compat.make_exp_dirs
    root = tmp_path / 'experiments' / 'run'
    (root / 'models').mkdir(parents=True)
    (root / 'models' / 'net_g_2.pth').write_bytes(b'previous run')
    import cv2
    (tmp_path / 'imgs').mkdir()
    cv2.imwrite(str(tmp_path / 'imgs' / 'a.png'), np.zeros((16, 16), np.uint8))
    train_set = {'name': 't', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(tmp_path / 'imgs'),
                 'io_backend': {'type': 'disk'}, 'sigma': 25, 'gt_size': 8, 'batch_size_per_gpu': 1,
                 'num_worker_per_gpu': 0, 'phase': 'train'}
    opt = {'name': 'run', 'model_type': 'RestorationModel', 'is_train': True, 'datasets': {'train': train_set},
           'network_g': {'type': 'DnCNN', 'num_feats': 8},
           'train': {'total_iter': 2, 'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR',
                     'milestones': [1]}, 'pixel_opt': {'type': 'SquaredErrorLoss'}},
           'logger': {'print_freq': 1, 'save_checkpoint_freq': 1},
           'path': {'experiments_root': str(root), 'models': str(root / 'models'), 'log': str(root)}}
    with pytest.raises(KeyError, match='num_feats'):
        compat.make_exp_dirs(opt)
    assert sorted(os.listdir(tmp_path / 'experiments')) == ['run']  # nothing archived, nothing created
    assert (root / 'models' / 'net_g_2.pth').read_bytes() == b'previous run'


def test_fix15_missing_test_sets_are_skipped_with_one_line(tmp_path, capsys):
    (tmp_path / 'BSD68').mkdir()
    sets = {'test_1': {'name': 'BSD68', 'dataroot_gt': str(tmp_path / 'BSD68')},
            'test_2': {'name': 'Set12', 'dataroot_gt': str(tmp_path / 'Set12')},
            'test_3': {'name': 'Urban100', 'dataroot_gt': str(tmp_path / 'Urban100')}}
    opt = compat.skip_missing_test_sets({'datasets': dict(sets), 'rank': 0})
    assert list(opt['datasets']) == ['test_1']
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f'test set Set12 skipped: {tmp_path / "Set12"} not found; prepare it with: '
                      f'python scripts/prepare_datasets.py --sets Set12 --out {tmp_path}')
    assert err[1].startswith('test set Urban100 skipped') and len(err) == 2
    # none present: left to the usual error (fix 8), which names the first folder
    opt = compat.skip_missing_test_sets({'datasets': {k: sets[k] for k in ('test_2', 'test_3')}})
    assert list(opt['datasets']) == ['test_2', 'test_3'] and not capsys.readouterr().err
