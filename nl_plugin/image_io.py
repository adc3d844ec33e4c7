"""Reading and writing users' photos for inference: 8/16-bit PNG, JPEG, TIFF, bit depth kept, colour planes.

Images are float32 arrays in [0, 1], (H, W, C) in OpenCV's BGR order; the network sees what the
training datasets gave it (``nl_plugin.data``): one plane for a 1-channel network (gray, MATLAB-style
Y, or each of R, G, B in turn), RGB for a 3-channel one.

Image bombs: :func:`read_image` reads the width and height from the file's header (:func:`header_size`, a few
bytes of PNG, JPEG, TIFF, BMP or WebP) and refuses an image of more than ``max_pixels`` before anything is
decoded: a 400 KB PNG can claim 20000x20000 pixels and decode to gigabytes. OpenCV decodes whole images, so
one image's memory is bounded by this limit, not by the tiles the network runs in. The header is read as the
decoder reads it (the first of duplicate TIFF tags), and an image that decodes to another size is refused.
"""
from __future__ import annotations

import os
import struct
from typing import Callable

import cv2
import numpy as np

from nl_plugin import fileio

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')
COLOR_MODES = ('gray', 'y', 'rgb')
_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
#: default pixel limit of :func:`read_image`: Pillow's ``MAX_IMAGE_PIXELS`` (2**28 / 3, a 256 MiB 8-bit RGB
#: image, about 9459x9459), the limit photo tools already apply to files from elsewhere
MAX_PIXELS = 89_478_485
_FORMATS = 'PNG, JPEG, TIFF, BMP or WebP'
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # start-of-frame markers (not DHT, JPG, DAC)
# Bytes of garbage and fill a JPEG's header may hold between its segments in all (a real file has none or a few):
# past them the header counts as damaged, so a file of megabytes without a marker is not scanned to its end.
_JPEG_SKIP = 2**20


class ImageError(ValueError):
    """An image that cannot be read or written (one-line message naming the file)."""


def _png_size(f):
    head = f.read(24)
    if len(head) < 24 or head[12:16] != b'IHDR':
        return None
    return struct.unpack('>II', head[16:24])


def _jpeg_marker(f, budget: int) -> tuple[int | None, int]:
    """The next marker code after the file position and the bytes skipped before it: anything but 0xFF, then
    0xFF fill (decoders skip both between segments). Reads in growing chunks, at most about ``budget`` bytes
    skipped; the code is None at the end of the file or past the budget. The file is left after the code."""
    size, skipped, fill = 64, 0, False
    while skipped <= budget:
        chunk = f.read(size)
        if not chunk:
            return None, skipped
        if not fill:
            start = chunk.find(b'\xff')
            if start < 0:
                skipped += len(chunk)
                size = min(2 * size, 2**16)
                continue
            skipped += start
            chunk, fill = chunk[start + 1:], True
        rest = chunk.lstrip(b'\xff')
        skipped += len(chunk) - len(rest)
        if rest:
            f.seek(1 - len(rest), os.SEEK_CUR)
            return rest[0], skipped
        size = min(2 * size, 2**16)
    return None, skipped


def _jpeg_size(f):
    f.seek(2)
    budget = _JPEG_SKIP
    for _ in range(100_000):                      # segments; a real file reaches its frame header in a few
        marker, skipped = _jpeg_marker(f, budget)
        budget -= skipped
        if marker is None:
            return None
        if marker in (0x01, *range(0xD0, 0xD9)):  # TEM, RSTn, SOI: no length
            continue
        if marker == 0xD9:                        # EOI before any frame
            return None
        length = f.read(2)
        if len(length) < 2:
            return None
        if marker in _JPEG_SOF:
            frame = f.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack('>HH', frame[1:5])
            return width, height
        f.seek(struct.unpack('>H', length)[0] - 2, os.SEEK_CUR)
    return None


def _tiff_size(f):
    head = f.read(16)
    order = {b'II': '<', b'MM': '>'}.get(head[:2])
    if order is None or len(head) < 16:
        return None
    magic = struct.unpack(order + 'H', head[2:4])[0]
    big = magic == 43                                         # BigTIFF: 8-byte offsets and counts
    offset = struct.unpack(order + ('Q' if big else 'I'), head[8:16] if big else head[4:8])[0]
    f.seek(offset)
    count_fmt, entry_size = ('Q', 20) if big else ('H', 12)
    raw = f.read(struct.calcsize(count_fmt))
    if len(raw) < struct.calcsize(count_fmt):
        return None
    count = min(struct.unpack(order + count_fmt, raw)[0], 4096)
    dims = {}
    for _ in range(count):
        entry = f.read(entry_size)
        if len(entry) < entry_size:
            break
        tag, kind = struct.unpack(order + 'HH', entry[:4])
        if tag not in (256, 257) or tag in dims:      # libtiff keeps the first of duplicate tags, so does this
            continue
        fmt = {1: 'B', 3: 'H', 4: 'I', 16: 'Q'}.get(kind)
        if fmt is None:                               # a type libtiff would read or refuse: not ours to guess
            return None
        dims[tag] = struct.unpack_from(order + fmt, entry[12:] if big else entry[8:])[0]
    return (dims[256], dims[257]) if len(dims) == 2 else None


def _bmp_size(f):
    head = f.read(26)
    if len(head) < 26:
        return None
    if struct.unpack('<I', head[14:18])[0] == 12:             # OS/2 BITMAPCOREHEADER
        return struct.unpack('<HH', head[18:22])
    width, height = struct.unpack('<ii', head[18:26])
    return abs(width), abs(height)


def _webp_size(f):
    head = f.read(30)
    if len(head) < 30 or head[8:12] != b'WEBP':
        return None
    chunk = head[12:16]
    if chunk == b'VP8 ':
        width, height = struct.unpack('<HH', head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b'VP8L':
        bits = struct.unpack('<I', head[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b'VP8X':
        return int.from_bytes(head[24:27], 'little') + 1, int.from_bytes(head[27:30], 'little') + 1
    return None


_SIGNATURES = ((b'\x89PNG\r\n\x1a\n', _png_size), (b'\xff\xd8', _jpeg_size), (b'II*\x00', _tiff_size),
               (b'MM\x00*', _tiff_size), (b'II+\x00', _tiff_size), (b'MM\x00+', _tiff_size),
               (b'BM', _bmp_size), (b'RIFF', _webp_size))


def header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, TIFF (first page), BMP or WebP file, without decoding.

    Returns:
        tuple[int, int] | None: None for another format or a header that cannot be parsed.

    Raises:
        OSError: the file cannot be opened.
    """
    with open(path, 'rb') as f:
        magic = f.read(8)
        for signature, reader in _SIGNATURES:
            if magic.startswith(signature):
                f.seek(0)
                try:
                    return reader(f)
                except (struct.error, ValueError, OSError):
                    return None
    return None


def check_pixels(path: str, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file, refused with a one-line :class:`ImageError` above ``max_pixels``.

    Args:
        path (str): Image file.
        max_pixels (int | None): Largest width x height accepted; None or 0: no limit (the header must
            still be readable).
    """
    try:
        size = header_size(path)
    except OSError as err:
        raise ImageError(f'{path}: cannot be read ({err.strerror or err})') from None
    if size is None:
        raise ImageError(f'{path}: cannot be read as an image (not a {_FORMATS} file, or a damaged header)')
    width, height = size
    if max_pixels and width * height > max_pixels:
        raise ImageError(f'{path}: {width}x{height} = {width * height:,} pixels is more than the limit of '
                         f'{max_pixels:,} (a decompression bomb?); raise it with --max-pixels')
    return width, height


def read_image(path: str, max_pixels: int | None = MAX_PIXELS) -> tuple[np.ndarray, np.dtype, np.ndarray | None]:
    """Read an image with its bit depth, after checking its size in the header (see :func:`check_pixels`).

    Args:
        path (str): Image file.
        max_pixels (int | None): Pixel limit (None or 0: none).

    Returns:
        tuple[np.ndarray, np.dtype, np.ndarray | None]: (H, W, C) float32 in [0, 1] (C = 1 or 3, BGR),
        the file's sample type (uint8, uint16 or float32), and the alpha plane (H, W) in [0, 1] or None.

    Raises:
        ImageError: unreadable, of another format, too large or not decodable (the message names the file).
    """
    if not os.path.isfile(path):
        raise ImageError(f'{path}: cannot be read as an image')
    width, height = check_pixels(path, max_pixels)
    try:
        data = np.fromfile(path, dtype=np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as err:
        reason = _cv2_reason(err)
        hint = ('; OpenCV decodes at most 2**30 pixels unless OPENCV_IO_MAX_IMAGE_PIXELS is set in the environment'
                if 'CV_IO_MAX_IMAGE_PIXELS' in reason else '')
        raise ImageError(f'{path}: cannot be decoded (OpenCV: {reason}){hint}') from None
    except OSError as err:
        raise ImageError(f'{path}: cannot be read ({err.strerror or err})') from None
    if img is None:
        raise ImageError(f'{path}: cannot be read as an image')
    # The limit holds for what was decoded: a header this module reads otherwise than the decoder is refused.
    # IMREAD_UNCHANGED keeps the stored orientation (no EXIF rotation), so the sizes agree for every valid file.
    if img.shape[:2] != (height, width):
        raise ImageError(f'{path}: its header says {width}x{height} pixels but it decodes to '
                         f'{img.shape[1]}x{img.shape[0]} (a damaged or crafted file)')
    dtype = img.dtype
    if dtype in _MAX:
        img = img.astype(np.float32) / _MAX[dtype]
    elif dtype == np.float32:
        img = np.clip(img, 0.0, 1.0)
    else:
        raise ImageError(f'{path}: {dtype} samples are not supported (8/16-bit integer or 32-bit float)')
    if img.ndim == 2:
        img = img[:, :, None]
    alpha = None
    if img.shape[2] == 4:
        img, alpha = img[:, :, :3], img[:, :, 3]
    elif img.shape[2] == 2:
        img, alpha = img[:, :, :1], img[:, :, 1]
    return np.ascontiguousarray(img), dtype, alpha


def _cv2_reason(err: Exception) -> str:
    """The message of a ``cv2.error`` on one line (OpenCV puts its file and function on the first ones)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return (getattr(err, 'err', None) or (lines[-1] if lines else type(err).__name__)).strip()


def write_image(path: str, img: np.ndarray, dtype: np.dtype, alpha: np.ndarray | None = None,
                overwrite: bool = True) -> np.dtype:
    """Write a float image in [0, 1] with the given sample type (JPEG and BMP are always 8-bit).

    The file is encoded in memory and written atomically (``nl_plugin.fileio``): a killed run or a full disk
    leaves no torn file under ``path``.

    Args:
        path (str): Output file; its extension picks the format.
        img (np.ndarray): (H, W, C) or (H, W), BGR.
        dtype (np.dtype): uint8, uint16 or float32 (TIFF only).
        alpha (np.ndarray, optional): (H, W) alpha plane to append to a 3-channel image.
        overwrite (bool): Replace an existing file; if False, a file that exists (even one another process
            made while this one encoded) is kept and :class:`nl_plugin.fileio.FileExistsWriteError` raised.

    Returns:
        np.dtype: The sample type written.

    Raises:
        ImageError: the image cannot be encoded. nl_plugin.fileio.WriteError: it cannot be written.
    """
    ext = os.path.splitext(path)[1].lower()
    img = np.clip(img, 0.0, 1.0)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if alpha is not None and img.ndim == 3:
        img = np.concatenate([img, np.clip(alpha, 0, 1)[:, :, None]], axis=2)
    if ext in ('.jpg', '.jpeg', '.bmp', '.webp') and np.dtype(dtype) != np.uint8:
        dtype = np.uint8
    if np.dtype(dtype) == np.float32 and ext not in ('.tif', '.tiff'):
        dtype = np.uint16
    dtype = np.dtype(dtype)
    out = img.astype(np.float32) if dtype == np.float32 else np.round(img * _MAX[dtype]).astype(dtype)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in ('.jpg', '.jpeg') else []
    try:
        ok, buf = cv2.imencode(ext, out, params)
    except cv2.error as err:
        raise ImageError(f'{path}: cannot be encoded as {ext} ({_cv2_reason(err)})') from None
    if not ok:
        raise ImageError(f'{path}: cannot be encoded as {ext}')
    fileio.atomic_write_bytes(path, buf.tobytes(), overwrite=overwrite)
    return dtype


def bgr_to_ycbcr(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) BGR in [0, 1] -> MATLAB-style YCbCr in [16, 240] / 255 (BasicSR's ``bgr2ycbcr``)."""
    from basicsr.utils import bgr2ycbcr
    return bgr2ycbcr(img.astype(np.float32), y_only=False).astype(np.float32)


def ycbcr_to_bgr(img: np.ndarray) -> np.ndarray:
    from basicsr.utils.color_util import ycbcr2bgr
    return ycbcr2bgr(img.astype(np.float32)).astype(np.float32)


def resize(img: np.ndarray | None, scale: int) -> np.ndarray | None:
    """MATLAB-compatible bicubic resize (BasicSR's ``imresize``, as ``BicubicDegradationDataset`` uses)."""
    if scale == 1 or img is None:
        return img
    from basicsr.utils.matlab_functions import imresize
    squeeze = img.ndim == 2
    out = imresize(img[:, :, None] if squeeze else img, scale)
    return out[:, :, 0] if squeeze else out


def to_planes(img: np.ndarray, color: str,
              net_ch: int) -> tuple[list[np.ndarray], Callable[[list[np.ndarray], int], np.ndarray]]:
    """Split an image into the network inputs and say how to put the outputs back together.

    Args:
        img (np.ndarray): (H, W, C) BGR float image, C = 1 or 3.
        color (str): ``gray`` (colour -> cv2 gray, output gray), ``y`` (restore MATLAB Y, keep Cb/Cr)
            or ``rgb`` (1-channel network: each of R, G, B in turn; 3-channel network: RGB).
        net_ch (int): Image channels the network takes (1 or 3).

    Returns:
        tuple[list[np.ndarray], callable]: (H, W, net_ch) inputs (RGB order for 3 channels) and
        ``merge(outputs, scale)`` giving the (H*s, W*s, C') BGR result (Cb/Cr resized by ``scale``).
    """
    c = img.shape[2]
    if net_ch == 3:
        if color != 'rgb':
            raise ValueError(f'--color {color}: the network takes 3 channels; use --color rgb')
        rgb = np.repeat(img, 3, axis=2) if c == 1 else img[:, :, ::-1]
        return [np.ascontiguousarray(rgb)], lambda outs, s: (outs[0][:, :, ::-1] if c == 3 else
                                                             outs[0].mean(axis=2, keepdims=True))
    if net_ch != 1:
        raise ValueError(f'the network takes {net_ch} input channels; only 1 (gray/Y) or 3 (RGB) images are supported')
    if c == 1:
        return [img], lambda outs, s: outs[0]
    if color == 'gray':
        return [cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[:, :, None]], lambda outs, s: outs[0]
    if color == 'y':
        ycc = bgr_to_ycbcr(img)

        def merge_y(outs, s):
            return ycbcr_to_bgr(np.concatenate([outs[0], resize(ycc[:, :, 1:], s)], axis=2))
        return [ycc[:, :, :1]], merge_y
    return [img[:, :, i:i + 1] for i in range(3)], lambda outs, s: np.concatenate(outs, axis=2)


def list_images(src: str) -> list[str]:
    """The image files of a file or folder (sorted; a folder's subfolders are not searched)."""
    if os.path.isdir(src):
        try:
            names = os.listdir(src)
        except OSError as err:
            raise ImageError(f'{src}: cannot be listed ({err.strerror or err})') from None
        files = sorted(os.path.join(src, f) for f in names if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise ImageError(f'{src}: no image files ({", ".join(IMAGE_EXTS)}) in this folder')
        return files
    if not os.path.exists(src):
        raise ImageError(f'{src}: no such file or folder')
    return [src]


__all__ = ['read_image', 'write_image', 'header_size', 'check_pixels', 'MAX_PIXELS',
           'to_planes', 'list_images', 'resize', 'ImageError', 'COLOR_MODES']
