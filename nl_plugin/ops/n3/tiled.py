"""Tiled (linear in image area) candidate distances and aggregation of the N3 block."""
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..amp import accum_dtype, compute_dtype, to_accum
from ..tiling import tile_starts
from .candidates import search_starts

__all__ = ['TilePlan', 'choose_tile', 'make_tile_plan', 'chunk_budget', 'tiled_patch_sqdist', 'tiled_aggregate_fold']

# Elements one chunk of tiles may hold (the products of its tiles run as one batched matmul). On the CPU
# 2^25 (128 MB in fp32): larger chunks run no faster once the products reach the matmul rate. On CUDA
# 1/16 of the free memory in fp32 elements, up to 2^28: each chunk is a few kernel launches and gathers,
# so fewer, larger chunks keep the GPU busy; the chunk's temporaries are a small multiple of it.
CPU_CHUNK_ELEMS = 1 << 25
GPU_CHUNK_SHARE = 1 / 16
GPU_CHUNK_ELEMS = 1 << 28


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Index tensors of the tiled search on an ``nh x nw`` patch grid (see :func:`make_tile_plan`).

    Attributes:
        nh, nw (int): Patch grid.
        th, tw (int): Tile of queries (in patches).
        uh, uw (int): The tile's union of candidate search regions (in patches).
        sh, sw (int): Search region of one query, ``min(search_size, nh)`` x ``min(search_size, nw)``.
        query (LongTensor): (nt, th*tw) global indices of each tile's queries.
        union (LongTensor): (nt, uh*uw) global indices of each tile's union rectangle.
        local (LongTensor): (nt, th*tw, M) candidate indices into the tile's union, in the order of
            :func:`~nl_plugin.ops.n3.candidates.candidate_index`.
        owner (Tensor): (nt, th*tw) bool, True where this tile is the one that reports the query
            (the last tile of a row/column is flush with the border and may repeat queries).
        slot (LongTensor): (L,) position of each query in ``query.view(-1)`` at its owning tile.
        origin (LongTensor): (nt, 2) top-left patch (row, column) of each tile.
    """

    nh: int
    nw: int
    th: int
    tw: int
    uh: int
    uw: int
    sh: int
    sw: int
    query: torch.Tensor
    union: torch.Tensor
    local: torch.Tensor
    owner: torch.Tensor
    slot: torch.Tensor
    origin: torch.Tensor

    def to(self, device: torch.device | str | None) -> 'TilePlan':
        """The same plan with its index tensors on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if torch.is_tensor(getattr(self, f.name))})


def choose_tile(n: int, search_size: int) -> int:
    """Tile extent (in patches) along one axis, chosen from the grid size.

    The work of one axis is ``tiles * t * union`` with ``union = min(t + search - 1, n)``; small tiles
    waste less on the union border but make small, slow matrix products. Grids up to ~2 search
    regions are one tile (dense); otherwise ``t`` in [6, 12] minimising the work (measured on CPU:
    tiles of 64-100 queries against ~500 union patches run near the matmul peak).
    """
    search = min(search_size, n)
    if n <= search + 8:
        return n
    best = None
    for t in range(6, 13):
        cost = len(tile_starts(n, t, t)) * t * min(t + search - 1, n)
        if best is None or cost < best[0]:
            best = (cost, t)
    return best[1]


def make_tile_plan(nh: int, nw: int, search_size: int, tile: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> TilePlan:
    """Tiles of the patch grid, their candidate unions and local candidate indices.

    For a tile of queries starting at row ``a`` with ``th`` rows, every query's clamped search
    region lies in the ``uh = min(th + sh - 1, nh)`` rows starting at ``clamp(a - sh // 2, 0,
    nh - uh)`` (likewise for columns), so one dense product per tile covers all candidates of its
    queries.

    Args:
        nh (int): Patch-grid rows.
        nw (int): Patch-grid columns.
        search_size (int): Search region side in patches.
        tile (tuple[int], optional): ``(th, tw)``; default :func:`choose_tile` per axis.
        device (torch.device, optional): Device of the index tensors.

    Returns:
        TilePlan
    """
    if tile is None:
        tile = (choose_tile(nh, search_size), choose_tile(nw, search_size))
    return _plan_on(nh, nw, search_size, min(tile[0], nh), min(tile[1], nw), torch.device(device or 'cpu'))


@lru_cache(maxsize=16)
def _plan_on(nh, nw, search_size, th, tw, device):
    # One copy per device: a GPU forward does not copy the index tensors from the host every call.
    return _make_tile_plan(nh, nw, search_size, th, tw).to(device)


@lru_cache(maxsize=16)
def _make_tile_plan(nh, nw, search_size, th, tw):
    rs, sh = search_starts(nh, search_size)
    cs, sw = search_starts(nw, search_size)
    uh, uw = min(th + sh - 1, nh), min(tw + sw - 1, nw)
    tr = torch.tensor(tile_starts(nh, th, th))  # (ntr,) the last tile flush with the border
    tc = torch.tensor(tile_starts(nw, tw, tw))  # (ntc,)
    ur = (tr - sh // 2).clamp(0, nh - uh)
    uc = (tc - sw // 2).clamp(0, nw - uw)
    qr = tr[:, None] + torch.arange(th)  # (ntr, th) query rows
    qc = tc[:, None] + torch.arange(tw)  # (ntc, tw)
    ntr, ntc = len(tr), len(tc)
    query = (qr[:, None, :, None] * nw + qc[None, :, None, :]).reshape(ntr * ntc, th * tw)
    union_r = ur[:, None] + torch.arange(uh)
    union_c = uc[:, None] + torch.arange(uw)
    union = (union_r[:, None, :, None] * nw + union_c[None, :, None, :]).reshape(ntr * ntc, uh * uw)
    # search-region rows of each query relative to the union: (ntr, th, sh); columns likewise
    lr = rs[qr][..., None] + torch.arange(sh) - ur[:, None, None]
    lc = cs[qc][..., None] + torch.arange(sw) - uc[:, None, None]
    local = lr[:, None, :, None, :, None] * uw + lc[None, :, None, :, None, :]  # (ntr, ntc, th, tw, sh, sw)
    local = local.reshape(ntr * ntc, th * tw, sh * sw)
    # drop the query itself (same rule and order as candidate_index)
    self_local = ((qr[:, None, :, None] - ur[:, None, None, None]) * uw +
                  (qc[None, :, None, :] - uc[None, :, None, None])).reshape(ntr * ntc, th * tw, 1)
    keep = local != self_local
    local = local[keep].view(ntr * ntc, th * tw, sh * sw - 1)
    flat = query.reshape(-1)
    slot = torch.full((nh * nw,), flat.numel(), dtype=torch.long)
    slot = slot.scatter_reduce(0, flat, torch.arange(flat.numel()), 'amin')  # first tile owns a query
    owner = torch.zeros(query.numel(), dtype=torch.bool)
    owner[slot] = True
    origin = torch.stack(torch.meshgrid(tr, tc, indexing='ij'), -1).reshape(-1, 2)
    return TilePlan(nh=nh, nw=nw, th=th, tw=tw, uh=uh, uw=uw, sh=sh, sw=sw, query=query, union=union,
                    local=local, owner=owner.view(ntr * ntc, th * tw), slot=slot, origin=origin)


@lru_cache(maxsize=8)
def chunk_budget(device: torch.device) -> int:
    """Elements one chunk of tiles may hold on ``device`` (see ``CPU_CHUNK_ELEMS``; read once per device)."""
    if device.type != 'cuda':
        return CPU_CHUNK_ELEMS
    free = torch.cuda.mem_get_info(device)[0]
    return int(min(max(free * GPU_CHUNK_SHARE / 4, CPU_CHUNK_ELEMS), GPU_CHUNK_ELEMS))


def _tile_chunks(plan, per_tile_elems, budget=None):
    """Ranges of tiles processed together so that one chunk holds ~``budget`` elements (``chunk_budget``)."""
    budget = chunk_budget(plan.query.device) if budget is None else budget
    n = plan.query.shape[0]
    step = max(1, min(n, budget // max(per_tile_elems, 1)))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def tiled_patch_sqdist(emb: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """:func:`patch_sqdist` of ``emb`` against itself on ``candidate_index``, tile by tile.

    Per tile, ``|q|^2 + |u|^2 - 2 q.u`` against its union (one batched matrix product), then the
    candidate columns are picked with ``plan.local``. Time and memory linear in the image area.

    Under ``torch.autocast`` the products ``q.u``, the norms and the distances are fp32 (see the comment in
    the code).

    Args:
        emb (Tensor): (B, L, D) embedding patches on the plan's ``nh x nw`` grid.
        plan (TilePlan): From :func:`make_tile_plan` (on ``emb``'s device).

    Returns:
        Tensor: (B, L, M) in at least fp32, equal to ``patch_sqdist(emb, emb, candidate_index(nh, nw,
        search_size))``.
    """
    b, n_q, d = emb.shape
    if n_q != plan.nh * plan.nw:
        raise ValueError(f'{n_q} patches do not match the {plan.nh}x{plan.nw} plan')
    q_len, u_len, m = plan.query.shape[1], plan.union.shape[1], plan.local.shape[2]
    # Precision under autocast: the products q.u run in fp32 (autocast off), on the embedding as the embedding
    # CNN wrote it (in the autocast dtype). d = |q|^2 + |u|^2 - 2 q.u is a small difference of large terms for
    # the close pairs that decide the neighbours, and the logits -d / T (T ~ 0.1) magnify its error: with the
    # products in bf16 (relative rounding 2^-8 of q.u), the released N3Net sigma-25 weights lost up to 0.056 dB
    # per image (astronaut 512x512 -0.056, BSD68 test002 -0.056, camera -0.035); with them in fp32 at most
    # 0.036 dB on any BSD68 image and 0.0065 dB on its mean (scripts/precision_report.py --weights), and the
    # embedding CNN or the aggregation product in fp32 changed nothing further (0.001 dB). The fp32 products
    # cost about a tenth of the bf16 time; bf16 stays 1.8x faster than fp32 (README "Mixed precision").
    emb = to_accum(emb).contiguous()  # index_select copied a strided one per call
    sq = emb.pow(2).sum(-1)  # (B, L)
    out = []
    for lo, hi in _tile_chunks(plan, b * (q_len + u_len) * d + b * q_len * u_len):
        nt = hi - lo
        qi, ui = plan.query[lo:hi], plan.union[lo:hi]
        q = emb.index_select(1, qi.reshape(-1)).view(b * nt, q_len, d)
        u = emb.index_select(1, ui.reshape(-1)).view(b * nt, u_len, d)
        with torch.autocast(emb.device.type, enabled=False):
            dots = torch.bmm(q, u.transpose(1, 2)).view(b, nt, q_len, u_len)
        local = plan.local[lo:hi].expand(b, -1, -1, -1)
        dots = torch.gather(dots, 3, local)  # (B, nt, Q, M)
        qq = sq[:, qi].unsqueeze(-1)
        uu = torch.gather(sq[:, ui].unsqueeze(2).expand(-1, -1, q_len, -1), 3, local)
        out.append((qq + uu - 2 * dots).clamp_min(0).reshape(b, nt * q_len, m))
    dist = torch.cat(out, 1) if len(out) > 1 else out[0]
    return dist[:, plan.slot]


def tiled_aggregate_fold(logits: torch.Tensor | Sequence[torch.Tensor | None], values: torch.Tensor, plan: TilePlan,
                         weight_fn: Callable[..., torch.Tensor], patch_size: int, stride: int,
                         channels: int) -> torch.Tensor:
    """Neighbour weights, aggregation of candidate patches and overlap-add folding, tile by tile.

    Equals ``fold_patches(aggregate_patches(weight_fn(logits), values, candidate_index(...)),
    average=False)`` for every neighbour, without materialising the (B, L, k, D) patch volume:
    each tile's weights are scattered into a dense (tile x union) matrix, multiplied with the
    union's patches, folded (col2im) and added into the image.

    Args:
        logits (Tensor or tuple[Tensor]): (B, L, ...) per-query inputs of ``weight_fn`` (e.g. the
            (B, L, M) scaled logits); a tuple is indexed per tile and passed as separate arguments
            (``None`` entries are passed as ``None``).
        values (Tensor): (B, L, C*p*p) patches of the block input.
        plan (TilePlan): From :func:`make_tile_plan`.
        weight_fn (callable): (B, nt, Q, M)[, ...] -> (B, nt, Q, k, M) neighbour weights.
        patch_size (int): ``p``.
        stride (int): ``s``.
        channels (int): ``C``.

    Returns:
        Tensor: (B, k, C, H, W) overlap-ADDED neighbour images on the padded grid (divide by
        :func:`overlap_count` for the average), in at least fp32.
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
    # Precision under autocast: the weights (in [0, 1], from fp32 log-weights) and the patches enter the
    # product in the autocast dtype (the flops); each tile's result is folded and summed into the image in
    # fp32, so only the product's rounding remains (at most 2^-8 of |z| in bf16), not the fold's sums of 4+
    # overlapping patches. The patches are cast once here, not per tile: the unions overlap.
    acc, cdt = accum_dtype(values), compute_dtype(values)
    values = values.to(cdt, memory_format=torch.contiguous_format).contiguous()
    for lo, hi in _tile_chunks(plan, b * (u_len * d + q_len * 8 * (u_len + d + m))):
        nt = hi - lo
        qi = plan.query[lo:hi]
        wts = weight_fn(*(None if t is None else t[:, qi] for t in inputs))  # (B, nt, Q, k, M)
        k = wts.shape[3]
        if out is None:
            out = values.new_zeros(b, k * channels, h * w, dtype=acc)
        wts = (wts * plan.owner[lo:hi, :, None, None].to(wts.dtype)).to(cdt)  # each query reported once
        local = plan.local[lo:hi, :, None, :].expand(b, -1, -1, k, -1)
        dense = wts.new_zeros(b, nt, q_len, k, u_len).scatter_(4, local, wts)
        u = values.index_select(1, plan.union[lo:hi].reshape(-1)).view(b * nt, u_len, d)
        z = torch.bmm(dense.view(b * nt, q_len * k, u_len), u)  # (B*nt, Q*k, D)
        # fold each tile: (B*nt*k, C*p*p, Q) -> (B*nt*k, C, th_px, tw_px), in the accumulation dtype
        z = z.view(b * nt, q_len, k, d).permute(0, 2, 3, 1).to(acc, memory_format=torch.contiguous_format)
        z = F.fold(z.reshape(b * nt * k, d, q_len), (th_px, tw_px), p, stride=s).view(b, nt, k * channels, -1)
        offs = plan.origin[lo:hi, 0] * s * w + plan.origin[lo:hi, 1] * s  # (nt,)
        idx = (offs[:, None] + pix).view(-1)
        out.index_add_(2, idx, z.permute(0, 2, 1, 3).reshape(b, k * channels, nt * th_px * tw_px))
    return out.view(b, k, channels, h, w)
