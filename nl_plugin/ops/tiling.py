"""Test-time helpers: overlapping-tile inference and x8 self-ensemble (pure functions, no BasicSR).

``tiled_forward`` also implements NLRN's official test protocol: 45x45 tiles at stride 7, the last
tile of each row/column flush with the border, tiles run in batches of 100, overlaps averaged.
``tile_starts`` also lays out the query tiles of the N3 block's tiled search (:mod:`nl_plugin.ops.n3.tiled`).
"""
from collections.abc import Callable

import torch


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``; the last tile ends exactly at ``length``.

    Args:
        length (int): Extent of the image along one axis.
        tile (int): Tile extent (clamped to ``length``).
        stride (int): Step between consecutive tiles (> 0).

    Returns:
        list[int]: Sorted, unique start offsets (tiles of NLRN's test protocol, and of the N3 block's
        tiled search).
    """
    if stride <= 0:
        raise ValueError(f'tile stride must be positive, got {stride}')
    tile = min(tile, length)
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)  # last tile flush with the border (official NLRN protocol)
    return starts


@torch.no_grad()
def tiled_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_size: int,
                  stride: int | None = None, overlap: int | None = None, tile_batch: int = 1,
                  scale: int = 1) -> torch.Tensor:
    """Run ``fn`` on overlapping tiles of ``x`` and average the overlaps.

    Memory is bounded by ``tile_batch`` tiles at a time, whatever the image size.

    Args:
        fn (callable): Maps a (b, C, t, t) tensor to (b, C', t*scale, t*scale).
        x (Tensor): Input of shape (N, C, H, W).
        tile_size (int): Tile side ``t`` in input pixels (clamped to H and W).
        stride (int, optional): Step between tiles. Default: ``tile_size - overlap``.
        overlap (int, optional): Overlap between tiles, used when ``stride`` is None. Default: 0.
        tile_batch (int): Number of tiles per call of ``fn``. Default: 1.
        scale (int): Output/input size ratio of ``fn``. Default: 1.

    Returns:
        Tensor: (N, C', H*scale, W*scale), each pixel the mean of every tile output covering it.
    """
    if x.dim() != 4:
        raise ValueError(f'tiled_forward expects (N, C, H, W), got shape {tuple(x.shape)}')
    if tile_size <= 0:
        raise ValueError(f'tile size must be positive, got {tile_size}')
    if stride is None:
        overlap = 0 if overlap is None else overlap
        if not 0 <= overlap < tile_size:
            raise ValueError(f'tile overlap must be in [0, tile size={tile_size}), got {overlap}')
        stride = tile_size - overlap
    n, _, h, w = x.shape
    th, tw = min(tile_size, h), min(tile_size, w)
    boxes = [(i, j) for i in tile_starts(h, th, stride) for j in tile_starts(w, tw, stride)]
    out = weight = None
    for b in range(n):
        for k in range(0, len(boxes), tile_batch):
            chunk = boxes[k:k + tile_batch]
            tiles = torch.stack([x[b, :, i:i + th, j:j + tw] for i, j in chunk])
            y = fn(tiles)
            if out is None:
                out = y.new_zeros(n, y.shape[1], h * scale, w * scale)
                weight = y.new_zeros(1, 1, h * scale, w * scale)
            for (i, j), yt in zip(chunk, y):
                out[b, :, i * scale:(i + th) * scale, j * scale:(j + tw) * scale] += yt
                if b == 0:
                    weight[0, 0, i * scale:(i + th) * scale, j * scale:(j + tw) * scale] += 1
    return out / weight


def _dihedral(x, k, flip):
    """The k-th 90-degree rotation of ``x`` (N, C, H, W), optionally after a horizontal flip."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1))


def _dihedral_inverse(y, k, flip):
    y = torch.rot90(y, -k, dims=(-2, -1))
    return y.flip(-1) if flip else y


@torch.no_grad()
def self_ensemble(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x8 geometric self-ensemble (NLRN-MV): mean of ``fn`` over the 8 flips/rotations, each undone.

    Args:
        fn (callable): Maps (N, C, H, W) to (N, C', H*s, W*s).
        x (Tensor): Input of shape (N, C, H, W).

    Returns:
        Tensor: The mean of the 8 back-transformed outputs.
    """
    acc = None
    for flip in (False, True):
        for k in range(4):
            y = _dihedral_inverse(fn(_dihedral(x, k, flip)), k, flip)
            acc = y if acc is None else acc + y
    return acc / 8
