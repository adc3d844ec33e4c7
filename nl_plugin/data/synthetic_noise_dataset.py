"""``SyntheticNoiseDataset``: clean images -> (noisy, clean) pairs with synthetic noise made on the fly.

Gaussian noise (NLRN and N3Net denoising protocols) or heteroscedastic Poisson-Gaussian noise on a
raw-like signal (N3Net's real-noise variant, paper section 5.3). See :class:`SyntheticNoiseDataset`.
"""
import math
import random

import numpy as np
import torch
from basicsr.data.transforms import augment
from basicsr.utils import img2tensor
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data as data

from nl_plugin.data.data_util import (
    ImageSource,
    as_range,
    check_min_size,
    check_option_keys,
    check_phase,
    check_positive_int,
    convert_color,
    name_seed,
    parse_color,
)

_KEYS = {
    'dataroot_gt', 'io_backend', 'meta_info_file', 'color', 'in_ch', 'num_ch',
    'gt_size', 'use_hflip', 'use_rot', 'use_scale',
    'noise_type', 'sigma', 'sigma_range', 'noise_seed', 'clip',
    'sigma_s', 'sigma_r', 'raw_transform', 'gamma', 'wb_gain',
    'return_noise_map', 'noise_map_type', 'noise_map_mode',
}


@DATASET_REGISTRY.register()
class SyntheticNoiseDataset(data.Dataset):
    """Clean images with synthetic noise added on the fly (denoising training / validation).

    Returns ``dict(lq, gt, lq_path, gt_path)``: CHW float32 tensors (RGB order, BasicSR convention) with
    ``gt`` in [0, 1] and ``lq = gt + noise`` (unclipped unless ``clip: true``), plus ``sigma`` (the
    Gaussian sigma on the 0-255 scale; for heteroscedastic noise the pair ``[sigma_s, sigma_r]``) and,
    with ``return_noise_map: true``, the noise-level map (see below).

    Args:
        opt (dict): BasicSR dataset options:

            dataroot_gt (str): folder of clean images, or a BasicSR LMDB (``io_backend: {type: lmdb}``).
            io_backend (dict): ``{type: disk}`` (default) or ``{type: lmdb}``; other keys go to FileClient.
            meta_info_file (str | None): BasicSR ``meta_info.txt``; its first column lists the images.
            color (str): ``gray`` (default, cv2 BGR2GRAY as the papers' loaders), ``y`` (MATLAB Y) or
                ``rgb``. ``in_ch`` / ``num_ch`` (1 | 3) may be used instead.
            phase (str): ``train`` (random crop, augmentation, fresh noise per draw) or ``val``/``test``
                (whole image, noise fixed by the image name). Set by BasicSR.
            gt_size (int | None): training crop size. None: whole images (batch size 1 then).
            use_hflip (bool), use_rot (bool): BasicSR's flips / 90-degree rotations. Default True.
            use_scale (list | None): ``[lo, hi]``: NLRN's rescaling augmentation -- the crop is taken from
                the image downscaled by a factor drawn uniformly from [lo, hi] (MATLAB bicubic).
            noise_type (str): ``gaussian`` (default) or ``heteroscedastic``.
            sigma (float | list): Gaussian std on the 0-255 scale, or ``[lo, hi]`` for blind training
                (drawn uniformly per sample). ``sigma_range`` is an alias for the list form. Default 25.
            noise_seed (int): starting value of the name CRC32 that seeds validation noise. Default 0.
            clip (bool): clip the noisy image to [0, 1]. Default False (both papers).
            sigma_s, sigma_r (float | list): heteroscedastic noise, variance ``sigma_s * x + sigma_r**2``
                for a clean intensity x in [0, 1]; numbers or ``[lo, hi]`` ranges.
                Defaults ``[0.0, 0.01]`` and ``[0.0, 0.05]``.
            raw_transform (bool): N3Net real-noise variant: the clean image is mapped towards raw
                (luminance -> inverse gamma -> division by a white-balance gain) before the noise is
                added; gt is that raw-like clean image. Default True for heteroscedastic noise.
            gamma (float | 'srgb'): inverse gamma of the raw transform, ``x ** gamma``. Default 2.2.
            wb_gain (float | list): white-balance gain g (the raw signal is ``x / g``). Default [1.0, 2.5].
            return_noise_map (bool): also return the noise level. Default False.
            noise_map_type (str): ``params`` (default): heteroscedastic -> 2 constant channels
                ``[sigma_s, sigma_r]``, gaussian -> 1 channel ``sigma / 255``;
                ``std``: 1 channel, the per-pixel noise std (``sqrt(sigma_s * x + sigma_r**2)`` or sigma/255).
            noise_map_mode (str): ``concat`` (default, the map is appended to lq's channels after the image
                channels, N3Net real-noise input) or ``key`` (returned as ``noise_map``).
    """

    def __init__(self, opt):
        super().__init__()
        name = type(self).__name__
        check_option_keys(opt, _KEYS, name)
        self.opt = opt
        self.phase = check_phase(opt, name)
        self.source = ImageSource(opt, name)
        self.color = parse_color(opt, name, default='gray')

        self.gt_size = check_positive_int(opt.get('gt_size'), 'gt_size', name)
        self.use_hflip = bool(opt.get('use_hflip', True))
        self.use_rot = bool(opt.get('use_rot', True))
        self.use_scale = None
        if opt.get('use_scale') is not None:
            lo, hi = as_range(opt['use_scale'], 'use_scale', name, low=1e-3)
            if hi > 1.0:
                raise ValueError(f'{name}: use_scale factors must lie in (0, 1] (downscaling), '
                                 f'got {opt["use_scale"]!r}')
            self.use_scale = (lo, hi)

        self.noise_type = opt.get('noise_type', 'gaussian')
        if self.noise_type not in ('gaussian', 'heteroscedastic'):
            raise ValueError(f'{name}: noise_type must be gaussian or heteroscedastic, got {self.noise_type!r}')
        if 'sigma' in opt and 'sigma_range' in opt:
            raise ValueError(f'{name}: give either sigma or sigma_range, not both')
        if 'sigma_range' in opt:
            self.sigma = as_range(opt['sigma_range'], 'sigma_range', name, allow_scalar=False, high=255)
        else:
            self.sigma = as_range(opt.get('sigma', 25), 'sigma', name, high=255)  # std on the 0-255 scale
        self.noise_seed = int(opt.get('noise_seed', 0))
        self.clip = bool(opt.get('clip', False))

        self.sigma_s = as_range(opt.get('sigma_s', [0.0, 0.01]), 'sigma_s', name)
        self.sigma_r = as_range(opt.get('sigma_r', [0.0, 0.05]), 'sigma_r', name)
        hetero = self.noise_type == 'heteroscedastic'
        self.raw_transform = bool(opt.get('raw_transform', hetero))
        if self.raw_transform and not hetero:
            raise ValueError(f'{name}: raw_transform needs noise_type: heteroscedastic')
        if self.raw_transform and self.color == 'rgb':
            raise ValueError(f'{name}: raw_transform works on luminance; set color: gray (or in_ch: 1), got rgb')
        gamma = opt.get('gamma', 2.2)
        if gamma != 'srgb':
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma <= 0:
                raise ValueError(f"{name}: gamma must be a positive number or 'srgb', got {gamma!r}")
            gamma = float(gamma)
        self.gamma = gamma
        self.wb_gain = as_range(opt.get('wb_gain', [1.0, 2.5]), 'wb_gain', name, low=1e-6)

        self.return_noise_map = bool(opt.get('return_noise_map', False))
        self.noise_map_type = opt.get('noise_map_type', 'params')
        if self.noise_map_type not in ('params', 'std'):
            raise ValueError(f'{name}: noise_map_type must be params or std, got {self.noise_map_type!r}')
        self.noise_map_mode = opt.get('noise_map_mode', 'concat')
        if self.noise_map_mode not in ('concat', 'key'):
            raise ValueError(f'{name}: noise_map_mode must be concat or key, got {self.noise_map_mode!r}')

    def __len__(self):
        return len(self.source)

    @property
    def num_noise_map_channels(self):
        """Channels the noise map adds (0 without ``return_noise_map``)."""
        if not self.return_noise_map:
            return 0
        return 2 if (self.noise_type == 'heteroscedastic' and self.noise_map_type == 'params') else 1

    # ------------------------------------------------------------------ geometry
    def _train_crop(self, img, where):
        name = type(self).__name__
        if self.gt_size is None:
            return img
        size = self.gt_size
        check_min_size(img, size, where, name)
        h, w = img.shape[:2]
        if self.use_scale is not None:
            # NLRN's scaling augmentation: downscale by s, then crop. Cropping a window of size size/s
            # and resizing only that window gives the same patch (up to the window border) far cheaper.
            s = random.uniform(*self.use_scale)
            win = min(int(math.ceil(size / s)), h, w)
            top, left = random.randint(0, h - win), random.randint(0, w - win)
            patch = img[top:top + win, left:left + win]
            if win != size:
                patch = imresize(patch, size / win)[:size, :size]
                if patch.ndim == 2:
                    patch = patch[:, :, None]
                patch = np.clip(patch, 0.0, 1.0).astype(np.float32)
            return patch
        top, left = random.randint(0, h - size), random.randint(0, w - size)
        return img[top:top + size, left:left + size]

    # ------------------------------------------------------------------ noise
    def _uniform(self, lo_hi, gen):
        lo, hi = lo_hi
        if lo == hi:
            return lo
        return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()

    def _to_raw(self, img, gen):
        """N3Net real-noise variant: luminance (already gray) -> inverse gamma -> / white-balance gain."""
        x = np.clip(img, 0.0, 1.0).astype(np.float64)
        if self.gamma == 'srgb':
            x = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
        else:
            x = x ** self.gamma
        return (x / self._uniform(self.wb_gain, gen)).astype(np.float32)

    def _add_noise(self, img, gen):
        """Return (noisy, clean, sigma_info, noise_map or None); ``gen`` None = global torch RNG (training)."""
        shape = img.shape
        if self.noise_type == 'gaussian':
            sigma = self._uniform(self.sigma, gen)
            noise = torch.randn(shape, generator=gen, dtype=torch.float32).numpy() * np.float32(sigma / 255.0)
            noisy = img + noise
            nmap = np.full(shape[:2] + (1,), sigma / 255.0, np.float32) if self.return_noise_map else None
            info = [sigma]
        else:
            if self.raw_transform:
                img = self._to_raw(img, gen)
            s_s = self._uniform(self.sigma_s, gen)
            s_r = self._uniform(self.sigma_r, gen)
            # Poisson-Gaussian approximation: variance linear in the clean intensity.
            std = np.sqrt(s_s * np.clip(img, 0.0, None) + s_r ** 2).astype(np.float32)
            noisy = img + std * torch.randn(shape, generator=gen, dtype=torch.float32).numpy()
            nmap = None
            if self.return_noise_map:
                if self.noise_map_type == 'params':
                    nmap = np.empty(shape[:2] + (2,), np.float32)
                    nmap[..., 0], nmap[..., 1] = s_s, s_r
                else:
                    nmap = std.mean(axis=2, keepdims=True)
            info = [s_s, s_r]
        if self.clip:
            noisy = np.clip(noisy, 0.0, 1.0)
        return noisy.astype(np.float32), img, info, nmap

    # ------------------------------------------------------------------ item
    def __getitem__(self, index):
        path = self.source.paths[index]
        where = self.source.describe(path)
        img = convert_color(self.source.read(index), self.color)
        if self.phase == 'train':
            img = self._train_crop(img, where)
            img = np.ascontiguousarray(augment(np.ascontiguousarray(img), self.use_hflip, self.use_rot))
            gen = None  # fresh noise on every draw (torch's RNG differs per DataLoader worker and epoch)
        else:
            gen = torch.Generator().manual_seed(name_seed(path, self.noise_seed))
        noisy, clean, info, nmap = self._add_noise(img, gen)

        lq, gt = img2tensor([noisy, clean], bgr2rgb=True, float32=True)
        out = {'lq': lq, 'gt': gt, 'lq_path': str(path), 'gt_path': str(path),
               'sigma': torch.tensor(info, dtype=torch.float32)}
        if nmap is not None:
            nmap = torch.from_numpy(np.ascontiguousarray(nmap.transpose(2, 0, 1)))
            if self.noise_map_mode == 'concat':
                out['lq'] = torch.cat([lq, nmap], 0)
            else:
                out['noise_map'] = nmap
        return out
