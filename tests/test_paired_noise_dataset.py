"""PairedNoiseDataset on small noisy/clean pairs written here: exact pixels from a folder and from LMDBs, the
same crop and flips on both images, colour modes, errors naming the file or key, and a real ``basicsr train``."""
import glob
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from numpy.lib.stride_tricks import sliding_window_view

from conftest import ROOT, basicsr_cmd
from nl_plugin.data.paired_noise_dataset import PairedNoiseDataset

NAMES = ('a', 'b', 'c')


def _write_pairs(root, shape=(30, 40, 3), lq_suffix='', lq_ext='.png', seed=0):
    """Clean images and noisy partners ``255 - clean`` (so any misalignment of a crop shows) in root/{gt,lq}."""
    rng = np.random.default_rng(seed)
    for sub in ('gt', 'lq'):
        os.makedirs(root / sub, exist_ok=True)
    clean = {}
    for name in NAMES:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        assert cv2.imwrite(str(root / 'gt' / f'{name}.png'), img)
        assert cv2.imwrite(str(root / 'lq' / f'{name}{lq_suffix}{lq_ext}'), 255 - img)
        clean[name] = img
    return clean


@pytest.fixture
def pairs(tmp_path):
    return tmp_path, _write_pairs(tmp_path)


def _opt(root, **kw):
    return dict(dict(phase='val', dataroot_gt=str(root / 'gt'), dataroot_lq=str(root / 'lq')), **kw)


def _rgb(img):
    """uint8 BGR HxWx3 -> the CHW RGB float tensor the dataset must return."""
    return torch.from_numpy(img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0)


def test_folder_pairs_exact_pixels_in_name_order(pairs):
    root, clean = pairs
    ds = PairedNoiseDataset(_opt(root))
    assert len(ds) == 3
    for i, name in enumerate(NAMES):
        item = ds[i]
        assert item['gt_path'] == str(root / 'gt' / f'{name}.png')
        assert item['lq_path'] == str(root / 'lq' / f'{name}.png')
        assert torch.equal(item['gt'], _rgb(clean[name]))
        assert torch.equal(item['lq'], _rgb(255 - clean[name]))


def _dihedral(patch):
    """The 8 flips / rotations of an HxWxC patch."""
    out = []
    for p in (patch, patch.transpose(1, 0, 2)):
        out += [p, p[::-1], p[:, ::-1], p[::-1, ::-1]]
    return out


@pytest.mark.parametrize('color', ['rgb', 'gray'])
def test_train_crop_and_flips_are_the_same_on_both(pairs, color):
    root, clean = pairs
    ds = PairedNoiseDataset(_opt(root, phase='train', gt_size=16, color=color))
    corners = set()
    for draw in range(12):
        index = draw % 3
        item = ds[index]
        gt, lq = item['gt'], item['lq']
        assert gt.shape == lq.shape == (3 if color == 'rgb' else 1, 16, 16)
        assert torch.allclose(lq, 1 - gt, atol=1.5 / 255)  # the noisy patch is the partner of the clean one
        # and the clean patch is a flipped / rotated window of the clean image
        full = clean[NAMES[index]]
        if color == 'gray':
            full = cv2.cvtColor(full, cv2.COLOR_BGR2GRAY)[:, :, None]
        else:
            full = full[:, :, ::-1]
        patch = np.round(gt.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        windows = sliding_window_view(full, (16, 16, full.shape[2]))[:, :, 0]
        hits = [tuple(idx) for p in _dihedral(patch) for idx in np.argwhere((windows == p).all(axis=(2, 3, 4)))]
        assert len(hits) >= 1
        corners.add((index, hits[0]))
    assert len(corners) > 3  # random crops, not a fixed window


def test_colour_modes(pairs):
    root, clean = pairs
    img = clean['b']
    gray = PairedNoiseDataset(_opt(root, color='gray'))[1]
    assert gray['gt'].shape == (1, 30, 40)
    assert torch.equal(gray['gt'][0], torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) / np.float32(255)))
    assert torch.equal(gray['lq'][0], torch.from_numpy(cv2.cvtColor(255 - img, cv2.COLOR_BGR2GRAY) / np.float32(255)))
    y = PairedNoiseDataset(_opt(root, in_ch=1, color='y'))[1]
    b, g, r = (img[:, :, k].astype(np.float64) for k in range(3))
    ref = np.round(16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255) / 255  # MATLAB rgb2ycbcr on uint8
    assert y['gt'].shape == (1, 30, 40) and np.abs(y['gt'][0].numpy() - ref).max() <= 1 / 255 + 1e-6
    assert PairedNoiseDataset(_opt(root, num_ch=3))[1]['lq'].shape == (3, 30, 40)


def _create_lmdb(folder, out):
    res = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'create_lmdb.py'), str(folder), str(out)],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_lmdb_pairs_equal_folder_pairs_and_meta_info(pairs):
    root, _ = pairs
    for sub in ('gt', 'lq'):
        _create_lmdb(root / sub, root / f'{sub}.lmdb')
    lmdb_opt = dict(dataroot_gt=str(root / 'gt.lmdb'), dataroot_lq=str(root / 'lq.lmdb'), io_backend={'type': 'lmdb'})
    disk, db = PairedNoiseDataset(_opt(root)), PairedNoiseDataset(_opt(root, **lmdb_opt))
    assert len(db) == 3
    for i, name in enumerate(NAMES):
        assert db[i]['lq_path'] == db[i]['gt_path'] == name  # BasicSR LMDB keys
        assert torch.equal(db[i]['gt'], disk[i]['gt']) and torch.equal(db[i]['lq'], disk[i]['lq'])
    meta = root / 'meta.txt'
    meta.write_text('c.png (30,40,3) 1\n')
    for opt in (_opt(root, meta_info_file=str(meta)), _opt(root, meta_info_file=str(meta), **lmdb_opt)):
        ds = PairedNoiseDataset(opt)
        assert len(ds) == 1 and torch.equal(ds[0]['lq'], disk[2]['lq'])
    item = PairedNoiseDataset(_opt(root, phase='train', gt_size=8, **lmdb_opt))[0]
    assert item['gt'].shape == (3, 8, 8) and torch.allclose(item['lq'], 1 - item['gt'], atol=1e-6)


def test_filename_template_and_other_extensions(tmp_path):
    clean = _write_pairs(tmp_path, lq_suffix='_NOISY', lq_ext='.bmp')
    ds = PairedNoiseDataset(_opt(tmp_path, filename_tmpl='{}_NOISY'))
    assert ds[0]['lq_path'].endswith('a_NOISY.bmp') and torch.equal(ds[0]['lq'], _rgb(255 - clean['a']))
    with pytest.raises(FileNotFoundError, match=r"a\.png' has no noisy partner: no image named 'a' in dataroot_lq"):
        PairedNoiseDataset(_opt(tmp_path))
    with pytest.raises(ValueError, match='filename_tmpl'):
        PairedNoiseDataset(_opt(tmp_path, filename_tmpl='noisy'))


def test_missing_partners_and_bad_options_are_named(pairs):
    root, _ = pairs
    os.remove(root / 'lq' / 'b.png')
    with pytest.raises(FileNotFoundError, match=r"'.*gt/b\.png' has no noisy partner.*'b'.*dataroot_lq"):
        PairedNoiseDataset(_opt(root))
    cv2.imwrite(str(root / 'lq' / 'b.png'), np.zeros((30, 40, 3), np.uint8))
    cv2.imwrite(str(root / 'lq' / 'stray.png'), np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"noisy image '.*lq/stray\.png' has no clean partner in dataroot_gt"):
        PairedNoiseDataset(_opt(root))
    os.remove(root / 'lq' / 'stray.png')
    cv2.imwrite(str(root / 'lq' / 'b.jpg'), np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"dataroot_lq has two images named 'b'.*b\.jpg.*b\.png"):
        PairedNoiseDataset(_opt(root))
    os.remove(root / 'lq' / 'b.jpg')
    with pytest.raises(KeyError, match=r"'gt_sise'.*did you mean 'gt_size'"):
        PairedNoiseDataset(_opt(root, gt_sise=16))
    with pytest.raises(KeyError, match='dataroot_lq'):
        PairedNoiseDataset(dict(phase='val', dataroot_gt=str(root / 'gt')))
    with pytest.raises(FileNotFoundError, match=r"dataroot_lq '.*nowhere' does not exist"):
        PairedNoiseDataset(_opt(root, dataroot_lq=str(root / 'nowhere')))
    with pytest.raises(FileNotFoundError, match=r'dataroot_lq .*not a BasicSR LMDB'):
        PairedNoiseDataset(_opt(root, io_backend={'type': 'lmdb'}, dataroot_gt=str(_lmdb_of(root / 'gt'))))


def _lmdb_of(folder):
    out = folder.parent / f'{folder.name}.lmdb'
    _create_lmdb(folder, out)
    return out


def test_bad_files_are_named_when_read(pairs):
    root, _ = pairs
    cv2.imwrite(str(root / 'lq' / 'a.png'), np.zeros((30, 41, 3), np.uint8))
    (root / 'lq' / 'b.png').write_bytes(b'not a png')
    ds = PairedNoiseDataset(_opt(root, phase='train', gt_size=32))
    with pytest.raises(ValueError, match=r"noisy image '.*lq/a\.png' is 30x41 .* clean partner '.*gt/a\.png' is 30x40"):
        ds[0]
    with pytest.raises(ValueError, match=r"cannot decode image '.*lq/b\.png'"):
        ds[1]
    with pytest.raises(ValueError, match=r"image '.*gt/c\.png' is 30x40 .*smaller than gt_size 32x32"):
        ds[2]


def test_basicsr_train_on_pairs(tmp_path):
    """A few iterations of a tiny DnCNN through the real ``basicsr train`` command: folder pairs for training,
    LMDB pairs for validation."""
    _write_pairs(tmp_path / 'train', shape=(32, 36, 3))
    _write_pairs(tmp_path / 'val', shape=(20, 24, 3), seed=1)
    val_lq, val_gt = _lmdb_of(tmp_path / 'val' / 'lq'), _lmdb_of(tmp_path / 'val' / 'gt')
    opt = {
        'name': 'pairs', 'model_type': 'RestorationModel', 'num_gpu': 'auto', 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'tiny', 'type': 'PairedNoiseDataset', 'dataroot_lq': str(tmp_path / 'train' / 'lq'),
                      'dataroot_gt': str(tmp_path / 'train' / 'gt'), 'color': 'gray', 'gt_size': 16,
                      'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 2},
            'val': {'name': 'tinyval', 'type': 'PairedNoiseDataset', 'dataroot_lq': str(val_lq),
                    'dataroot_gt': str(val_gt), 'io_backend': {'type': 'lmdb'}, 'color': 'gray'},
        },
        'network_g': {'type': 'DnCNN', 'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 8, 'depth': 3},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [100],
                  'gamma': 0.5}, 'total_iter': 4, 'warmup_iter': -1, 'pixel_opt': {'type': 'SquaredErrorLoss'}},
        'val': {'val_freq': 2, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 4, 'use_tb_logger': False},
    }
    path = tmp_path / 'pairs.yml'
    path.write_text(yaml.safe_dump(opt))
    res = subprocess.run([basicsr_cmd(), 'train', '-opt', str(path)], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'pairs'
    assert (exp / 'models' / 'net_g_4.pth').is_file()
    log = '\n'.join(open(p).read() for p in glob.glob(str(exp / 'train_*.log')))
    assert 'Number of train images: 3' in log and 'Validation tinyval' in log and '# psnr:' in log
