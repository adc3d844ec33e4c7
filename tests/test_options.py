"""Every shipped option file is valid: known model/arch/dataset types, known keys, sane values.

Datasets are built on a stand-in folder of small images (the papers' data is not shipped).
"""
import copy
import glob
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

from conftest import ROOT
from nl_plugin.config_checks import check_kwargs

OPTION_FILES = sorted(glob.glob(os.path.join(ROOT, 'options', '*.yml')))


@pytest.fixture(scope='module')
def standin(tmp_path_factory):
    folder = tmp_path_factory.mktemp('standin')
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(folder / f'im{i}.png'), rng.integers(0, 256, (96, 120, 3), dtype=np.uint8))
    return str(folder)


def test_option_files_exist():
    names = {os.path.basename(p) for p in OPTION_FILES}
    for required in ('train_nlrn_denoise.yml', 'train_nlrn_sr.yml', 'train_n3net_denoise.yml', 'train_n3net_sr.yml',
                     'train_n3net_realnoise.yml', 'train_dncnn_denoise.yml', 'test_nlrn_denoise.yml',
                     'test_nlrn_sr.yml', 'test_n3net_denoise.yml', 'demo_train_dncnn.yml', 'demo_test_dncnn.yml',
                     'demo_train_n3net.yml', 'demo_test_n3net.yml', 'demo_train_nlrn.yml', 'demo_test_nlrn.yml'):
        assert required in names


@pytest.mark.parametrize('path', OPTION_FILES, ids=os.path.basename)
def test_option_file_is_valid(path, standin):
    with open(path) as f:
        opt = yaml.safe_load(f)
    name = os.path.basename(path)
    opt['is_train'] = name.startswith(('train_', 'demo_train')) or (name.startswith('gpu_check_') and
                                                                     not name.endswith('_test.yml'))
    model_cls = MODEL_REGISTRY.get(opt['model_type'])
    model_cls.validate_options(opt)
    net_opt = copy.deepcopy(opt['network_g'])
    arch = ARCH_REGISTRY.get(net_opt.pop('type'))
    check_kwargs(arch, net_opt, where=path)
    with torch.device('meta'):
        net = arch(**net_opt)
    in_ch = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)))
    in_ch = getattr(in_ch, 'in_channels', None) or in_ch.num_features
    for phase, ds_opt in opt['datasets'].items():
        ds_opt = dict(ds_opt, dataroot_gt=standin, io_backend={'type': 'disk'}, phase=phase.split('_')[0])
        ds_opt.pop('meta_info_file', None)
        if 'dataroot_lq' in ds_opt:  # paired datasets: the stand-in images serve as their own partners
            ds_opt['dataroot_lq'] = standin
        if 'scale' in opt:
            ds_opt['scale'] = opt['scale']
        dataset = DATASET_REGISTRY.get(ds_opt['type'])(ds_opt)
        item = dataset[0]
        assert item['lq'].shape[0] == in_ch, f'{phase}: dataset gives {item["lq"].shape[0]} channels, net wants {in_ch}'
