"""Inference (no-grad) halo kernel of window attention on key/value strips, and the band-of-rows API.

Block columns are processed in groups: the keys and values a group reaches are copied once into
column strips (g, H + 2py, b + 2px, D) and (g, H + 2py, b + 2px, C), so the halo region of each query
block is a contiguous (rh*rw, D) / (rh*rw, C) view that the batched matmuls read in place (several block rows of one
column are batched the same way, their regions overlapping). The in-window logits of query (i, j)
are the (kh, kw) sub-block of its halo logits starting at region cell (i, j); over a block they form
the strided view ``_compact_view`` (no gather). The normalisation runs on the compact layout and the
weights go into the same view of a halo buffer whose other entries stay zero, for the value matmul.
Same result as the autograd kernel (``halo.py``), with few copies and buffers reused across blocks.
Roles: ``_Plan`` (geometry and batching), one class per logits layout behind one ``update`` (none
carried: ``_ScratchLogits``; image layout: ``_ImageLogits``; block layout: ``_BlockLogits``), and
``_StripsKernel`` (buffers and the loops over batches of blocks).
Under autocast (q, k, v in bf16/fp16) the halo logits ``s``, the strips and the halo weights are in that
dtype (operands and output of the two matmuls); the carried and fresh in-window logits and the softmax are
fp32 (``common.py``).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..amp import accum_dtype, to_compute
from .common import (
    STREAM_BORDERS,
    WindowGeometry,
    border_rule,
    check_qkv,
    check_window_args,
    normalize_attention,
    requires_grad,
    window_geometry,
)

FAST_BLOCK = 8               # query block side of this kernel (the block logits layout depends on it)
_GROUP_BYTES = 3 * 2**20     # halo logits of one group of query blocks stay cache-resident


def _compact_view(s, b, rh, rw, kh, kw):
    """(m, b*b, rh*rw) halo logits -> strided view (m, b, b, kh, kw) of the in-window entries."""
    rr = rh * rw
    m = s.shape[0]
    st = s.stride()
    return s.as_strided((m, b, b, kh, kw), (st[0], b * rr + rw, rr + 1, rw, 1), s.storage_offset())


def _regions(strips, g, m, y0, b, rh, rw):
    """Halo regions of g block columns (m = 1) or of m block rows of one column (g = 1) from row y0,
    as an (n, rh*rw, E) view of ``strips`` (G, hq+2py, rw, E): consecutive block rows overlap."""
    if m == 1:
        return strips[:g, y0:y0 + rh].reshape(g, rh * rw, -1)
    st = strips.stride()
    return strips[0, y0:].as_strided((m, rh * rw, strips.shape[-1]), (b * st[1], st[2], st[3]))


def _fill_strips(strips, k, v, lo, g, b, rw, py):
    """Copy the key/value columns that ``g`` block columns reach into ``strips``, the key and value strips
    (G, hq+2py, rw, D) and (G, hq+2py, rw, C).

    Strip j holds columns lo + j*b .. lo + j*b + rw of k (H, W, D) and v (H, W, C) in its rows py .. py+H;
    the rows outside are zeroed once by the caller and out-of-image columns here, so one
    buffer serves every group without clearing it.
    """
    h, wk, _ = k.shape
    for j in range(g):
        a = lo + j * b
        s0, s1 = max(a, 0), min(a + rw, wk)
        for buf, src in zip(strips, (k, v)):
            st = buf[j, py:py + h]
            if s0 > a:
                st[:, :s0 - a].zero_()
            if s1 < a + rw:
                st[:, max(s1, s0) - a:].zero_()
            if s1 > s0:
                st[:, s0 - a:s1 - a] = src[:, s0:s1]


class _Plan(NamedTuple):
    """Geometry of one ``strips_attention`` call and how its query blocks are batched.

    A batched matmul takes either ``g`` <= ``g_max`` block columns of one block row (``m = 1``) or, for a
    single block column (a band, see ``window_attention_rows``), ``m`` <= ``m_max`` block rows of it
    (``g = 1``), so that their halo logits stay cache-resident (``_GROUP_BYTES``).
    """
    geo: WindowGeometry
    b: int          # query block side
    h: int          # image rows (of queries and keys)
    w: int          # query columns
    wk: int         # key columns
    col0: int       # key column of the first query column
    nby: int        # block rows
    nbx: int        # block columns
    g_max: int
    m_max: int

    @property
    def hq(self) -> int:
        """Rows padded to whole blocks."""
        return self.nby * self.b

    @property
    def rh(self) -> int:
        return self.b + 2 * self.geo.py

    @property
    def rw(self) -> int:
        return self.b + 2 * self.geo.px

    @property
    def n_max(self) -> int:
        """Blocks of the largest batch."""
        return max(self.g_max, self.m_max)


def _plan(q, k, geo, b, col0, rows_batchable) -> _Plan:
    """``rows_batchable``: batches of block rows are allowed (not with image-layout logits, written per row)."""
    _, h, wk, _ = k.shape
    w = q.shape[2]
    nby, nbx = -(-h // b), -(-w // b)
    n_max = max(1, _GROUP_BYTES // (b * b * (b + 2 * geo.py) * (b + 2 * geo.px) * q.element_size()))
    g_max = min(nbx, n_max)
    m_max = min(nby, n_max) if g_max == 1 and rows_batchable else 1
    return _Plan(geo, b, h, w, wk, col0, nby, nbx, g_max, m_max)


class _Batch(NamedTuple):
    """One batched matmul: ``g`` block columns from ``gx0`` times ``m`` block rows from ``by`` of item ``bi``."""
    bi: int
    gx0: int
    g: int
    by: int
    m: int
    yn: int     # real query rows
    xn: int     # real query columns

    @property
    def n(self) -> int:
        return self.g * self.m


class _ScratchLogits:
    """No logits carried in or out: each batch's fresh in-window logits go to a reused scratch buffer."""
    rows_batchable = True

    def __init__(self, plan: _Plan, q: torch.Tensor, acc: torch.dtype):
        geo = plan.geo
        self.buf = q.new_empty(plan.n_max, plan.b, plan.b, geo.kh, geo.kw, dtype=acc)

    def update(self, cview: torch.Tensor, bt: _Batch) -> torch.Tensor:
        return self.buf[:bt.n].copy_(cview)

    def result(self):
        return None


class _ImageLogits:
    """Logits in the image layout (B, H, Wq, P), carried in (``prev``, updated in place when returned) and/or
    out. A batch holds one block row (its logits are rows of the image)."""
    rows_batchable = False

    def __init__(self, plan: _Plan, q: torch.Tensor, acc: torch.dtype, prev: Optional[torch.Tensor],
                 return_logits: bool):
        self.plan, self.prev = plan, prev
        self.scratch = _ScratchLogits(plan, q, acc) if prev is None else None
        self.logits = None
        if return_logits:
            self.logits = prev if prev is not None else q.new_empty(q.shape[0], plan.h, plan.w, plan.geo.p,
                                                                     dtype=acc)

    def update(self, cview: torch.Tensor, bt: _Batch) -> torch.Tensor:
        """L_t = L_{t-1} + q.k of the batch as (g, b, b, kh, kw); the returned logits' rows written."""
        b, geo = self.plan.b, self.plan.geo
        g, yn, xn = bt.g, bt.yn, bt.xn
        y0, x0 = bt.by * b, bt.gx0 * b
        if self.prev is None:
            lg = self.scratch.update(cview, bt)
        else:
            prev = self.prev[bt.bi, y0:y0 + yn, x0:x0 + xn]
            if yn < b or xn < g * b:
                prev = F.pad(prev, (0, 0, 0, g * b - xn, 0, b - yn))
            lg = cview + prev.reshape(b, g, b, geo.kh, geo.kw).transpose(0, 1)
        if self.logits is not None:
            self.logits[bt.bi, y0:y0 + yn, x0:x0 + xn] = lg.transpose(0, 1).reshape(b, g * b, geo.p)[:yn, :xn]
        return lg

    def result(self):
        return self.logits


class _BlockLogits:
    """Logits in the block layout (B, nby, nbx, b*b, P): a batch's logits are one contiguous piece, updated
    in place (``prev``) or written into a new tensor; the fresh logits go straight there."""
    rows_batchable = True

    def __init__(self, plan: _Plan, q: torch.Tensor, acc: torch.dtype, prev: Optional[torch.Tensor]):
        shape = (q.shape[0], plan.nby, plan.nbx, plan.b * plan.b, plan.geo.p)
        if prev is not None and tuple(prev.shape) != shape:
            raise ValueError(f'prev_logits in block layout must have shape {shape}, got {tuple(prev.shape)}')
        self.plan, self.carried = plan, prev is not None
        self.logits = prev if prev is not None else q.new_empty(shape, dtype=acc)

    def update(self, cview: torch.Tensor, bt: _Batch) -> torch.Tensor:
        b, geo = self.plan.b, self.plan.geo
        lg = self.logits[bt.bi, bt.by:bt.by + bt.m, bt.gx0:bt.gx0 + bt.g].view(bt.n, b, b, geo.kh, geo.kw)
        return lg.add_(cview) if self.carried else lg.copy_(cview)

    def result(self):
        return self.logits


def _logits_layout(plan_args, q, acc, prev_logits, return_logits, block_layout):
    """The logits layout of a call (``_ScratchLogits``, ``_ImageLogits`` or ``_BlockLogits``) and its plan."""
    if block_layout and (prev_logits is not None or return_logits):
        plan = _plan(*plan_args, rows_batchable=True)
        return plan, _BlockLogits(plan, q, acc, prev_logits)
    if prev_logits is not None or return_logits:
        plan = _plan(*plan_args, rows_batchable=False)
        return plan, _ImageLogits(plan, q, acc, prev_logits, return_logits)
    plan = _plan(*plan_args, rows_batchable=True)
    return plan, _ScratchLogits(plan, q, acc)


def _load_strips(plan: _Plan, strips, k, v, lo, hi, g):
    """Key/value strips of ``g`` block columns reaching key columns lo .. hi of k (H, W, D), v (H, W, C):
    gathered by ``Border.key`` where the window wraps, else copied and zero outside the image (those keys
    are masked by ``_border_bias``)."""
    b, py, rw, border = plan.b, plan.geo.py, plan.rw, plan.geo.border
    if border.wraps:
        dev = k.device
        iy = border.key(torch.arange(-py, plan.hq + py, device=dev), plan.h)[0]
        ix = border.key(torch.arange(lo, hi, device=dev), plan.wk)[0]
        for buf, src in zip(strips, (k, v)):
            buf[:g].copy_(src[iy][:, ix].unfold(1, rw, b).permute(1, 0, 3, 2))     # (g, hq+2py, rw, e)
    else:
        _fill_strips(strips, k, v, lo, g, b, rw, py)


def _border_bias(plan: _Plan, lg, bt: _Batch, out=None):
    """``lg`` (n, b, b, kh, kw) with out-of-image keys at -inf (written into ``out`` if given; carried logits
    stay as they are). Dummy (padding) queries keep every key so that no row is empty."""
    b, geo, dev = plan.b, plan.geo, lg.device
    qy = bt.by * b + torch.arange(bt.m * b, device=dev)
    qx = bt.gx0 * b + torch.arange(bt.g * b, device=dev)
    ky = qy[:, None] + torch.arange(-geo.py, geo.py + 1, device=dev)[None, :]                  # (m*b, kh)
    kx = plan.col0 + qx[:, None] + torch.arange(-geo.px, geo.px + 1, device=dev)[None, :]      # (g*b, kw)
    ok_y = geo.border.key(ky, plan.h)[1] | (qy >= plan.h)[:, None]
    ok_x = geo.border.key(kx, plan.wk)[1] | (qx >= plan.w)[:, None]
    bias_y = torch.zeros(bt.m * b, geo.kh, dtype=lg.dtype, device=dev).masked_fill_(~ok_y, float('-inf'))
    bias_x = torch.zeros(bt.g * b, geo.kw, dtype=lg.dtype, device=dev).masked_fill_(~ok_x, float('-inf'))
    return torch.add(lg, bias_y.view(bt.m, b, 1, geo.kh, 1), out=out).add_(bias_x.view(bt.g, 1, b, 1, geo.kw))


class _StripsKernel:
    """One call of ``strips_attention``: the loops over groups of blocks, with buffers reused by every batch.

    ``strips`` are the key and value strips (G, hq+2py, rw, D | C) of a group (rows outside the image zeroed
    once here); ``s_buf`` the halo logits and ``a_buf`` the halo weights (operand of the value matmul: the
    in-window entries of a block are the same strided view for every block, so the others are zeroed once
    here and never written); ``sm_buf`` the range-limited softmax's buffer (fp32 softmax only).
    """

    def __init__(self, q, k, v, plan: _Plan, layout, normalization):
        self.q, self.k, self.v, self.plan, self.layout, self.normalization = q, k, v, plan, layout, normalization
        geo, n_max, bb = plan.geo, plan.n_max, plan.b * plan.b
        acc = accum_dtype(q)     # in-window logits and softmax; q, k, v and the matmuls stay in q's dtype
        self.low_precision = acc != q.dtype
        self.out = q.new_empty(k.shape[0], plan.h, plan.w, v.shape[-1])
        self.s_buf = q.new_empty(n_max, bb, plan.rh * plan.rw, dtype=acc)
        self.strips = tuple(q.new_empty(plan.g_max, plan.hq + 2 * geo.py, plan.rw, t.shape[-1]) for t in (k, v))
        for buf in self.strips:
            buf[:, :geo.py].zero_()
            buf[:, geo.py + plan.h:].zero_()
        self.a_buf = q.new_zeros(n_max, bb, plan.rh * plan.rw)
        self.sm_buf = q.new_empty(n_max, bb, geo.p, dtype=acc) \
            if normalization == 'softmax' and acc == torch.float32 else None

    def run(self):
        plan = self.plan
        for bi in range(self.k.shape[0]):
            qp = F.pad(self.q[bi], (0, 0, 0, plan.nbx * plan.b - plan.w, 0, plan.hq - plan.h))
            for gx0 in range(0, plan.nbx, plan.g_max):
                self._group(bi, qp, gx0)
        return self.out, self.layout.result()

    def _group(self, bi, qp, gx0):
        """Queries of the block columns gx0 .. gx0+g of batch item ``bi`` (``qp``: its padded queries)."""
        plan = self.plan
        b, px, c = plan.b, plan.geo.px, self.v.shape[-1]
        g = min(plan.g_max, plan.nbx - gx0)
        x0 = gx0 * b
        xn = min(g * b, plan.w - x0)
        lo, hi = plan.col0 + x0 - px, plan.col0 + x0 + (g - 1) * b + plan.rw - px     # key columns of the group
        _load_strips(plan, self.strips, self.k[bi], self.v[bi], lo, hi, g)
        qs = qp[:, x0:x0 + g * b].reshape(plan.hq, g, b, -1).transpose(0, 1).contiguous()  # (g, hq, b, d)
        grp_out = self.q.new_empty(g, plan.hq, b, c)
        for by in range(0, plan.nby, plan.m_max):
            m = min(plan.m_max, plan.nby - by)
            bt = _Batch(bi, gx0, g, by, m, min(m * b, plan.h - by * b), xn)
            self._batch(bt, qs, grp_out, lo, hi)
        self.out[bi, :, x0:x0 + xn] = grp_out[:, :plan.h].transpose(0, 1).reshape(plan.h, g * b, c)[:, :xn]

    def _batch(self, bt: _Batch, qs, grp_out, lo, hi):
        """One batched matmul of the queries ``qs`` (g, hq, b, d) of a group against their halo regions."""
        plan = self.plan
        b, geo, n, y0 = plan.b, plan.geo, bt.n, bt.by * plan.b
        keys, values = (_regions(st, bt.g, bt.m, y0, b, plan.rh, plan.rw) for st in self.strips)  # (n, rh*rw, d|c)
        s, a = self.s_buf[:n], self.a_buf[:n]
        qb = qs[:, y0:y0 + bt.m * b].reshape(n, b * b, -1)
        if self.low_precision:
            # bf16/fp16 batched matmuls take oneDNN's fast path only on whole contiguous batches (PyTorch
            # copies other layouts first): the copies of these per-batch contiguous regions are plain block
            # copies. The fresh logits come out in the low-precision dtype and go to the fp32 buffer ``s``.
            qb, keys, values = qb.contiguous(), keys.contiguous(), values.contiguous()
            s.copy_(torch.matmul(qb, keys.transpose(1, 2)))
        else:
            torch.matmul(qb, keys.transpose(1, 2), out=s)
        lg = self.layout.update(_compact_view(s, b, plan.rh, plan.rw, geo.kh, geo.kw), bt)   # (n, b, b, kh, kw)
        interior = (geo.border.all_keys(y0 - geo.py, y0 + bt.m * b + geo.py, plan.h)
                    and geo.border.all_keys(lo, hi, plan.wk))
        if not interior:
            lg = _border_bias(plan, lg, bt, None if self.sm_buf is None else self.sm_buf[:n].view_as(lg))
        # Range-limited softmax (fp32): an out-of-image key gets weight <= e^-30 instead of 0, but its
        # value in the strips is 0, so only the normaliser moves, by under fp32 resolution.
        wts = normalize_attention(lg.view(n, b * b, geo.p), self.normalization, count=geo.p if interior else None,
                                  softmax_buf=None if self.sm_buf is None else self.sm_buf[:n])
        _compact_view(a, b, plan.rh, plan.rw, geo.kh, geo.kw).copy_(wts.view(n, b, b, geo.kh, geo.kw))
        grp_out[:, y0:y0 + bt.m * b] = torch.matmul(a, values).view(bt.g, bt.m * b, b, -1)


@torch.no_grad()
def strips_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: WindowGeometry, normalization: str,
                     prev_logits: Optional[torch.Tensor] = None, return_logits: bool = False, *,
                     block_size: int = FAST_BLOCK, block_layout: bool = False, col0: int = 0):
    """Window attention without autograd (validated arguments; see the module docstring).

    ``q`` holds the query columns ``col0 .. col0 + q.shape[2]`` of the image that ``k``/``v`` cover
    (``col0 = 0`` and equal sizes for a whole image; see ``window_attention_rows``).

    Args:
        q (Tensor): (B, H, Wq, D) queries. k (Tensor): (B, H, W, D) keys. v (Tensor): (B, H, W, C) values.
        geo (WindowGeometry): Window reach on the image.
        normalization (str): 'softmax' or 'count'.
        prev_logits (Tensor, optional): Carried logits, updated in place in the block layout.
        return_logits (bool): Also return the accumulated logits.
        block_size (int): Query block side b.
        block_layout (bool): Logits in the block layout (B, nby, nbx, b*b, P) instead of (B, H, Wq, P).
        col0 (int): Column of ``k`` holding the first query column.

    Returns:
        Tensor | tuple[Tensor, Tensor]: out (B, H, Wq, C) [, logits].
    """
    plan, layout = _logits_layout((q, k, geo, block_size, col0), q, accum_dtype(q), prev_logits, return_logits,
                                  block_layout)
    out, logits = _StripsKernel(q, k, v, plan, layout, normalization).run()
    return (out, logits) if return_logits else out


def window_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row0: int, window_size: int,
                          normalization: str = 'softmax', prev_logits: Optional[torch.Tensor] = None,
                          return_logits: bool = False, image_height: Optional[int] = None, border: str = 'exclude'):
    """Window attention of a band of query rows, for a border that does not wrap; inference only.

    Lets a network process an image in horizontal bands: the queries are the rows
    ``row0 .. row0 + n`` of the key image ``k``/``v``, which must hold every in-image row their
    windows reach (rows beyond ``k`` count as outside the image). Same result as those rows of
    ``window_attention(..., border=border)`` on the whole image.

    Args:
        q (Tensor): (B, n, W, D) query embeddings.
        k (Tensor): (B, Hk, W, D) key embeddings. v (Tensor): (B, Hk, W, C) values.
        row0 (int): Row of ``k`` holding the first query row.
        window_size (int): Odd window side q.
        normalization (str): 'softmax' or 'count'.
        prev_logits (Tensor, optional): Carried logits of the same query rows, in the block layout
            this function returns (B, ceil(W/8), ceil(n/8), 64, P) (blocks of the transposed band);
            updated in place.
        return_logits (bool): Also return the accumulated logits (block layout).
        image_height (int, optional): Height of the whole image; fixes the compact window size P
            (see ``WindowGeometry``). Default: Hk.
        border (str): One of ``STREAM_BORDERS`` (``Border.streams``). Default: 'exclude'.

    Returns:
        Tensor | tuple[Tensor, Tensor]: out (B, n, W, C) [, logits].
    """
    check_qkv(k, k, v)
    if q.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f'q must be (B, n, W, D) rows of k {tuple(k.shape)}, got {tuple(q.shape)}')
    if not 0 <= row0 <= k.shape[1] - q.shape[1]:
        raise ValueError(f'query rows {row0}..{row0 + q.shape[1]} are not rows of k (height {k.shape[1]})')
    if requires_grad(q, k, v):
        raise ValueError('window_attention_rows is inference-only (autograd is recording)')
    if check_window_args(window_size, border, normalization) is None:
        raise ValueError('window_attention_rows needs a window_size >= 1')
    if not border_rule(border).streams:
        raise ValueError(f'window_attention_rows needs a border in {STREAM_BORDERS} (bands of rows cannot '
                         f'see the rows a {border!r} window wraps to), got {border!r}')
    q, k, v = to_compute(q), to_compute(k), to_compute(v)
    # On the transposed band the query rows are columns: one group of block columns whose key
    # strips are the whole band, copied once (rows of blocks are then plain views).
    geo = window_geometry(k.shape[2], image_height or k.shape[1], window_size, border)
    res = strips_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), geo, normalization, prev_logits,
                           return_logits, block_layout=True, col0=row0)
    if return_logits:
        return res[0].transpose(1, 2), res[1]
    return res.transpose(1, 2)


__all__ = ['strips_attention', 'window_attention_rows', 'FAST_BLOCK']
