"""Patch grid of the N3 block: padding so that patches tile the image, patch extraction, col2im folding."""
import torch
import torch.nn.functional as F

from ..amp import to_accum

__all__ = ['patch_grid_padding', 'pad_to_patch_grid', 'patch_grid_shape', 'extract_patches', 'fold_patches',
           'overlap_count']


def _pad_1d(n, patch_size, stride):
    """(before, after) padding of one axis: the official rule ``(-(n - p)) mod s``, split floor/ceil.

    Extents smaller than one patch are padded up to exactly one patch (the official code does not
    handle them).
    """
    total = patch_size - n if n < patch_size else (-(n - patch_size)) % stride
    return total // 2, total - total // 2


def patch_grid_padding(h: int, w: int, patch_size: int, stride: int) -> tuple[int, int, int, int]:
    """Zero padding that makes ``patch_size`` patches at ``stride`` tile an image exactly.

    Official rule: ``pad = (-(H - p)) mod s`` rows, ``floor(pad / 2)`` on top and the rest at the
    bottom; the same for columns. Images smaller than a patch are padded to one patch.

    Args:
        h (int): Image height.
        w (int): Image width.
        patch_size (int): Patch side ``p``.
        stride (int): Patch stride ``s``.

    Returns:
        tuple[int]: ``(left, right, top, bottom)`` in :func:`torch.nn.functional.pad` order.
    """
    if patch_size <= 0 or stride <= 0:
        raise ValueError(f'patch_size and stride must be positive, got {patch_size} and {stride}')
    top, bottom = _pad_1d(h, patch_size, stride)
    left, right = _pad_1d(w, patch_size, stride)
    return left, right, top, bottom


def pad_to_patch_grid(x: torch.Tensor, patch_size: int, stride: int, pad: tuple[int, int, int, int] | None = None
                      ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad ``x`` (B, C, H, W) with :func:`patch_grid_padding` (or the given ``pad``).

    Returns:
        tuple: The padded tensor (B, C, H', W') and the padding ``(left, right, top, bottom)``.
    """
    if pad is None:
        pad = patch_grid_padding(x.shape[-2], x.shape[-1], patch_size, stride)
    return (F.pad(x, pad) if any(pad) else x), pad


def patch_grid_shape(h: int, w: int, patch_size: int, stride: int) -> tuple[int, int]:
    """Number of patch rows and columns ``(nh, nw)`` of an image that the patches tile exactly."""
    if h < patch_size or w < patch_size or (h - patch_size) % stride or (w - patch_size) % stride:
        raise ValueError(f'a {h}x{w} image is not tiled exactly by {patch_size}x{patch_size} patches at '
                         f'stride {stride}; pad it with pad_to_patch_grid first')
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def extract_patches(x: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """All ``p x p`` patches at stride ``s`` of an exactly tiled image, row-major over the grid.

    Args:
        x (Tensor): (B, C, H, W) with ``(H - p) % s == 0`` and ``(W - p) % s == 0``.
        patch_size (int): ``p``.
        stride (int): ``s``.

    Returns:
        Tensor: (B, L, C*p*p), ``L = nh * nw``.
    """
    patch_grid_shape(x.shape[-2], x.shape[-1], patch_size, stride)
    return F.unfold(x, patch_size, stride=stride).transpose(1, 2)


def fold_patches(patches: torch.Tensor, out_size: tuple[int, int], patch_size: int, stride: int,
                 average: bool = True) -> torch.Tensor:
    """Inverse of :func:`extract_patches`: overlap-add patches back into an image (col2im).

    With ``average=True`` every pixel is divided by the number of patches covering it (official:
    col2im of the patches divided by col2im of ones).

    Args:
        patches (Tensor): (B, L, C*p*p).
        out_size (tuple[int]): ``(H, W)`` of the exactly tiled image.
        patch_size (int): ``p``.
        stride (int): ``s``.
        average (bool): Divide by the overlap count. Default: True.

    Returns:
        Tensor: (B, C, H, W), in at least fp32.
    """
    nh, nw = patch_grid_shape(out_size[0], out_size[1], patch_size, stride)
    if patches.shape[1] != nh * nw:
        raise ValueError(f'{patches.shape[1]} patches do not fill a {nh}x{nw} grid for size {tuple(out_size)}')
    patches = to_accum(patches)  # overlap sums in at least fp32
    out = F.fold(patches.transpose(1, 2), tuple(out_size), patch_size, stride=stride)
    if average:
        out = out / overlap_count(out_size, patch_size, stride, patches.device, patches.dtype)
    return out


def overlap_count(out_size: tuple[int, int], patch_size: int, stride: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Number of patches covering each pixel, (1, 1, H, W)."""
    nh, nw = patch_grid_shape(out_size[0], out_size[1], patch_size, stride)
    ones = torch.ones(1, patch_size * patch_size, nh * nw, device=device, dtype=dtype)
    return F.fold(ones, tuple(out_size), patch_size, stride=stride)
