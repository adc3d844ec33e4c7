"""Every option-file mistake is one line naming the key or file, raised before BasicSR touches any folder.

Most cases call the check BasicSR's pipelines now run first (``nl_plugin.compat.validate_options``) on an
option dict shaped as ``parse_options`` returns it; two go through the real ``basicsr`` command to show
that an existing experiment is left where it was.
"""
import copy
import glob
import os
import subprocess

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import basicsr_cmd
from nl_plugin.compat import validate_options

ARCH = {'type': 'DnCNN', 'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 8, 'depth': 3}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('cfg')
    rng = np.random.default_rng(2)
    for split in ('train', 'val'):
        os.makedirs(root / split)
        for i in range(3):
            cv2.imwrite(str(root / split / f'i{i}.png'), rng.integers(0, 256, (24, 20 + i), dtype=np.uint8))
    torch.save({'params': {}}, root / 'weights.pth')
    return root


def base_opt(root):
    """Options as BasicSR's ``parse_options`` hands them on (phases set, is_train, dist)."""
    return {
        'name': 'cfg', 'model_type': 'RestorationModel', 'num_gpu': 0, 'manual_seed': 1, 'is_train': True,
        'dist': False, 'rank': 0, 'world_size': 1, 'auto_resume': False,
        'datasets': {
            'train': {'name': 't', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(root / 'train'),
                      'phase': 'train', 'sigma': 25, 'gt_size': 16, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2},
            'val': {'name': 'v', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(root / 'val'), 'phase': 'val'},
        },
        'network_g': dict(ARCH),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [10]},
                  'total_iter': 10, 'pixel_opt': {'type': 'SquaredErrorLoss'}},
        'val': {'val_freq': 5, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 5},
    }


def _set(opt, dotted, value):
    keys = dotted.split(':')
    for k in keys[:-1]:
        opt = opt[k]
    if value is _DELETE:
        del opt[keys[-1]]
    else:
        opt[keys[-1]] = value


_DELETE = object()

CASES = [  # (key to change, new value, exception, text the message must hold)
    ('train:pixel_opt:type', 'SquaredErorLoss', KeyError, "Did you mean 'SquaredErrorLoss'"),
    ('train:pixel_opt:loss_wieght', 1.0, KeyError, "'loss_wieght': did you mean 'loss_weight'"),
    ('train:optim_g:type', 'Adamm', ValueError, "train:optim_g:type .* got 'Adamm' \\(did you mean 'Adam'"),
    ('train:optim_g:betas2', 0.9, KeyError, "train:optim_g \\(Adam\\): unknown option key\\(s\\) \\['betas2'\\]"),
    ('train:optim_g:lr', -1e-3, ValueError, 'train:optim_g:lr must be a number >= 0, got -0.001'),
    ('train:optim_g:lr', '1e-3', ValueError, 'YAML reads a number such as 1e5 without a dot as text'),
    ('train:scheduler:type', 'MultiStepLRR', ValueError, "train:scheduler:type .* \\(did you mean 'MultiStepLR'"),
    ('train:scheduler:milestone', [5], KeyError, "train:scheduler \\(MultiStepLR\\): unknown .*'milestone'"),
    ('val:metrics:psnr:type', 'calculate_pnsr', KeyError, "val:metrics:psnr.*Did you mean 'calculate_psnr'"),
    ('val:metrics:psnr:crop_border', _DELETE, KeyError, "val:metrics:psnr .*required .*\\['crop_border'\\]"),
    ('train:total_iter', _DELETE, KeyError, 'train:total_iter is missing'),
    ('datasets:train:batch_size_per_gpu', _DELETE, KeyError, 'datasets:train:batch_size_per_gpu is missing'),
    ('datasets:train:batch_size_per_gpu', 0, ValueError, 'datasets:train:batch_size_per_gpu must be an integer >= 1'),
    ('datasets:train:num_worker_per_gpu', _DELETE, KeyError, 'datasets:train:num_worker_per_gpu is missing'),
    ('logger', _DELETE, KeyError, 'logger is missing'),
    ('val:val_freq', _DELETE, KeyError, 'val:val_freq is missing'),
    ('path:pretrain_network_g', '/nowhere/w.pth', FileNotFoundError, "path:pretrain_network_g: .*'/nowhere/w.pth'"),
    ('datasets:train:gt_size', 48, ValueError, "gt_size 48 is larger than 3 image\\(s\\), e.g. '.*i0.png' \\(24x20\\)"),
    ('network_g:num_in_ch', 3, ValueError, 'datasets:train: gives 1-channel inputs but network_g takes 3'),
    ('datasets:val:color', 'rgb', ValueError, 'datasets:val: gives 3-channel inputs but network_g takes 1'),
    ('network_g:num_out_ch', 3, ValueError, 'datasets:train: gives 1-channel targets but 3 output channels'),
    ('datasets:train:sigma', 300, ValueError, 'sigma must be <= 255, got 300'),
    ('train:nan_policy', 'ignore', ValueError, "train:nan_policy must be one of \\('stop', 'skip'\\)"),
    ('train:ema_decay', 1.5, ValueError, 'train:ema_decay must be a number in \\[0, 1\\)'),
    ('datasets:test', {'name': 'x'}, KeyError, "datasets:test: a training run takes 'train' and 'val\\*'"),
]


@pytest.mark.parametrize('key,value,exc,text', CASES, ids=[f'{c[0]}={c[1]!r}'[:60] for c in CASES])
def test_bad_option_is_named_before_any_folder(folder, key, value, exc, text):
    opt = base_opt(folder)
    validate_options(copy.deepcopy(opt))  # the base options pass
    _set(opt, key, value)
    with pytest.raises(exc, match=text) as info:
        validate_options(opt)
    assert '\n' not in str(info.value.args[0])


def test_pretrained_weights_that_exist_pass(folder):
    opt = base_opt(folder)
    opt['path']['pretrain_network_g'] = str(folder / 'weights.pth')
    validate_options(opt)


def test_check_data_reports_every_undecodable_file(folder, tmp_path):
    bad = tmp_path / 'bad'
    bad.mkdir()
    for name in ('a.png', 'b.png', 'c.png'):
        (bad / name).write_bytes((folder / 'train' / 'i0.png').read_bytes())
    jpg = cv2.imencode('.jpg', np.full((32, 32), 128, np.uint8))[1].tobytes()
    (bad / 'b.jpg').write_bytes(jpg[:len(jpg) // 2])
    (bad / 'c.png').write_bytes(b'not a png')
    from nl_plugin.compat import CHECK_DATA
    opt = base_opt(folder)
    opt['datasets']['train']['dataroot_gt'] = str(bad)
    validate_options(copy.deepcopy(opt))  # without --check_data only the first image is read
    CHECK_DATA['enabled'] = True
    try:
        with pytest.raises(ValueError, match=r"2 of 4 image\(s\) .*b\.jpg.*c\.png"):
            validate_options(opt)
    finally:
        CHECK_DATA['enabled'] = False


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize('text,message', [
    ('', "option file '{path}' is empty"),
    ('- a\n- b\n', 'holds a list, not a mapping of options'),
    ('name: x\nmodel_type: RestorationModel\ndatasets: {}\n', "the option 'path' is missing"),
    ('name: [unclosed\n', "cannot read option file '{path}'"),
])
def test_empty_or_malformed_option_file_is_one_line(tmp_path, capsys, monkeypatch, text, message):
    from nl_plugin.cli import main
    path = tmp_path / 'opt.yml'
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(['train', '-opt', str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and message.format(path=path) in err[-1]
    assert not os.path.exists(tmp_path / 'experiments')


def test_typo_through_the_cli_leaves_the_previous_run_in_place(folder):
    """A metric typo used to surface only at the first validation, after the old run was archived."""
    exp = folder / 'experiments' / 'cfg'
    os.makedirs(exp / 'models')
    (exp / 'models' / 'net_g_5.pth').write_bytes(b'previous run')
    opt = base_opt(folder)
    for key in ('is_train', 'dist', 'rank', 'world_size', 'auto_resume'):
        del opt[key]
    for ds in opt['datasets'].values():
        del ds['phase']
    opt['val']['metrics']['psnr']['type'] = 'calculate_pnsr'
    path = folder / 'typo.yml'
    path.write_text(yaml.safe_dump(opt))
    r = run([basicsr_cmd(), 'train', '-opt', str(path), '--check_data'], folder)
    assert r.returncode != 0 and "Did you mean 'calculate_psnr'" in r.stderr.splitlines()[-1]
    assert (exp / 'models' / 'net_g_5.pth').read_bytes() == b'previous run'
    assert not glob.glob(str(folder / 'experiments' / 'cfg_archived_*'))
