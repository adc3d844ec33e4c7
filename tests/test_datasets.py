"""SyntheticNoiseDataset and BicubicDegradationDataset: noise statistics, determinism, exact agreement with
BasicSR's MATLAB-style imresize / bgr2ycbcr, and the error messages."""
import os
import random
import zlib

import cv2
import numpy as np
import pytest
import torch
from basicsr.data import build_dataset
from basicsr.utils import bgr2ycbcr
from basicsr.utils.matlab_functions import imresize
from torch.utils.data import DataLoader

from nl_plugin.data.bicubic_degradation_dataset import BicubicDegradationDataset
from nl_plugin.data.data_util import name_seed
from nl_plugin.data.synthetic_noise_dataset import SyntheticNoiseDataset


def _write(folder, name, img):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    assert cv2.imwrite(path, img)
    return path


def _noise_opt(root, **kw):
    opt = dict(type='SyntheticNoiseDataset', name='noise', dataroot_gt=str(root), io_backend=dict(type='disk'),
               phase='val', sigma=25)
    opt.update(kw)
    return opt


def _sr_opt(root, **kw):
    opt = dict(type='BicubicDegradationDataset', name='sr', dataroot_gt=str(root), io_backend=dict(type='disk'),
               phase='val', scale=3)
    opt.update(kw)
    return opt


@pytest.fixture
def flat(tmp_path):
    """One 96x96 flat gray image at 128/255."""
    _write(tmp_path / 'flat', 'flat.png', np.full((96, 96), 128, np.uint8))
    return tmp_path / 'flat'


@pytest.fixture
def photos(tmp_path):
    """Three small random images: colour 25x31, gray 40x36, colour 33x45."""
    rng = np.random.default_rng(1)
    root = tmp_path / 'photos'
    _write(root, 'a.png', rng.integers(0, 256, (25, 31, 3), dtype=np.uint8))
    _write(root, 'b.png', rng.integers(0, 256, (40, 36), dtype=np.uint8))
    _write(root, 'c.png', rng.integers(0, 256, (33, 45, 3), dtype=np.uint8))
    return root


# ------------------------------------------------------------------ Gaussian noise
@pytest.mark.parametrize('color', ['gray', 'rgb'])
def test_noise_std_matches_sigma_on_flat_image(flat, color):
    ds = build_dataset(_noise_opt(flat, sigma=25, color=color))
    item = ds[0]
    assert item['gt'].shape == (1 if color == 'gray' else 3, 96, 96)
    assert torch.allclose(item['gt'], torch.full_like(item['gt'], 128 / 255))
    noise = (item['lq'] - item['gt']) * 255
    assert abs(noise.std().item() - 25) < 25 * 0.04
    assert abs(noise.mean().item()) < 1.0
    assert item['lq'].min() < 0.5 - 3 * 25 / 255  # unclipped, Gaussian tails reach far
    if color == 'rgb':  # independent noise per channel
        c = np.corrcoef(noise.reshape(3, -1).numpy())
        assert np.abs(c[np.triu_indices(3, 1)]).max() < 0.05


@pytest.mark.parametrize('key', ['sigma', 'sigma_range'])
def test_blind_sigma_range_is_covered(flat, key):
    opt = _noise_opt(flat, phase='train', gt_size=32)
    del opt['sigma']
    opt[key] = [0, 50]
    ds = SyntheticNoiseDataset(opt)
    sigmas, stds = [], []
    for _ in range(150):
        item = ds[0]
        sigmas.append(item['sigma'].item())
        stds.append(((item['lq'] - item['gt']) * 255).std().item())
    sigmas = np.array(sigmas)
    assert sigmas.min() >= 0 and sigmas.max() <= 50
    hist, _ = np.histogram(sigmas, bins=5, range=(0, 50))
    assert (hist > 10).all(), hist  # every fifth of the range is drawn (expected 30 each)
    # the noise actually added follows the reported sigma (32x32 patch: ~3% std error)
    assert np.abs(np.array(stds) - sigmas).max() < 0.15 * sigmas.max()
    assert np.corrcoef(stds, sigmas)[0, 1] > 0.99


def test_fresh_noise_every_training_draw(flat):
    ds = SyntheticNoiseDataset(_noise_opt(flat, phase='train', gt_size=96, use_hflip=False, use_rot=False))
    a, b = ds[0], ds[0]
    assert torch.equal(a['gt'], b['gt'])
    assert not torch.allclose(a['lq'], b['lq'])


def test_validation_noise_is_fixed_by_image_name(photos, tmp_path):
    """Two instances, another image order (meta_info_file), worker processes and LMDB-style names agree."""
    ds1 = SyntheticNoiseDataset(_noise_opt(photos, color='rgb'))
    meta = tmp_path / 'meta_info.txt'
    meta.write_text('c.png (33,45,3) 1\nb.png (40,36,1) 1\n')
    ds2 = SyntheticNoiseDataset(_noise_opt(photos, color='rgb', meta_info_file=str(meta)))
    torch.manual_seed(123)  # the global RNG must not matter
    by_name1 = {os.path.basename(ds1[i]['lq_path']): ds1[i]['lq'] for i in range(len(ds1))}
    by_name2 = {os.path.basename(ds2[i]['lq_path']): ds2[i]['lq'] for i in range(len(ds2))}
    assert set(by_name2) == {'b.png', 'c.png'}
    for n in by_name2:
        assert torch.equal(by_name1[n], by_name2[n])
    # other processes: DataLoader workers
    loader = DataLoader(ds1, batch_size=1, num_workers=2, shuffle=False)
    for batch in loader:
        assert torch.equal(batch['lq'][0], by_name1[os.path.basename(batch['lq_path'][0])])
    # the seed is the CRC32 of the name without extension (started from noise_seed), as documented
    assert name_seed('/x/y/b.png') == zlib.crc32(b'b') == name_seed('b')
    ds3 = SyntheticNoiseDataset(_noise_opt(photos, color='rgb', noise_seed=7))
    assert not torch.equal(ds3[0]['lq'], by_name1['a.png'])
    assert torch.equal(ds3[0]['gt'], ds1[0]['gt'])


def test_clip_option(tmp_path):
    img = np.zeros((32, 32), np.uint8)
    img[:, 16:] = 255
    root = tmp_path / 'bw'
    _write(root, 'bw.png', img)
    lq = SyntheticNoiseDataset(_noise_opt(root, sigma=50))[0]['lq']
    assert lq.min() < 0 and lq.max() > 1
    lq = SyntheticNoiseDataset(_noise_opt(root, sigma=50, clip=True))[0]['lq']
    assert lq.min() >= 0 and lq.max() <= 1
    assert (lq == 0).any() and (lq == 1).any()


def test_gray_conversion_is_cv2_bgr2gray_and_y_is_matlab(photos):
    bgr = cv2.imread(str(photos / 'a.png'))
    gt = SyntheticNoiseDataset(_noise_opt(photos, color='gray'))[0]['gt'][0].numpy()
    assert np.array_equal(gt, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255)
    gt = SyntheticNoiseDataset(_noise_opt(photos, in_ch=1, color='y'))[0]['gt'][0].numpy()
    assert np.array_equal(gt, bgr2ycbcr(bgr, y_only=True).astype(np.float32) / 255)
    gt = SyntheticNoiseDataset(_noise_opt(photos, num_ch=3))[0]['gt'].numpy()  # RGB order
    assert np.array_equal(gt, bgr[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255)


def test_scaling_augmentation_and_crop(photos):
    ds = SyntheticNoiseDataset(_noise_opt(photos, phase='train', gt_size=20, use_scale=[0.6, 1.0], color='rgb'))
    for i in range(len(ds)):
        item = ds[i]
        assert item['gt'].shape == (3, 20, 20) and item['lq'].shape == (3, 20, 20)
        assert 0 <= item['gt'].min() and item['gt'].max() <= 1


# ------------------------------------------------------------------ heteroscedastic noise
def test_heteroscedastic_variance_is_linear_in_intensity(tmp_path):
    levels = [25, 100, 175, 250]
    img = np.concatenate([np.full((48, 256), v, np.uint8) for v in levels], 0)
    root = tmp_path / 'steps'
    _write(root, 'steps.png', img)
    s_s, s_r = 0.02, 0.03
    ds = SyntheticNoiseDataset(_noise_opt(root, noise_type='heteroscedastic', sigma_s=s_s, sigma_r=s_r,
                                          raw_transform=False))
    item = ds[0]
    noise = (item['lq'] - item['gt'])[0].numpy()
    x = np.array(levels) / 255
    var = np.array([noise[48 * k:48 * (k + 1)].var() for k in range(4)])
    expected = s_s * x + s_r ** 2
    assert np.allclose(var, expected, rtol=0.06), (var, expected)
    slope, intercept = np.polyfit(x, var, 1)
    assert abs(slope - s_s) < 0.1 * s_s and abs(intercept - s_r ** 2) < 0.3 * s_r ** 2
    assert torch.allclose(item['sigma'], torch.tensor([s_s, s_r]))


def test_raw_transform_and_noise_maps(photos):
    opt = _noise_opt(photos, noise_type='heteroscedastic', sigma_s=[0.001, 0.01], sigma_r=[0.01, 0.02],
                     wb_gain=2.0, gamma=2.2, return_noise_map=True)
    item = SyntheticNoiseDataset(opt)[0]
    bgr = cv2.imread(str(photos / 'a.png'))
    lum = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float64) / 255
    assert np.allclose(item['gt'][0].numpy(), lum ** 2.2 / 2.0, atol=1e-6)
    assert item['lq'].shape == (3, 25, 31)  # noisy raw + [sigma_s, sigma_r] maps
    s_s, s_r = item['sigma'].tolist()
    assert 0.001 <= s_s <= 0.01 and 0.01 <= s_r <= 0.02
    assert torch.allclose(item['lq'][1], torch.full((25, 31), s_s))
    assert torch.allclose(item['lq'][2], torch.full((25, 31), s_r))
    opt.update(noise_map_mode='key', noise_map_type='std')
    item = SyntheticNoiseDataset(opt)[0]
    assert item['lq'].shape == (1, 25, 31) and item['noise_map'].shape == (1, 25, 31)
    s_s, s_r = item['sigma'].tolist()
    assert torch.allclose(item['noise_map'], (s_s * item['gt'] + s_r ** 2).sqrt(), atol=1e-6)


# ------------------------------------------------------------------ bicubic degradation
def _bgr01(path, scale):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float32) / 255
    img = img if img.ndim == 3 else img[:, :, None]
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


def _chw_rgb(img):
    img = img[:, :, ::-1] if img.shape[2] == 3 else img
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_bicubic_lr_equals_basicsr_imresize_and_mod_crop(photos, scale):
    ds = BicubicDegradationDataset(_sr_opt(photos, scale=scale))
    item = ds[0]  # a.png, 25x31 colour
    hr = _bgr01(photos / 'a.png', scale)
    assert item['gt'].shape[1:] == (25 - 25 % scale, 31 - 31 % scale)  # mod-crop
    assert torch.equal(item['gt'], _chw_rgb(hr))
    assert torch.equal(item['lq'], _chw_rgb(imresize(hr, 1 / scale)))
    assert item['scale'] == scale
    up = BicubicDegradationDataset(_sr_opt(photos, scale=scale, upsample=True))[0]
    assert up['lq'].shape == up['gt'].shape
    assert torch.equal(up['lq'], _chw_rgb(imresize(imresize(hr, 1 / scale), scale)))
    rounded = BicubicDegradationDataset(_sr_opt(photos, scale=scale, round_lr=True))[0]['lq'] * 255
    assert torch.allclose(rounded, rounded.round(), atol=1e-4)
    assert (rounded.round() - (item['lq'] * 255).clamp(0, 255).round()).abs().max() == 0


def test_y_only_matches_bgr2ycbcr_and_returns_cbcr(photos):
    item = BicubicDegradationDataset(_sr_opt(photos, y_only=True, upsample=True))[0]
    bgr = cv2.imread(str(photos / 'a.png'))[:24, :30]
    y = bgr2ycbcr(bgr, y_only=True).astype(np.float32) / 255
    assert np.array_equal(item['gt'][0].numpy(), y)
    assert item['gt'].min() >= 16 / 255 - 1e-6 and item['gt'].max() <= 235 / 255 + 1e-6
    assert torch.equal(item['lq'][0], torch.from_numpy(imresize(imresize(y, 1 / 3), 3)))
    up = imresize(imresize(bgr.astype(np.float32) / 255, 1 / 3), 3)
    assert item['cbcr'].shape == (2, 24, 30)
    assert torch.allclose(item['cbcr'], torch.from_numpy(bgr2ycbcr(up.clip(0, 1))[:, :, 1:].transpose(2, 0, 1)))
    assert 'cbcr' not in BicubicDegradationDataset(_sr_opt(photos, y_only=True, phase='train', gt_size=12))[0]


def test_scale_list_draws_every_scale_and_crops_align(photos):
    random.seed(0)
    ds = BicubicDegradationDataset(_sr_opt(photos, phase='train', scale=[2, 3, 4], gt_size=24, color='gray'))
    seen = set()
    for i in range(60):
        item = ds[i % len(ds)]
        s = item['scale']
        seen.add(s)
        assert item['gt'].shape == (1, 24, 24) and item['lq'].shape == (1, 24 // s, 24 // s)
        assert torch.equal(item['lq'][0], torch.from_numpy(imresize(item['gt'][0].numpy(), 1 / s)))
    assert seen == {2, 3, 4}
    # `scales` overrides the top-level scale that BasicSR injects (1 for networks on the upsampled input)
    ds = BicubicDegradationDataset(_sr_opt(photos, scale=1, scales=[2, 3], test_scale=3, upsample=True))
    assert all(ds[i]['scale'] == 3 for i in range(len(ds)))
    ds = BicubicDegradationDataset(_sr_opt(photos, scale=[2, 3, 4]))
    per_image = [ds[i]['scale'] for i in range(len(ds))]
    assert per_image == [[2, 3, 4][name_seed(p) % 3] for p in ds.source.paths]
    with pytest.raises(ValueError, match='scales'):
        BicubicDegradationDataset(_sr_opt(photos, scale=1))


def test_degrade_full_image_matches_offline_protocol(photos):
    random.seed(3)
    ds = BicubicDegradationDataset(_sr_opt(photos, phase='train', scale=2, gt_size=16, degrade_full_image=True,
                                           use_hflip=False, use_rot=False, upsample=True))
    item = ds[2]  # c.png 33x45 -> 32x44
    hr = _chw_rgb(_bgr01(photos / 'c.png', 2))
    full_lr = _chw_rgb(imresize(imresize(_bgr01(photos / 'c.png', 2), 0.5), 2))
    hits = [(t, left) for t in range(0, 17, 2) for left in range(0, 29, 2)
            if torch.equal(hr[:, t:t + 16, left:left + 16], item['gt'])]
    assert len(hits) == 1
    t, left = hits[0]
    assert torch.equal(item['lq'], full_lr[:, t:t + 16, left:left + 16])


# ------------------------------------------------------------------ errors
def test_unknown_option_key_names_key_and_dataset(photos):
    with pytest.raises(KeyError, match=r"SyntheticNoiseDataset.*'sigmaa'.*did you mean 'sigma'"):
        build_dataset(_noise_opt(photos, sigmaa=25))
    with pytest.raises(KeyError, match=r"BicubicDegradationDataset.*'upsampel'"):
        build_dataset(_sr_opt(photos, upsampel=True))


@pytest.mark.parametrize('kw,key', [
    (dict(sigma=-5), 'sigma'), (dict(sigma=[30, 10]), 'sigma'), (dict(sigma_range=25), 'sigma_range'),
    (dict(in_ch=2), 'in_ch'), (dict(color='cmyk'), 'color'), (dict(gt_size=0), 'gt_size'),
    (dict(use_scale=[0.5, 1.5]), 'use_scale'), (dict(noise_type='poisson'), 'noise_type'),
    (dict(noise_type='heteroscedastic', sigma_s=-1), 'sigma_s'), (dict(phase='training'), 'phase'),
    (dict(in_ch=3, color='gray'), 'in_ch'),
])
def test_bad_noise_option_values_name_the_key(photos, kw, key):
    with pytest.raises(ValueError, match=key):
        SyntheticNoiseDataset(_noise_opt(photos, **kw))


def test_bad_sr_option_values_name_the_key(photos):
    with pytest.raises(ValueError, match='gt_size 20 is not divisible by scale'):
        BicubicDegradationDataset(_sr_opt(photos, phase='train', scale=[2, 3], gt_size=20))
    with pytest.raises(ValueError, match='scale'):
        BicubicDegradationDataset(_sr_opt(photos, scale=[2, -3]))
    with pytest.raises(ValueError, match='upsample: true or batch_size_per_gpu: 1'):
        BicubicDegradationDataset(_sr_opt(photos, phase='train', scale=[2, 4], gt_size=16, batch_size_per_gpu=8))
    with pytest.raises(ValueError, match='y_only'):
        BicubicDegradationDataset(_sr_opt(photos, y_only=True, color='rgb'))


def test_image_smaller_than_gt_size_names_file_and_sizes(photos):
    ds = SyntheticNoiseDataset(_noise_opt(photos, phase='train', gt_size=30))
    ds[1]  # b.png is 40x36: fine
    with pytest.raises(ValueError, match=r"a\.png.*25x31.*gt_size 30x30"):
        ds[0]
    ds = BicubicDegradationDataset(_sr_opt(photos, phase='train', scale=2, gt_size=30))
    with pytest.raises(ValueError, match=r"a\.png.*24x30.*gt_size 30x30"):
        ds[0]


def test_missing_and_corrupt_files_are_named(photos, tmp_path):
    (photos / 'z_broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(64))
    ds = SyntheticNoiseDataset(_noise_opt(photos))
    with pytest.raises(ValueError, match=r'z_broken\.png.*corrupt'):
        ds[3]
    ds = BicubicDegradationDataset(_sr_opt(photos))
    with pytest.raises(ValueError, match=r'z_broken\.png'):
        ds[3]
    meta = tmp_path / 'meta.txt'
    meta.write_text('a.png (25,31,3) 1\nmissing.png (10,10,3) 1\n')
    ds = SyntheticNoiseDataset(_noise_opt(photos, meta_info_file=str(meta)))
    ds[0]
    with pytest.raises(FileNotFoundError, match=r'missing\.png'):
        ds[1]
    with pytest.raises(FileNotFoundError, match='dataroot_gt'):
        SyntheticNoiseDataset(_noise_opt(tmp_path / 'nope'))
