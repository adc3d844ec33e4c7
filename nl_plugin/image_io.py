"""Reading and writing users' photos for inference: 8/16-bit PNG, JPEG, TIFF, bit depth kept, colour planes.

Images are float32 arrays in [0, 1], (H, W, C) in OpenCV's BGR order; the network sees what the
training datasets gave it (``nl_plugin.data``): one plane for a 1-channel network (gray, MATLAB-style
Y, or each of R, G, B in turn), RGB for a 3-channel one.
"""
import os

import cv2
import numpy as np

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.webp')
COLOR_MODES = ('gray', 'y', 'rgb')
_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class ImageError(ValueError):
    """An image that cannot be read or written (one-line message naming the file)."""


def read_image(path):
    """Read an image with its bit depth.

    Args:
        path (str): Image file.

    Returns:
        tuple[np.ndarray, np.dtype, np.ndarray | None]: (H, W, C) float32 in [0, 1] (C = 1 or 3, BGR),
        the file's sample type (uint8, uint16 or float32), and the alpha plane (H, W) in [0, 1] or None.
    """
    data = np.fromfile(path, dtype=np.uint8) if os.path.isfile(path) else None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
    if img is None:
        raise ImageError(f'{path}: cannot be read as an image')
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


def write_image(path, img, dtype, alpha=None):
    """Write a float image in [0, 1] with the given sample type (JPEG and BMP are always 8-bit).

    Args:
        path (str): Output file; its extension picks the format.
        img (np.ndarray): (H, W, C) or (H, W), BGR.
        dtype (np.dtype): uint8, uint16 or float32 (TIFF only).
        alpha (np.ndarray, optional): (H, W) alpha plane to append to a 3-channel image.

    Returns:
        np.dtype: The sample type written.
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
    ok, buf = cv2.imencode(ext, out, params)
    if not ok:
        raise ImageError(f'{path}: cannot be encoded as {ext}')
    buf.tofile(path)
    return dtype


def bgr_to_ycbcr(img):
    """(H, W, 3) BGR in [0, 1] -> MATLAB-style YCbCr in [16, 240] / 255 (BasicSR's ``bgr2ycbcr``)."""
    from basicsr.utils import bgr2ycbcr
    return bgr2ycbcr(img.astype(np.float32), y_only=False).astype(np.float32)


def ycbcr_to_bgr(img):
    from basicsr.utils.color_util import ycbcr2bgr
    return ycbcr2bgr(img.astype(np.float32)).astype(np.float32)


def resize(img, scale):
    """MATLAB-compatible bicubic resize (BasicSR's ``imresize``, as ``BicubicDegradationDataset`` uses)."""
    if scale == 1 or img is None:
        return img
    from basicsr.utils.matlab_functions import imresize
    squeeze = img.ndim == 2
    out = imresize(img[:, :, None] if squeeze else img, scale)
    return out[:, :, 0] if squeeze else out


def to_planes(img, color, net_ch):
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


def list_images(src):
    """The image files of a file or folder (sorted; a folder's subfolders are not searched)."""
    if os.path.isdir(src):
        files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise ImageError(f'{src}: no image files ({", ".join(IMAGE_EXTS)}) in this folder')
        return files
    if not os.path.exists(src):
        raise ImageError(f'{src}: no such file or folder')
    return [src]


__all__ = ['read_image', 'write_image', 'to_planes', 'list_images', 'resize', 'ImageError', 'COLOR_MODES']
