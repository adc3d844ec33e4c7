"""Helpers shared by the nl_plugin datasets (no registration here).

Everything that BasicSR already provides is reused: :class:`basicsr.utils.FileClient` for the disk and
LMDB back ends, :func:`basicsr.data.data_util.paths_from_folder` / ``paths_from_lmdb`` for listing,
:func:`basicsr.utils.imfrombytes` for decoding. This module adds what they lack: errors that name the
offending file or option key, option-key validation, and seeds derived from image names.
"""
import difflib
import os
import os.path as osp
import re
import zlib

import cv2
import numpy as np
from basicsr.data.data_util import paths_from_folder, paths_from_lmdb
from basicsr.utils import FileClient, bgr2ycbcr, imfrombytes

from nl_plugin.data.lmdb_guard import lmdb_get, open_lmdb

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.ppm', '.pgm', '.webp')

#: Keys BasicSR itself puts in (or reads from) every dataset option dict: ``parse_options`` injects
#: ``phase`` and ``scale``; ``build_dataloader`` and ``train.py`` read the loader keys.
BASICSR_KEYS = frozenset({
    'type', 'name', 'phase', 'scale', 'batch_size_per_gpu', 'num_worker_per_gpu', 'use_shuffle',
    'dataset_enlarge_ratio', 'prefetch_mode', 'num_prefetch_queue', 'pin_memory', 'persistent_workers',
})

PHASES = ('train', 'val', 'test')

#: One FileClient per LMDB and per process tree. lmdb >= 3 refuses to open an environment twice in a
#: process (and a forked DataLoader worker inherits that bookkeeping), so datasets that share an LMDB
#: (train and val, or two instances) must share its handle; readonly, lock-free handles inherited
#: through fork() read fine in the worker.
_LMDB_CLIENTS = {}


def check_option_keys(opt, allowed, dataset_type):
    """Raise ``KeyError`` naming every key of ``opt`` that is neither in ``allowed`` nor a BasicSR key.

    Args:
        opt (dict): Dataset options.
        allowed (Iterable[str]): Keys the dataset understands.
        dataset_type (str): Dataset class name, used in the message.
    """
    valid = sorted(set(allowed) | BASICSR_KEYS)
    unknown = [k for k in opt if k not in valid]
    if unknown:
        hints = ''.join(f' ({k!r}: did you mean {difflib.get_close_matches(k, valid, n=1)[0]!r}?)'
                        for k in unknown if difflib.get_close_matches(k, valid, n=1))
        raise KeyError(f'{dataset_type}: unknown option key(s) {unknown}{hints}. Valid keys: {valid}')


def check_phase(opt, dataset_type):
    """Return ``opt['phase']`` (default ``'train'``, as BasicSR always sets it), validated."""
    phase = opt.get('phase', 'train')
    if phase not in PHASES:
        raise ValueError(f'{dataset_type}: phase must be one of {PHASES}, got {phase!r}')
    return phase


def as_range(value, key, dataset_type, low=0.0, allow_scalar=True, high=None):
    """Parse a number or a ``[lo, hi]`` pair into ``(lo, hi)`` (``lo == hi`` for a number).

    Raises ``ValueError`` naming ``key`` for a malformed pair, ``lo > hi`` or a value outside [low, high].
    """
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f'{dataset_type}: {key} must be a number or a [lo, hi] pair, got {value!r}')
        lo, hi = value
    elif allow_scalar:
        lo = hi = value
    else:
        raise ValueError(f'{dataset_type}: {key} must be a [lo, hi] pair, got {value!r}')
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f'{dataset_type}: {key} must be numeric, got {value!r}') from None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f'{dataset_type}: {key} must be finite, got {value!r}')
    if lo < low or hi < low:
        raise ValueError(f'{dataset_type}: {key} must be >= {low}, got {value!r}')
    if high is not None and (lo > high or hi > high):
        raise ValueError(f'{dataset_type}: {key} must be <= {high}, got {value!r}')
    if lo > hi:
        raise ValueError(f'{dataset_type}: {key} range must satisfy lo <= hi, got {value!r}')
    return lo, hi


def check_positive_int(value, key, dataset_type, allow_none=True):
    """Return ``value`` as an ``int`` > 0 (or ``None``), else raise ``ValueError`` naming ``key``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f'{dataset_type}: {key} must be a positive integer, got {value!r}')
    return int(value)


def parse_color(opt, dataset_type, choices=('gray', 'rgb', 'y'), default='gray'):
    """Resolve the colour mode from ``color`` and/or ``in_ch`` / ``num_ch`` (1 -> gray, 3 -> rgb).

    Returns:
        str: one of ``choices``.
    """
    color = opt.get('color')
    if color is not None:
        color = str(color).lower()
        color = {'grey': 'gray', 'l': 'gray', 'bgr': 'rgb', 'color': 'rgb', 'colour': 'rgb'}.get(color, color)
        if color not in choices:
            raise ValueError(f'{dataset_type}: color must be one of {list(choices)}, got {opt["color"]!r}')
    for key in ('in_ch', 'num_ch'):
        if opt.get(key) is None:
            continue
        ch = opt[key]
        if isinstance(ch, bool) or ch not in (1, 3):
            raise ValueError(f'{dataset_type}: {key} must be 1 (grayscale) or 3 (colour), got {ch!r}')
        implied = 'rgb' if ch == 3 else ('y' if color == 'y' else 'gray')
        if color is not None and implied != color:
            raise ValueError(f'{dataset_type}: {key}: {ch} contradicts color: {color!r}')
        color = implied
    return color or default


def name_of(path):
    """Image name without folder and extension: ``'a/b/img01.png' -> 'img01'``; an LMDB key is returned as is.

    Disk and LMDB paths of the same image therefore give the same name (BasicSR's LMDB keys are the
    file names without extension).
    """
    return osp.splitext(osp.basename(str(path)))[0]


def name_seed(path, noise_seed=0):
    """Deterministic 32-bit seed from an image name: ``zlib.crc32(name, noise_seed)`` (CRC32 of the name
    without extension, started from ``noise_seed``; plain ``zlib.crc32(name)`` for the default 0).

    Independent of the dataset order, the worker, the process and ``PYTHONHASHSEED``, so every
    validation run sees the same degraded image. (32 bits: torch's CPU generator uses only 32 seed bits.)
    """
    return zlib.crc32(name_of(path).encode('utf-8'), int(noise_seed) % (1 << 32))


class ImageSource:
    """The list of images of one dataset and the means to read them (disk folder or BasicSR LMDB).

    Args:
        opt (dict): Dataset options; reads ``dataroot_gt``, ``io_backend`` and ``meta_info_file``.
        dataset_type (str): Dataset class name, for messages.

    Disk: ``meta_info_file`` (first token of every line, relative to ``dataroot_gt``) if given, else
    every image file directly in ``dataroot_gt`` (sorted). LMDB: ``dataroot_gt`` must be a BasicSR LMDB
    (``*.lmdb`` with ``meta_info.txt``); the keys come from its ``meta_info.txt`` (or ``meta_info_file``).
    """

    def __init__(self, opt, dataset_type):
        self.dataset_type = dataset_type
        root = opt.get('dataroot_gt')
        if root is None:
            raise KeyError(f'{dataset_type}: the option dataroot_gt is required')
        self.root = osp.expanduser(str(root))
        io_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        if 'type' not in io_opt:
            raise KeyError(f'{dataset_type}: io_backend needs a type (disk or lmdb), got {io_opt!r}')
        self.backend = io_opt.pop('type')
        if self.backend not in ('disk', 'lmdb'):
            raise ValueError(f'{dataset_type}: io_backend.type must be disk or lmdb, got {self.backend!r}')
        meta = opt.get('meta_info_file')
        if not osp.exists(self.root):
            raise FileNotFoundError(f'{dataset_type}: dataroot_gt {self.root!r} does not exist')
        if meta is not None and not osp.isfile(meta):
            raise FileNotFoundError(f'{dataset_type}: meta_info_file {meta!r} does not exist')

        if self.backend == 'lmdb':
            if not osp.isfile(osp.join(self.root, 'meta_info.txt')):
                raise FileNotFoundError(f'{dataset_type}: dataroot_gt {self.root!r} is not a BasicSR LMDB '
                                        '(no meta_info.txt; make one with scripts/create_lmdb.py)')
            if meta is None:
                self.paths = paths_from_lmdb(self.root)  # keys = names without extension
            else:
                self.paths = [name_of(n) for n in _meta_names(meta)]
            self._io_kwargs = dict(io_opt, db_paths=[self.root], client_keys=['gt'])
        else:
            if not osp.isdir(self.root):
                raise NotADirectoryError(f'{dataset_type}: dataroot_gt {self.root!r} is not a folder')
            if meta is None:
                self.paths = sorted(p for p in paths_from_folder(self.root) if p.lower().endswith(IMG_EXTENSIONS))
            else:
                self.paths = [osp.join(self.root, n) for n in _meta_names(meta)]
            if io_opt:
                raise KeyError(f'{dataset_type}: io_backend type disk takes no other keys, got {sorted(io_opt)}')
            self._io_kwargs = io_opt
        if not self.paths:
            raise ValueError(f'{dataset_type}: no images found in dataroot_gt {self.root!r}'
                             + (f' (meta_info_file {meta!r})' if meta else ''))
        self._client = None  # never pickled (see __getstate__)
        if self.backend == 'lmdb':
            self._get_client()  # a missing, empty or truncated LMDB fails here, naming it

    def __len__(self):
        return len(self.paths)

    def __getstate__(self):  # spawn-started DataLoader workers pickle the dataset: no open handles
        state = dict(self.__dict__)
        state['_client'] = None
        return state

    def _get_client(self):
        if self._client is None:
            if self.backend == 'lmdb':
                key = (osp.realpath(self.root), tuple(sorted((k, repr(v)) for k, v in self._io_kwargs.items())))
                if key not in _LMDB_CLIENTS:
                    _LMDB_CLIENTS[key] = open_lmdb(self.root, self._io_kwargs, self.dataset_type)
                self._client = _LMDB_CLIENTS[key]
            else:
                self._client = FileClient('disk')
        return self._client

    def describe(self, path):
        """Human-readable location of ``path`` for error messages."""
        return f'{path!r} in LMDB {self.root!r}' if self.backend == 'lmdb' else repr(str(path))

    def read(self, index):
        """Read image ``index`` as a float32 HWC array in [0, 1] (BGR order, or HxWx1 for gray files).

        Raises ``FileNotFoundError`` for a missing file / LMDB key and ``ValueError`` for undecodable bytes,
        both naming the file.
        """
        path = self.paths[index]
        client = self._get_client()
        if self.backend == 'disk':
            if not osp.isfile(path):
                raise FileNotFoundError(f'{self.dataset_type}: image file {str(path)!r} does not exist')
            content = client.get(path)
        else:
            content = lmdb_get(client, path, self.root, self.dataset_type)
            if content is None:
                raise FileNotFoundError(f'{self.dataset_type}: key {path!r} is missing from LMDB {self.root!r}')
        return decode_image(content, self.describe(path), self.dataset_type)

    def image_sizes(self):
        """(h, w) of every image without decoding it (LMDB: its ``meta_info.txt``; disk: the file header).

        None where the size is unknown (unreadable header, image missing from ``meta_info.txt``).
        """
        if self.backend == 'lmdb':
            shapes = {}
            with open(osp.join(self.root, 'meta_info.txt')) as f:
                for line in f:
                    m = re.match(r'\s*([^\s.]+)\S*\s+\((\d+),\s*(\d+)', line)
                    if m:
                        shapes[m.group(1)] = (int(m.group(2)), int(m.group(3)))
            return [shapes.get(str(p)) for p in self.paths]
        from PIL import Image
        sizes = []
        for p in self.paths:
            try:
                with Image.open(p) as im:
                    sizes.append((im.height, im.width))
            except (OSError, ValueError, Image.DecompressionBombError):
                sizes.append(None)
        return sizes

    def check_all(self, threads=None):
        """Read and decode every image (``--check_data``); raise one ``ValueError`` listing every failure."""
        from concurrent.futures import ThreadPoolExecutor

        def probe(index):
            try:
                self.read(index)
            except (OSError, ValueError) as err:
                return str(err)
            return None

        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            errors = [e for e in pool.map(probe, range(len(self.paths))) if e]
        if errors:
            more = f' (and {len(errors) - 5} more)' if len(errors) > 5 else ''
            raise ValueError(f'{self.dataset_type}: {len(errors)} of {len(self.paths)} image(s) in {self.root!r} '
                             f'cannot be used: ' + ' | '.join(errors[:5]) + more)


def _meta_names(meta_file):
    with open(meta_file) as f:
        return [line.strip().split(' ')[0] for line in f if line.strip()]


def decode_image(content, where, dataset_type='image'):
    """Decode image bytes to float32 HWC in [0, 1]: BGR colour, or HxWx1 gray; alpha is dropped.

    8-bit and 16-bit files are supported (16-bit is divided by 65535).
    """
    img = None
    if content:
        try:
            img = imfrombytes(content, flag='unchanged')
        except cv2.error:
            img = None
    if img is None:
        raise ValueError(f'{dataset_type}: cannot decode image {where} (corrupt or not an image file)')
    if img.ndim == 2:
        img = img[:, :, None]
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.shape[2] not in (1, 3):
        raise ValueError(f'{dataset_type}: image {where} has {img.shape[2]} channels; expected 1, 3 or 4')
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    raise ValueError(f'{dataset_type}: image {where} has unsupported pixel type {img.dtype} (need 8 or 16 bit)')


def convert_color(img, color):
    """Convert a float32 HWC [0, 1] BGR (or HxWx1) image to the requested colour mode.

    - ``'gray'``: ``cv2.COLOR_BGR2GRAY`` (ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B, full range, the
      same weights as PIL's ``convert('L')`` that the papers' loaders used), rounded to 8-bit levels like
      a stored gray image; 1-channel inputs are kept as they are.
    - ``'y'``: MATLAB-style Y in [16, 235] / 255 via BasicSR's ``bgr2ycbcr(y_only=True)`` on the 8-bit
      image (rounded, as MATLAB's ``rgb2ycbcr`` on uint8); 1-channel inputs are taken as Y already.
    - ``'rgb'``: unchanged (3 channels BGR; 1-channel inputs are replicated).

    Returns:
        ndarray: float32 HxWx1 (gray / y) or HxWx3 (rgb, BGR order).
    """
    if color == 'rgb':
        return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
    if img.shape[2] == 1:
        return img
    u8 = to_uint8(img)
    if color == 'gray':
        out = cv2.cvtColor(u8, cv2.COLOR_BGR2GRAY)
    elif color == 'y':
        out = bgr2ycbcr(u8, y_only=True)
    else:
        raise ValueError(f'unknown colour mode {color!r}')
    return (out.astype(np.float32) / 255.0)[:, :, None]


def to_uint8(img):
    """float [0, 1] -> uint8 with rounding (exact for images that came from 8-bit files)."""
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def check_min_size(img, size, where, dataset_type, key='gt_size'):
    """Raise ``ValueError`` naming the file and both sizes if ``img`` is smaller than ``size`` x ``size``."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f'{dataset_type}: image {where} is {h}x{w} (HxW), smaller than {key} {size}x{size}; '
                         f'remove it from the training set or lower {key}')


def image_files(folder):
    """Sorted image file names (not paths) directly inside ``folder``."""
    return sorted(n for n in os.listdir(folder)
                  if not n.startswith('.') and n.lower().endswith(IMG_EXTENSIONS) and osp.isfile(osp.join(folder, n)))
