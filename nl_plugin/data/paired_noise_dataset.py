"""``PairedNoiseDataset``: real (noisy, clean) image pairs, e.g. SIDD crops, paired by file name.

BasicSR's paired convention: ``dataroot_lq`` holds the noisy images, ``dataroot_gt`` the clean ones, both
folders or both BasicSR LMDBs. See :class:`PairedNoiseDataset`.
"""
import random

import numpy as np
from basicsr.data.transforms import augment
from basicsr.utils import img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data as data

from nl_plugin.data.data_util import (
    ImageSource,
    check_min_size,
    check_option_keys,
    check_phase,
    check_positive_int,
    convert_color,
    name_of,
    parse_color,
)

_KEYS = {
    'dataroot_gt', 'dataroot_lq', 'io_backend', 'meta_info_file', 'filename_tmpl',
    'color', 'in_ch', 'num_ch', 'gt_size', 'use_hflip', 'use_rot',
}


def _lq_source(opt, dataset_type):
    """An :class:`ImageSource` over every image of ``dataroot_lq`` (``meta_info_file`` selects clean images)."""
    if opt.get('dataroot_lq') is None:
        raise KeyError(f'{dataset_type}: the option dataroot_lq (the noisy images) is required')
    lq_opt = dict(opt, dataroot_gt=opt['dataroot_lq'])
    lq_opt.pop('meta_info_file', None)
    try:
        return ImageSource(lq_opt, dataset_type)
    except (KeyError, ValueError, OSError) as err:  # ImageSource names its root dataroot_gt
        raise type(err)(str(err.args[0]).replace('dataroot_gt', 'dataroot_lq')) from None


def _index_by_name(source, key, dataset_type):
    """``{name without extension: index}`` of ``source``; two files with one name are an error naming both."""
    index = {}
    for i, path in enumerate(source.paths):
        name = name_of(path)
        if name in index:
            raise ValueError(f'{dataset_type}: {key} has two images named {name!r}: '
                             f'{source.describe(source.paths[index[name]])} and {source.describe(path)}')
        index[name] = i
    return index


def pair_by_name(gt, lq, filename_tmpl, dataset_type, all_lq=True):
    """Pair the clean images of ``gt`` with the noisy images of ``lq`` by file name.

    Args:
        gt (ImageSource): Clean images (``dataroot_gt``).
        lq (ImageSource): Noisy images (``dataroot_lq``).
        filename_tmpl (str): Noisy name from the clean name without extension, ``'{}'`` for equal names
            (BasicSR's ``filename_tmpl``, e.g. ``'{}_noisy'``).
        dataset_type (str): Dataset class name, for messages.
        all_lq (bool): Every noisy image must have a clean partner (False when ``meta_info_file`` selects
            a subset of the clean images).

    Returns:
        list[tuple[int, int]]: ``(gt index, lq index)`` in the order of ``gt``.

    Raises:
        FileNotFoundError: An image without its partner (names the image and the folder searched).
        ValueError: Two images with the same name in one root (names both).
    """
    gt_index = _index_by_name(gt, 'dataroot_gt', dataset_type)
    lq_index = _index_by_name(lq, 'dataroot_lq', dataset_type)
    pairs = []
    for name, i in gt_index.items():
        lq_name = filename_tmpl.format(name)
        if lq_name not in lq_index:
            raise FileNotFoundError(f'{dataset_type}: clean image {gt.describe(gt.paths[i])} has no noisy partner: '
                                    f'no image named {lq_name!r} in dataroot_lq {lq.root!r}')
        pairs.append((i, lq_index[lq_name]))
    if all_lq:
        used = {j for _, j in pairs}
        for j, path in enumerate(lq.paths):
            if j not in used:
                raise FileNotFoundError(f'{dataset_type}: noisy image {lq.describe(path)} has no clean partner in '
                                        f'dataroot_gt {gt.root!r} (filename_tmpl {filename_tmpl!r})')
    return pairs


@DATASET_REGISTRY.register()
class PairedNoiseDataset(data.Dataset):
    """Real noisy/clean pairs: the same crop and flips on both images in training, whole images otherwise.

    Returns ``dict(lq, gt, lq_path, gt_path)``: CHW float32 tensors in [0, 1] (RGB order, BasicSR convention).

    Args:
        opt (dict): BasicSR dataset options:

            dataroot_lq (str): folder of noisy images, or a BasicSR LMDB (``io_backend: {type: lmdb}``).
            dataroot_gt (str): folder of clean images, or a BasicSR LMDB.
            io_backend (dict): ``{type: disk}`` (default) or ``{type: lmdb}`` for both roots.
            meta_info_file (str | None): BasicSR ``meta_info.txt`` listing the clean images to use (first
                column); default all of ``dataroot_gt``, and then every noisy image must have a partner too.
            filename_tmpl (str): noisy name from the clean name, both without extension. Default ``'{}'``
                (equal names); extensions may differ.
            color (str): ``rgb`` (default), ``gray`` or ``y``, applied to both images (see
                :func:`~nl_plugin.data.data_util.convert_color`). ``in_ch`` / ``num_ch`` (1 | 3) may be used instead.
            phase (str): ``train`` (random crop and augmentation) or ``val`` / ``test``. Set by BasicSR.
            gt_size (int | None): training crop size. None: whole images (batch size 1 then).
            use_hflip (bool), use_rot (bool): BasicSR's flips / 90-degree rotations. Default True.
    """

    def __init__(self, opt):
        super().__init__()
        name = type(self).__name__
        check_option_keys(opt, _KEYS, name)
        self.opt = opt
        self.phase = check_phase(opt, name)
        self.gt = ImageSource(opt, name)
        self.lq = _lq_source(opt, name)
        tmpl = opt.get('filename_tmpl', '{}')
        if not isinstance(tmpl, str) or tmpl.count('{}') != 1 or tmpl.replace('{}', '').count('{'):
            raise ValueError(f"{name}: filename_tmpl must contain '{{}}' exactly once (the clean name), got {tmpl!r}")
        self.pairs = pair_by_name(self.gt, self.lq, tmpl, name, all_lq=opt.get('meta_info_file') is None)
        self.color = parse_color(opt, name, default='rgb')
        self.gt_size = check_positive_int(opt.get('gt_size'), 'gt_size', name)
        self.use_hflip = bool(opt.get('use_hflip', True))
        self.use_rot = bool(opt.get('use_rot', True))

    def __len__(self):
        return len(self.pairs)

    def _read_pair(self, index):
        """The clean and the noisy image (float32 HWC, converted to the colour mode), checked to match."""
        i, j = self.pairs[index]
        gt = convert_color(self.gt.read(i), self.color)
        lq = convert_color(self.lq.read(j), self.color)
        if gt.shape != lq.shape:
            raise ValueError(f'{type(self).__name__}: noisy image {self.lq.describe(self.lq.paths[j])} is '
                             f'{lq.shape[0]}x{lq.shape[1]} (HxW) but its clean partner '
                             f'{self.gt.describe(self.gt.paths[i])} is {gt.shape[0]}x{gt.shape[1]}')
        return gt, lq

    def __getitem__(self, index):
        i, j = self.pairs[index]
        gt, lq = self._read_pair(index)
        if self.phase == 'train':
            if self.gt_size is not None:
                size = self.gt_size
                check_min_size(gt, size, self.gt.describe(self.gt.paths[i]), type(self).__name__)
                top, left = random.randint(0, gt.shape[0] - size), random.randint(0, gt.shape[1] - size)
                gt, lq = gt[top:top + size, left:left + size], lq[top:top + size, left:left + size]
            # one draw of flips / rotation for both images (BasicSR's augment on a list)
            gt, lq = augment([np.ascontiguousarray(gt), np.ascontiguousarray(lq)], self.use_hflip, self.use_rot)
        lq, gt = img2tensor([np.ascontiguousarray(lq), np.ascontiguousarray(gt)], bgr2rgb=True, float32=True)
        return {'lq': lq, 'gt': gt, 'lq_path': str(self.lq.paths[j]), 'gt_path': str(self.gt.paths[i])}
