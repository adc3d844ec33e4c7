"""Candidate sets of the N3 block (clamped search windows of patches) and the gather-based reference
distance / aggregation over them (memory ``L * M * D``; the oracle of :mod:`.tiled`)."""
from functools import lru_cache

import torch

__all__ = ['window_starts', 'candidate_index', 'all_pairs_index', 'patch_sqdist', 'aggregate_patches']


def window_starts(n, window):
    """First grid row of each query's search window along one axis (official: clamped inside).

    The window of query ``i`` is ``[start_i, start_i + window)`` with ``start_i = clamp(i - window // 2,
    0, n - window)``; ``window`` is first shrunk to ``n`` when the grid is smaller than it.

    Returns:
        tuple: (LongTensor (n,) of starts, the effective window length).
    """
    window = min(window, n)
    starts = (torch.arange(n) - window // 2).clamp(0, n - window)
    return starts, window


def candidate_index(nh, nw, window_size, device=None):
    """Candidate patches of every query: its ``window x window`` patch neighbourhood minus itself.

    Official N3Net: a 15x15 grid of patches around the query (80x80 pixels for 10x10 patches at
    stride 5), the window clamped to lie inside the image, the query itself excluded: 224
    candidates. On grids smaller than the window, the window shrinks to the grid along that axis
    (every query then sees the whole axis).

    Args:
        nh (int): Patch-grid rows.
        nw (int): Patch-grid columns.
        window_size (int): Window side in patches.
        device (torch.device, optional): Device of the result.

    Returns:
        LongTensor: (L, M) indices into the row-major patch grid, ``M = wh * ww - 1`` with
        ``wh = min(window_size, nh)``, ``ww = min(window_size, nw)``; candidates in row-major
        window order.
    """
    if window_size < 1:
        raise ValueError(f'window_size must be >= 1, got {window_size}')
    return _candidate_index(nh, nw, window_size).to(device)


@lru_cache(maxsize=16)
def _candidate_index(nh, nw, window_size):
    rs, wh = window_starts(nh, window_size)
    cs, ww = window_starts(nw, window_size)
    rows = rs[:, None] + torch.arange(wh)  # (nh, wh)
    cols = cs[:, None] + torch.arange(ww)  # (nw, ww)
    full = (rows[:, None, :, None] * nw + cols[None, :, None, :]).reshape(nh * nw, wh * ww)
    keep = full != torch.arange(nh * nw)[:, None]  # the query is inside its own window exactly once
    if wh * ww - 1 < 1:
        raise ValueError(f'a {nh}x{nw} patch grid has no candidate patches besides the query')
    return full[keep].view(nh * nw, wh * ww - 1)


def all_pairs_index(n, device=None):
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


def patch_sqdist(query, keys, index):
    """Squared Euclidean distances between each query and its candidates only (reference version).

    Args:
        query (Tensor): (B, L, D) query embeddings (flattened embedding patches).
        keys (Tensor): (B, N, D) candidate embeddings.
        index (LongTensor): (L, M) or (B, L, M) candidate indices into ``keys``.

    Returns:
        Tensor: (B, L, M), ``||query[l] - keys[index[l, m]]||^2``.
    """
    cand = _gather_rows(keys, index)  # (B, L, M, D)
    return (query.unsqueeze(2) - cand).pow(2).sum(-1)


def aggregate_patches(weights, values, index):
    """Weighted averages of candidate patches, one per neighbour (eq. 12; reference version).

    Args:
        weights (Tensor): (B, L, k, M) neighbour weights over the candidates.
        values (Tensor): (B, N, D) patches to aggregate (patches of the block input ``x``).
        index (LongTensor): (L, M) or (B, L, M) candidate indices into ``values``.

    Returns:
        Tensor: (B, L, k, D), ``z[l, j] = sum_m weights[l, j, m] * values[index[l, m]]``.
    """
    cand = _gather_rows(values, index)  # (B, L, M, D)
    return torch.einsum('blkm,blmd->blkd', weights, cand)
