"""``BicubicDegradationDataset``: HR images -> (LR, HR) pairs made on the fly with MATLAB-style bicubic.

The super-resolution data protocol of NLRN / N3Net / VDSR: mod-crop, MATLAB ``imresize`` (bicubic,
antialiased) down by the scale, optionally back up to the HR size, optionally on the Y channel only,
kept as float. See :class:`BicubicDegradationDataset`.
"""
import random

import numpy as np
import torch
from basicsr.data.transforms import augment, mod_crop
from basicsr.utils import bgr2ycbcr, img2tensor
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data as data

from nl_plugin.data.data_util import (
    ImageSource,
    check_min_size,
    check_option_keys,
    check_phase,
    check_positive_int,
    convert_color,
    name_seed,
    parse_color,
)

_KEYS = {
    'dataroot_gt', 'io_backend', 'meta_info_file', 'color', 'in_ch', 'num_ch', 'y_only',
    'scales', 'test_scale', 'gt_size', 'use_hflip', 'use_rot',
    'upsample', 'round_lr', 'degrade_full_image', 'return_cbcr',
}


def _parse_scales(value, key, name):
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if not vals:
        raise ValueError(f'{name}: {key} must not be empty')
    out = []
    for v in vals:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f'{name}: {key} must be a positive integer or a list of them, got {value!r}')
        out.append(int(v))
    return out


@DATASET_REGISTRY.register()
class BicubicDegradationDataset(data.Dataset):
    """HR images degraded by MATLAB-compatible bicubic downscaling (BasicSR's ``imresize``).

    Returns ``dict(lq, gt, lq_path, gt_path, scale)`` with CHW float32 tensors (RGB order) and, for
    ``y_only`` on colour images in val/test, ``cbcr``: the bicubic Cb/Cr (2 x H x W, YCbCr in [0, 1]) so
    that a Y-only output can be saved in colour.

    Args:
        opt (dict): BasicSR dataset options:

            dataroot_gt (str): folder of HR images, or a BasicSR LMDB (``io_backend: {type: lmdb}``).
            io_backend (dict): ``{type: disk}`` (default) or ``{type: lmdb}``.
            meta_info_file (str | None): BasicSR ``meta_info.txt`` listing the images (first column).
            scale (int | list): set by BasicSR from the top-level ``scale``. A list (e.g. ``[2, 3, 4]``) trains
                one model for all: a scale is drawn per training sample.
            scales (int | list | None): overrides ``scale`` (BasicSR copies the top-level ``scale`` into
                every dataset, which is 1 for networks that take the upsampled image).
            test_scale (int | None): val/test scale when the scale is a list. None: one scale per image,
                chosen from the image name (deterministic); an int: that scale for the whole dataset.
            color (str): ``rgb`` (default), ``gray`` or ``y``; ``y_only: true`` is ``color: y``
                (MATLAB Y in [16, 235] / 255 from the 8-bit image, BasicSR ``bgr2ycbcr(y_only=True)``).
            gt_size (int | None): HR training crop; must be divisible by every scale. None: whole images.
            use_hflip, use_rot (bool): BasicSR flips / rotations in training. Default True.
            upsample (bool): upsample LR back to the HR size with MATLAB bicubic (VDSR / NLRN / N3Net
                input). Default False.
            round_lr (bool): round LR (and the upsampled LR) to 8-bit levels. Default False: float LR as NLRN.
            degrade_full_image (bool): training only: degrade the whole (mod-cropped) image, then crop
                (exactly the offline protocol, slower). Default False: crop an HR patch aligned to the
                scale, then degrade the patch (differs only within 2 LR pixels of the patch border).
            return_cbcr (bool): return ``cbcr`` in val/test for ``y_only`` colour images. Default True.
    """

    def __init__(self, opt):
        super().__init__()
        name = type(self).__name__
        check_option_keys(opt, _KEYS, name)
        self.opt = opt
        self.phase = check_phase(opt, name)
        self.source = ImageSource(opt, name)

        if opt.get('y_only') and opt.get('color') not in (None, 'y'):
            raise ValueError(f'{name}: y_only: true contradicts color: {opt["color"]!r}')
        color_opt = dict(opt)
        if opt.get('y_only'):
            color_opt['color'] = 'y'
        self.color = parse_color(color_opt, name, default='rgb')

        key = 'scales' if opt.get('scales') is not None else 'scale'
        if opt.get(key) is None:
            raise KeyError(f'{name}: the option scale (or scales) is required')
        self.scales = _parse_scales(opt[key], key, name)
        if self.scales == [1]:
            raise ValueError(f'{name}: {key} is 1, i.e. no degradation. BasicSR copies the top-level scale into '
                             'every dataset; set scales: [2, 3, 4] (or an int) in this dataset\'s options')
        self.test_scale = None
        if opt.get('test_scale') is not None:
            self.test_scale = _parse_scales(opt['test_scale'], 'test_scale', name)
            if len(self.test_scale) != 1:
                raise ValueError(f'{name}: test_scale must be one integer, got {opt["test_scale"]!r}')
            self.test_scale = self.test_scale[0]

        self.gt_size = check_positive_int(opt.get('gt_size'), 'gt_size', name)
        if self.gt_size is not None and self.phase == 'train':
            bad = [s for s in self.scales if self.gt_size % s]
            if bad:
                raise ValueError(f'{name}: gt_size {self.gt_size} is not divisible by scale(s) {bad}')
        self.use_hflip = bool(opt.get('use_hflip', True))
        self.use_rot = bool(opt.get('use_rot', True))
        self.upsample = bool(opt.get('upsample', False))
        self.round_lr = bool(opt.get('round_lr', False))
        if (self.phase == 'train' and len(self.scales) > 1 and not self.upsample
                and int(opt.get('batch_size_per_gpu', 1) or 1) > 1):
            raise ValueError(f'{name}: scales {self.scales} without upsample: true give LR patches of different sizes, '
                             'which cannot share a batch; set upsample: true or batch_size_per_gpu: 1')
        self.degrade_full_image = bool(opt.get('degrade_full_image', False))
        self.return_cbcr = bool(opt.get('return_cbcr', True))

    def __len__(self):
        return len(self.source)

    # ------------------------------------------------------------------ degradation
    def _resize(self, img, factor, shape):
        """MATLAB bicubic to exactly ``shape`` (h, w): BasicSR's imresize sizes are ceil(h * factor)."""
        out = imresize(img, factor)
        if out.ndim == 2:
            out = out[:, :, None]
        out = out[:shape[0], :shape[1]]
        if out.shape[:2] != tuple(shape):
            raise RuntimeError(f'imresize gave {out.shape[:2]}, expected {tuple(shape)}')
        if self.round_lr:
            out = np.clip(np.round(out * 255.0), 0, 255) / 255.0
        return out.astype(np.float32)

    def degrade(self, hr, scale):
        """HR (h, w multiples of ``scale``) -> LR, or LR upsampled back to the HR size with ``upsample``."""
        h, w = hr.shape[:2]
        lr = self._resize(hr, 1.0 / scale, (h // scale, w // scale))
        if self.upsample:
            lr = self._resize(lr, scale, (h, w))
        return lr

    def _scale_for(self, path):
        if self.phase == 'train':
            return random.choice(self.scales)
        if self.test_scale is not None:
            return self.test_scale
        if len(self.scales) == 1:
            return self.scales[0]
        return self.scales[name_seed(path) % len(self.scales)]

    # ------------------------------------------------------------------ item
    def __getitem__(self, index):
        name = type(self).__name__
        path = self.source.paths[index]
        where = self.source.describe(path)
        raw = self.source.read(index)
        scale = self._scale_for(path)
        raw = mod_crop(raw, scale)
        check_min_size(raw, scale, where, name, key='scale')
        hr = convert_color(raw, self.color)

        cbcr = None
        if self.phase == 'train':
            if self.gt_size is not None:
                check_min_size(hr, self.gt_size, where, name)
            hr, lr = self._train_pair(hr, scale)
        else:
            lr = self.degrade(hr, scale)
            if self.color == 'y' and self.return_cbcr and raw.shape[2] == 3:
                h, w = raw.shape[:2]
                up = self._resize(self._resize(raw, 1.0 / scale, (h // scale, w // scale)), scale, (h, w))
                cbcr = bgr2ycbcr(np.clip(up, 0.0, 1.0).astype(np.float32))[:, :, 1:]

        lq, gt = img2tensor([lr, hr], bgr2rgb=True, float32=True)
        out = {'lq': lq, 'gt': gt, 'lq_path': str(path), 'gt_path': str(path), 'scale': scale}
        if cbcr is not None:
            out['cbcr'] = torch.from_numpy(np.ascontiguousarray(cbcr.transpose(2, 0, 1))).float()
        return out

    def _train_pair(self, hr, scale):
        size = self.gt_size
        if self.degrade_full_image:
            lr = self.degrade(hr, scale)
            if size is not None:
                h, w = hr.shape[:2]
                top = scale * random.randint(0, (h - size) // scale)
                left = scale * random.randint(0, (w - size) // scale)
                hr = hr[top:top + size, left:left + size]
                f = 1 if self.upsample else scale
                lr = lr[top // f:(top + size) // f, left // f:(left + size) // f]
            hr, lr = augment([np.ascontiguousarray(hr), np.ascontiguousarray(lr)], self.use_hflip, self.use_rot)
            return np.ascontiguousarray(hr), np.ascontiguousarray(lr)
        if size is not None:
            h, w = hr.shape[:2]
            # top-left on the scale grid, so the patch's LR pixels are those of the whole image's LR grid
            top, left = scale * random.randint(0, (h - size) // scale), scale * random.randint(0, (w - size) // scale)
            hr = hr[top:top + size, left:left + size]
        hr = np.ascontiguousarray(augment(np.ascontiguousarray(hr), self.use_hflip, self.use_rot))
        return hr, self.degrade(hr, scale)
