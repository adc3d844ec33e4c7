"""Pure tensor functions behind the neural nearest neighbours (N3) block of N3Net.

Paper: "Neural Nearest Neighbors Networks", Plötz & Roth, NeurIPS 2018. Equation numbers below
refer to that paper; "official" refers to the behaviour of the authors' released denoising code.

Notation used in the shapes:

* ``B`` batch, ``C`` channels, ``p`` patch size, ``s`` stride,
* ``nh x nw`` the grid of patches of a padded image, ``L = nh * nw`` query patches,
* ``D = C * p * p`` the length of a flattened patch (channel-major, then rows, then columns:
  the layout of :func:`torch.nn.functional.unfold`),
* ``M`` candidates per query, ``k`` neighbours.

Two implementations of the block's heavy part are provided:

* a readable reference (:func:`patch_sqdist`, :func:`aggregate_patches`, :func:`fold_patches`)
  that gathers exactly the ``M`` candidate patches of every query (memory ``L * M * D``);
* a tiled one (:func:`tiled_patch_sqdist`, :func:`tiled_aggregate_fold`) whose time and memory
  are linear in the image area: queries are processed in rectangular tiles of the patch grid; the
  candidates of a tile all lie in a slightly larger rectangle of patches (the tile's *union*), so
  distances and aggregation become dense matrix products between a tile and its union, and the
  selection of the ``M`` real candidates happens on small index tensors. Both give the same
  results up to floating point rounding (tested).
"""
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    'patch_grid_padding', 'pad_to_patch_grid', 'patch_grid_shape', 'extract_patches', 'fold_patches',
    'window_starts', 'candidate_index', 'all_pairs_index', 'patch_sqdist', 'log1mexp', 'continuous_knn',
    'hard_knn_weights', 'gumbel_noise', 'aggregate_patches', 'patch_temperature', 'TilePlan', 'make_tile_plan',
    'tiled_patch_sqdist', 'tiled_aggregate_fold'
]

# ----------------------------------------------------------------------------- patch grid


def _pad_1d(n, patch_size, stride):
    """(before, after) padding of one axis: the official rule ``(-(n - p)) mod s``, split floor/ceil.

    Extents smaller than one patch are padded up to exactly one patch (the official code does not
    handle them).
    """
    total = patch_size - n if n < patch_size else (-(n - patch_size)) % stride
    return total // 2, total - total // 2


def patch_grid_padding(h, w, patch_size, stride):
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


def pad_to_patch_grid(x, patch_size, stride, pad=None):
    """Zero-pad ``x`` (B, C, H, W) with :func:`patch_grid_padding` (or the given ``pad``).

    Returns:
        tuple: The padded tensor (B, C, H', W') and the padding ``(left, right, top, bottom)``.
    """
    if pad is None:
        pad = patch_grid_padding(x.shape[-2], x.shape[-1], patch_size, stride)
    return (F.pad(x, pad) if any(pad) else x), pad


def patch_grid_shape(h, w, patch_size, stride):
    """Number of patch rows and columns ``(nh, nw)`` of an image that the patches tile exactly."""
    if h < patch_size or w < patch_size or (h - patch_size) % stride or (w - patch_size) % stride:
        raise ValueError(f'a {h}x{w} image is not tiled exactly by {patch_size}x{patch_size} patches at '
                         f'stride {stride}; pad it with pad_to_patch_grid first')
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def extract_patches(x, patch_size, stride):
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


def fold_patches(patches, out_size, patch_size, stride, average=True):
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
        Tensor: (B, C, H, W).
    """
    nh, nw = patch_grid_shape(out_size[0], out_size[1], patch_size, stride)
    if patches.shape[1] != nh * nw:
        raise ValueError(f'{patches.shape[1]} patches do not fill a {nh}x{nw} grid for size {tuple(out_size)}')
    out = F.fold(patches.transpose(1, 2), tuple(out_size), patch_size, stride=stride)
    if average:
        out = out / overlap_count(out_size, patch_size, stride, patches.device, patches.dtype)
    return out


def overlap_count(out_size, patch_size, stride, device=None, dtype=torch.float32):
    """Number of patches covering each pixel, (1, 1, H, W)."""
    nh, nw = patch_grid_shape(out_size[0], out_size[1], patch_size, stride)
    ones = torch.ones(1, patch_size * patch_size, nh * nw, device=device, dtype=dtype)
    return F.fold(ones, tuple(out_size), patch_size, stride=stride)


# ----------------------------------------------------------------------------- candidates


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


# ----------------------------------------------------------------------------- k-NN relaxation


_LN2 = math.log(2.0)


def log1mexp(a):
    """``log(1 - exp(a))`` for ``a <= 0``, numerically stable (Mächler 2012).

    ``log1p(-exp(a))`` for ``a < -log 2``, ``log(-expm1(a))`` otherwise. Each branch gets an input
    clamped to its own range so that neither produces NaN gradients through :func:`torch.where`.
    ``a = -inf`` gives 0; ``a = 0`` gives ``-inf``.
    """
    small = a < -_LN2
    lo = torch.log1p(-torch.exp(a.clamp(max=-_LN2)))
    hi = torch.log(-torch.expm1(a.clamp(min=-_LN2)))
    return torch.where(small, lo, hi)


def continuous_knn(logits, k, noise=None, temperature=None):
    """Continuous deterministic relaxation of k-NN selection (paper eqs. 8-11).

    For ``j = 1..k``::

        w_j    = softmax(logits / t)                # eqs. 8-9: weights of the j-th neighbour
        logits = logits + log(1 - w_j)              # eq. 10: push down what was already chosen

    Two placements of the temperature ``t``:

    * ``temperature=None`` (official code): ``logits`` are already ``alpha / t`` and the update
      ``log(1 - w_j)`` is added unscaled. As ``t -> 0`` only ``w_1`` becomes one-hot; later
      weights split between the previous choice and the next candidate.
    * ``temperature=t`` (paper): ``logits`` are ``alpha`` (negative distances), the softmax sees
      ``alpha / t`` and the update is added to ``alpha``. As ``t -> 0`` ``w_j`` tends to the
      one-hot vector of the j-th nearest candidate (hard k-NN), the paper's limit.

    ``log(1 - w_j)`` is computed as :func:`log1mexp` of the log-softmax, exactly (``-inf`` once a
    weight rounds to 1). Its gradient is taken at ``min(log w, log(1 - eps))`` (zero once
    saturated), like the official code's clamp of ``w``, so saturated weights never produce
    infinite or NaN gradients.

    Args:
        logits (Tensor): (..., M) with ``M >= 1``; ``-inf`` entries are never selected.
        k (int): Number of neighbours.
        noise (Tensor, optional): (..., k, M) perturbation added to the logits before the j-th
            softmax (Concrete / Gumbel-softmax sampling); the update uses the perturbed weights.
        temperature (Tensor or float, optional): Paper placement of the temperature; broadcast
            against ``logits`` (e.g. (..., 1) per query).

    Returns:
        Tensor: (..., k, M) weights; each row sums to 1.
    """
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}')
    cap = math.log1p(-torch.finfo(logits.dtype).eps)
    inplace = not (torch.is_grad_enabled() and (logits.requires_grad or getattr(temperature, 'requires_grad', False)))
    weights = []
    for j in range(k):
        cur = logits if noise is None else logits + noise[..., j, :]
        if temperature is not None:
            cur = cur / temperature
        logw = torch.log_softmax(cur, dim=-1)
        w = logw.exp()
        weights.append(w)
        if j + 1 < k:
            # log1mexp(logw): its first branch log1p(-w) is exact wherever w < 1/2, i.e. everywhere
            # except possibly at the row maximum, which gets the full log1mexp (saves ~half the work).
            top = logw.argmax(-1, keepdim=True)
            a = logw.gather(-1, top)
            exact = log1mexp(a.detach())  # value: exact, -inf when w == 1 (hard limit as t -> 0)
            if inplace:  # inference: same arithmetic without autograd bookkeeping or extra buffers
                # no clamp needed: only the row maximum can exceed 1/2 and it is overwritten
                upd = torch.neg(w, out=logw).log1p_().scatter_(-1, top, exact)
                logits = logits + upd if j == 0 else logits.add_(upd)
                continue
            upd = torch.log1p(-w.clamp(max=0.5))
            soft = log1mexp(a.clamp(max=cap))  # gradient: zero once saturated (official clamp)
            upd = upd.scatter(-1, top, soft + (exact - soft.detach()))
            logits = logits + upd
    return torch.stack(weights, dim=-2)


def hard_knn_weights(dist, k):
    """One-hot weights of the ``k`` nearest candidates (ties broken by candidate order).

    Args:
        dist (Tensor): (..., M) distances.
        k (int): Number of neighbours, ``<= M``.

    Returns:
        Tensor: (..., k, M); row ``j`` is the indicator of the j-th nearest candidate.
    """
    if k > dist.shape[-1]:
        raise ValueError(f'k={k} neighbours requested but only {dist.shape[-1]} candidates are available')
    idx = torch.topk(dist, k, dim=-1, largest=False, sorted=True).indices  # (..., k)
    out = dist.new_zeros(*dist.shape[:-1], k, dist.shape[-1])
    return out.scatter_(-1, idx.unsqueeze(-1), 1.0)


def gumbel_noise(shape, like, generator=None):
    """Standard Gumbel samples ``-log(-log U)`` with the dtype/device of ``like``."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    tiny = torch.finfo(like.dtype).tiny
    e = -torch.log(u.clamp(min=tiny))  # Exp(1) samples
    return -torch.log(e.clamp(min=tiny))


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


def patch_temperature(log_temp, patch_size, stride, mode='mean', offset=math.log(0.1)):
    """Per-patch temperature ``T = exp(log_temp_patch + offset)`` from a log-temperature map.

    Args:
        log_temp (Tensor): (B, 1, H, W) exactly tiled log-temperature map (already padded).
        patch_size (int): ``p``.
        stride (int): ``s``.
        mode (str): ``'mean'`` over the patch (official code) or ``'center'`` pixel
            ``(p // 2, p // 2)`` of the patch (paper). Default: ``'mean'``.
        offset (float): Added to the log-temperature (official: ``log(0.1)``).

    Returns:
        Tensor: (B, L) positive temperatures.
    """
    patches = extract_patches(log_temp, patch_size, stride)  # (B, L, p*p)
    if mode == 'mean':
        lt = patches.mean(-1)
    elif mode == 'center':
        lt = patches[..., (patch_size // 2) * patch_size + patch_size // 2]
    else:
        raise ValueError(f"temperature mode must be 'mean' or 'center', got {mode!r}")
    return torch.exp(lt + offset)


# ----------------------------------------------------------------------------- tiled (linear) version


class TilePlan:
    """Index tensors of the tiled search on an ``nh x nw`` patch grid (see :func:`make_tile_plan`).

    Attributes:
        nh, nw (int): Patch grid.
        th, tw (int): Tile of queries (in patches). ``uh, uw``: its union of candidate windows.
        query (LongTensor): (nt, th*tw) global indices of each tile's queries.
        union (LongTensor): (nt, uh*uw) global indices of each tile's union rectangle.
        local (LongTensor): (nt, th*tw, M) candidate indices into the tile's union, in the order of
            :func:`candidate_index`.
        owner (Tensor): (nt, th*tw) bool, True where this tile is the one that reports the query
            (the last tile of a row/column is flush with the border and may repeat queries).
        slot (LongTensor): (L,) position of each query in ``query.view(-1)`` at its owning tile.
        origin (LongTensor): (nt, 2) top-left patch (row, column) of each tile.
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def to(self, device):
        out = TilePlan(**self.__dict__)
        for key, val in self.__dict__.items():
            if torch.is_tensor(val):
                setattr(out, key, val.to(device))
        return out


def _tile_starts(n, t):
    starts = list(range(0, n - t + 1, t))
    if starts[-1] != n - t:
        starts.append(n - t)  # last tile flush with the border
    return starts


def choose_tile(n, window):
    """Tile extent (in patches) along one axis, chosen from the grid size.

    The work of one axis is ``tiles * t * union`` with ``union = min(t + window - 1, n)``; small tiles
    waste less on the union border but make small, slow matrix products. Grids up to ~2 windows are
    one tile (dense); otherwise ``t`` in [6, 12] minimising the work (measured on CPU: tiles of 64-100
    queries against ~500 union patches run near the matmul peak).
    """
    window = min(window, n)
    if n <= window + 8:
        return n
    best = None
    for t in range(6, 13):
        cost = len(_tile_starts(n, t)) * t * min(t + window - 1, n)
        if best is None or cost < best[0]:
            best = (cost, t)
    return best[1]


def make_tile_plan(nh, nw, window_size, tile=None, device=None):
    """Tiles of the patch grid, their candidate unions and local candidate indices.

    For a tile of queries starting at row ``a`` with ``th`` rows, every query's clamped window lies in
    the ``uh = min(th + wh - 1, nh)`` rows starting at ``clamp(a - wh // 2, 0, nh - uh)`` (likewise
    for columns), so one dense product per tile covers all candidates of its queries.

    Args:
        nh (int): Patch-grid rows.
        nw (int): Patch-grid columns.
        window_size (int): Search window side in patches.
        tile (tuple[int], optional): ``(th, tw)``; default :func:`choose_tile` per axis.
        device (torch.device, optional): Device of the index tensors.

    Returns:
        TilePlan
    """
    if tile is None:
        tile = (choose_tile(nh, window_size), choose_tile(nw, window_size))
    return _make_tile_plan(nh, nw, window_size, min(tile[0], nh), min(tile[1], nw)).to(device)


@lru_cache(maxsize=16)
def _make_tile_plan(nh, nw, window_size, th, tw):
    rs, wh = window_starts(nh, window_size)
    cs, ww = window_starts(nw, window_size)
    uh, uw = min(th + wh - 1, nh), min(tw + ww - 1, nw)
    tr = torch.tensor(_tile_starts(nh, th))  # (ntr,)
    tc = torch.tensor(_tile_starts(nw, tw))  # (ntc,)
    ur = (tr - wh // 2).clamp(0, nh - uh)
    uc = (tc - ww // 2).clamp(0, nw - uw)
    qr = tr[:, None] + torch.arange(th)  # (ntr, th) query rows
    qc = tc[:, None] + torch.arange(tw)  # (ntc, tw)
    ntr, ntc = len(tr), len(tc)
    query = (qr[:, None, :, None] * nw + qc[None, :, None, :]).reshape(ntr * ntc, th * tw)
    union_r = ur[:, None] + torch.arange(uh)
    union_c = uc[:, None] + torch.arange(uw)
    union = (union_r[:, None, :, None] * nw + union_c[None, :, None, :]).reshape(ntr * ntc, uh * uw)
    # window rows of each query relative to the union: (ntr, th, wh); columns likewise
    lr = rs[qr][..., None] + torch.arange(wh) - ur[:, None, None]
    lc = cs[qc][..., None] + torch.arange(ww) - uc[:, None, None]
    local = lr[:, None, :, None, :, None] * uw + lc[None, :, None, :, None, :]  # (ntr, ntc, th, tw, wh, ww)
    local = local.reshape(ntr * ntc, th * tw, wh * ww)
    # drop the query itself (same rule and order as candidate_index)
    self_local = ((qr[:, None, :, None] - ur[:, None, None, None]) * uw +
                  (qc[None, :, None, :] - uc[None, :, None, None])).reshape(ntr * ntc, th * tw, 1)
    keep = local != self_local
    local = local[keep].view(ntr * ntc, th * tw, wh * ww - 1)
    flat = query.reshape(-1)
    slot = torch.full((nh * nw,), flat.numel(), dtype=torch.long)
    slot = slot.scatter_reduce(0, flat, torch.arange(flat.numel()), 'amin')  # first tile owns a query
    owner = torch.zeros(query.numel(), dtype=torch.bool)
    owner[slot] = True
    origin = torch.stack(torch.meshgrid(tr, tc, indexing='ij'), -1).reshape(-1, 2)
    return TilePlan(nh=nh, nw=nw, th=th, tw=tw, uh=uh, uw=uw, wh=wh, ww=ww, query=query, union=union,
                    local=local, owner=owner.view(ntr * ntc, th * tw), slot=slot, origin=origin)


def _tile_chunks(plan, per_tile_elems, budget=1 << 25):
    """Ranges of tiles processed together so that one chunk holds ~``budget`` elements."""
    n = plan.query.shape[0]
    step = max(1, min(n, budget // max(per_tile_elems, 1)))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def tiled_patch_sqdist(emb, plan):
    """:func:`patch_sqdist` of ``emb`` against itself on ``candidate_index``, tile by tile.

    Per tile, ``|q|^2 + |u|^2 - 2 q.u`` against its union (one batched matrix product), then the
    candidate columns are picked with ``plan.local``. Time and memory linear in the image area.

    Args:
        emb (Tensor): (B, L, D) embedding patches on the plan's ``nh x nw`` grid.
        plan (TilePlan): From :func:`make_tile_plan` (on ``emb``'s device).

    Returns:
        Tensor: (B, L, M), equal to ``patch_sqdist(emb, emb, candidate_index(nh, nw, window))``.
    """
    b, n_q, d = emb.shape
    if n_q != plan.nh * plan.nw:
        raise ValueError(f'{n_q} patches do not match the {plan.nh}x{plan.nw} plan')
    q_len, u_len, m = plan.query.shape[1], plan.union.shape[1], plan.local.shape[2]
    sq = emb.pow(2).sum(-1)  # (B, L)
    out = []
    for lo, hi in _tile_chunks(plan, b * (q_len + u_len) * d + b * q_len * u_len):
        nt = hi - lo
        qi, ui = plan.query[lo:hi], plan.union[lo:hi]
        q = emb[:, qi.reshape(-1)].view(b * nt, q_len, d)
        u = emb[:, ui.reshape(-1)].view(b * nt, u_len, d)
        dots = torch.bmm(q, u.transpose(1, 2)).view(b, nt, q_len, u_len)
        local = plan.local[lo:hi].expand(b, -1, -1, -1)
        dots = torch.gather(dots, 3, local)  # (B, nt, Q, M)
        qq = sq[:, qi].unsqueeze(-1)
        uu = torch.gather(sq[:, ui].unsqueeze(2).expand(-1, -1, q_len, -1), 3, local)
        out.append((qq + uu - 2 * dots).clamp_min(0).reshape(b, nt * q_len, m))
    dist = torch.cat(out, 1) if len(out) > 1 else out[0]
    return dist[:, plan.slot]


def tiled_aggregate_fold(logits, values, plan, weight_fn, patch_size, stride, channels):
    """Neighbour weights, aggregation of candidate patches and overlap-add folding, tile by tile.

    Equals ``fold_patches(aggregate_patches(weight_fn(logits), values, candidate_index(...)),
    average=False)`` for every neighbour, without materialising the (B, L, k, D) patch volume:
    each tile's weights are scattered into a dense (tile x union) matrix, multiplied with the
    union's patches, folded (col2im) and added into the image.

    Args:
        logits (Tensor or tuple[Tensor]): (B, L, ...) per-query inputs of ``weight_fn`` (e.g. the
            (B, L, M) scaled logits); a tuple is indexed per tile and passed as separate arguments.
        values (Tensor): (B, L, C*p*p) patches of the block input.
        plan (TilePlan): From :func:`make_tile_plan`.
        weight_fn (callable): (B, nt, Q, M)[, ...] -> (B, nt, Q, k, M) neighbour weights.
        patch_size (int): ``p``.
        stride (int): ``s``.
        channels (int): ``C``.

    Returns:
        Tensor: (B, k, C, H, W) overlap-ADDED neighbour images on the padded grid (divide by
        :func:`overlap_count` for the average).
    """
    b, n_q, d = values.shape
    p, s = patch_size, stride
    inputs = tuple(logits) if isinstance(logits, (tuple, list)) else (logits,)
    if d != channels * p * p:
        raise ValueError(f'patch length {d} != channels {channels} * {p} * {p}')
    q_len, u_len = plan.query.shape[1], plan.union.shape[1]
    h, w = (plan.nh - 1) * s + p, (plan.nw - 1) * s + p
    th_px, tw_px = (plan.th - 1) * s + p, (plan.tw - 1) * s + p
    pix = (torch.arange(th_px, device=values.device)[:, None] * w +
           torch.arange(tw_px, device=values.device)).view(-1)
    out = None
    k = None
    m = plan.local.shape[2]
    for lo, hi in _tile_chunks(plan, b * (u_len * d + q_len * 8 * (u_len + d + m))):
        nt = hi - lo
        qi = plan.query[lo:hi]
        wts = weight_fn(*(t[:, qi] for t in inputs))  # (B, nt, Q, k, M)
        k = wts.shape[3]
        if out is None:
            out = values.new_zeros(b, k * channels, h * w)
        wts = wts * plan.owner[lo:hi, :, None, None].to(wts.dtype)  # each query reported once
        local = plan.local[lo:hi, :, None, :].expand(b, -1, -1, k, -1)
        dense = wts.new_zeros(b, nt, q_len, k, u_len).scatter(4, local, wts)
        u = values[:, plan.union[lo:hi].reshape(-1)].view(b * nt, u_len, d)
        z = torch.bmm(dense.view(b * nt, q_len * k, u_len), u)  # (B*nt, Q*k, D)
        # fold each tile: (B*nt*k, C*p*p, Q) -> (B*nt*k, C, th_px, tw_px)
        z = z.view(b * nt, q_len, k, d).permute(0, 2, 3, 1).reshape(b * nt * k, d, q_len)
        z = F.fold(z, (th_px, tw_px), p, stride=s).view(b, nt, k * channels, th_px * tw_px)
        offs = plan.origin[lo:hi, 0] * s * w + plan.origin[lo:hi, 1] * s  # (nt,)
        idx = (offs[:, None] + pix).view(-1)
        out.index_add_(2, idx, z.permute(0, 2, 1, 3).reshape(b, k * channels, nt * th_px * tw_px))
    return out.view(b, k, channels, h, w)
