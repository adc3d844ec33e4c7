"""Candidate sets of the N3 block (clamped search regions of patches) and the gather-based reference
distance / aggregation over them (memory ``L * M * D``; the oracle of :mod:`.tiled`)."""
from functools import lru_cache

import torch

from ..amp import accum_dtype, to_accum

__all__ = ['search_starts', 'candidate_index', 'all_pairs_index', 'patch_sqdist', 'aggregate_patches']


def search_starts(n: int, search_size: int) -> tuple[torch.Tensor, int]:
    """First grid row of each query's search region along one axis (official: clamped inside).

    The search region of query ``i`` is ``[start_i, start_i + search)`` with ``start_i = clamp(i - search // 2,
    0, n - search)``; ``search = min(search_size, n)`` (the region shrinks to a grid smaller than it).

    Returns:
        tuple: (LongTensor (n,) of starts, the effective search extent ``search``).
    """
    search = min(search_size, n)
    starts = (torch.arange(n) - search // 2).clamp(0, n - search)
    return starts, search


def candidate_index(nh: int, nw: int, search_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Candidate patches of every query: its ``search_size x search_size`` patch neighbourhood minus itself.

    Official N3Net: a 15x15 grid of patches around the query (80x80 pixels for 10x10 patches at
    stride 5), the region clamped to lie inside the image, the query itself excluded: 224
    candidates. On grids smaller than the search region, the region shrinks to the grid along that
    axis (every query then sees the whole axis).

    Args:
        nh (int): Patch-grid rows.
        nw (int): Patch-grid columns.
        search_size (int): Search region side in patches.
        device (torch.device, optional): Device of the result.

    Returns:
        LongTensor: (L, M) indices into the row-major patch grid, ``M = sh * sw - 1`` with
        ``sh = min(search_size, nh)``, ``sw = min(search_size, nw)``; candidates in row-major
        order over the search region.
    """
    if search_size < 1:
        raise ValueError(f'search_size must be >= 1, got {search_size}')
    return _candidate_index(nh, nw, search_size).to(device)


@lru_cache(maxsize=16)
def _candidate_index(nh, nw, search_size):
    rs, sh = search_starts(nh, search_size)
    cs, sw = search_starts(nw, search_size)
    rows = rs[:, None] + torch.arange(sh)  # (nh, sh)
    cols = cs[:, None] + torch.arange(sw)  # (nw, sw)
    full = (rows[:, None, :, None] * nw + cols[None, :, None, :]).reshape(nh * nw, sh * sw)
    keep = full != torch.arange(nh * nw)[:, None]  # the query is inside its own search region exactly once
    if sh * sw - 1 < 1:
        raise ValueError(f'a {nh}x{nw} patch grid has no candidate patches besides the query')
    return full[keep].view(nh * nw, sh * sw - 1)


def all_pairs_index(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every other item as candidate: (n, n-1) indices (the set version's search over all items)."""
    if n < 2:
        raise ValueError(f'need at least 2 items to search for neighbours, got {n}')
    full = torch.arange(n, device=device).expand(n, n)
    keep = ~torch.eye(n, dtype=torch.bool, device=device)
    return full[keep].view(n, n - 1)


def _gather_rows(values, index):
    """values (B, N, D), index (L, M) or (B, L, M) -> (B, L, M, D)."""
    b, _, d = values.shape
    if index.dim() == 2:
        return values[:, index]
    flat = index.reshape(b, -1)
    return torch.gather(values, 1, flat[..., None].expand(-1, -1, d)).view(*index.shape, d)


def patch_sqdist(query: torch.Tensor, keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between each query and its candidates only (reference version).

    Args:
        query (Tensor): (B, L, D) query embeddings (flattened embedding patches).
        keys (Tensor): (B, N, D) candidate embeddings.
        index (LongTensor): (L, M) or (B, L, M) candidate indices into ``keys``.

    Returns:
        Tensor: (B, L, M), ``||query[l] - keys[index[l, m]]||^2``, in at least fp32 also under autocast (as
        the tiled version: bf16 distances cost PSNR, see ``tiled_patch_sqdist``).
    """
    query, keys = to_accum(query), to_accum(keys)
    cand = _gather_rows(keys, index)  # (B, L, M, D)
    return (query.unsqueeze(2) - cand).pow(2).sum(-1)


def aggregate_patches(weights: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Weighted averages of candidate patches, one per neighbour (eq. 12; reference version).

    Args:
        weights (Tensor): (B, L, k, M) neighbour weights over the candidates.
        values (Tensor): (B, N, D) patches to aggregate (patches of the block input ``x``).
        index (LongTensor): (L, M) or (B, L, M) candidate indices into ``values``.

    Returns:
        Tensor: (B, L, k, D), ``z[l, j] = sum_m weights[l, j, m] * values[index[l, m]]``, in at least fp32
        (under autocast the product runs in the autocast dtype, as in the tiled version).
    """
    cand = _gather_rows(values, index)  # (B, L, M, D)
    return torch.einsum('blkm,blmd->blkd', weights, cand).to(accum_dtype(values))
