"""Inference (no-grad) halo kernel of window attention on key/value strips, and the band-of-rows API.

Block columns are processed in groups: the keys and values a group reaches are copied once into
column strips (g, H + 2py, b + 2px, D) and (g, H + 2py, b + 2px, C), so the halo region of each query
block is a contiguous (rh*rw, D) / (rh*rw, C) view that the batched matmuls read in place (several block rows of one
column are batched the same way, their regions overlapping). The in-window logits of query (i, j)
are the (kh, kw) sub-block of its halo logits starting at region cell (i, j); over a block they form
the strided view ``_compact_view`` (no gather). The normalisation runs on the compact layout and the
weights go into the same view of a halo buffer whose other entries stay zero, for the value matmul.
Same result as the autograd kernel (``halo.py``), with few copies and buffers reused across blocks.
Under autocast (q, k, v in bf16/fp16) the halo logits ``s``, the strips and the halo weights are in that
dtype (operands and output of the two matmuls); the carried and fresh in-window logits and the softmax are
fp32 (``common.py``).
"""
from typing import Optional

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


class _StripsKernel:
    """One call of ``strips_attention``: geometry, reused buffers and the loops over groups of blocks."""

    def __init__(self, q, k, v, geo, normalization, prev_logits, return_logits, b, blocks, col0):
        self.q, self.k, self.v, self.geo, self.normalization = q, k, v, geo, normalization
        self.prev_logits, self.return_logits = prev_logits, return_logits
        self.b, self.blocks, self.col0 = b, blocks, col0
        bsz, h, wk, d = k.shape
        self.h, self.wk, self.d, self.w, self.c = h, wk, d, q.shape[2], v.shape[-1]
        kh, kw, p, py = geo.kh, geo.kw, geo.p, geo.py
        self.nby, self.nbx = -(-h // b), -(-self.w // b)
        self.hq = self.nby * b
        self.rh, self.rw = b + 2 * py, b + 2 * geo.px
        rr, bb = self.rh * self.rw, b * b
        # Blocks per batched matmul: a group of g block columns, or for a single block column (a band,
        # see ``window_attention_rows``) m block rows, so that their halo logits stay cache-resident.
        acc = accum_dtype(q)     # in-window logits and softmax; q, k, v and the matmuls stay in q's dtype
        n_max = max(1, _GROUP_BYTES // (bb * rr * q.element_size()))
        self.g_max = min(self.nbx, n_max)
        image_logits = not blocks and (prev_logits is not None or return_logits)
        self.m_max = min(self.nby, n_max) if self.g_max == 1 and not image_logits else 1
        n_max = max(self.g_max, self.m_max)
        self.out = q.new_empty(bsz, h, self.w, self.c)
        self.logits = None
        if blocks and prev_logits is not None and tuple(prev_logits.shape) != (bsz, self.nby, self.nbx, bb, p):
            raise ValueError(f'prev_logits in block layout must have shape {(bsz, self.nby, self.nbx, bb, p)}, '
                             f'got {tuple(prev_logits.shape)}')
        if blocks and prev_logits is not None:
            self.logits = prev_logits                                                # updated in place
        elif return_logits:
            self.logits = prev_logits if prev_logits is not None else \
                q.new_empty((bsz, self.nby, self.nbx, bb, p) if blocks else (bsz, h, self.w, p), dtype=acc)
        self.offy = torch.arange(kh, device=q.device) - py
        self.offx = torch.arange(kw, device=q.device) - geo.px
        # Buffers reused by every batch of blocks (fewer allocations and page faults). ``a_buf``
        # holds the attention weights in halo layout: the in-window entries of a block are the same
        # strided view for every block, so the others are zeroed once here and never written.
        self.low_precision = acc != q.dtype
        self.s_buf = q.new_empty(n_max, bb, rr, dtype=acc)     # halo logits
        self.strips = tuple(q.new_empty(self.g_max, self.hq + 2 * py, self.rw, e) for e in (d, self.c))  # k, v
        for buf in self.strips:
            buf[:, :py].zero_()
            buf[:, py + h:].zero_()
        self.a_buf = q.new_zeros(n_max, bb, rr)                # halo weights, operand of the value matmul
        # Fresh logits of a batch when they are not written straight into block-layout carried logits.
        fresh = prev_logits is None and not (blocks and return_logits)
        self.lg_buf = q.new_empty(n_max, b, b, kh, kw, dtype=acc) if fresh else None
        self.sm_buf = q.new_empty(n_max, bb, p, dtype=acc) if normalization == 'softmax' and acc == torch.float32 \
            else None

    def run(self):
        for bi in range(self.k.shape[0]):
            qp = F.pad(self.q[bi], (0, 0, 0, self.nbx * self.b - self.w, 0, self.hq - self.h))
            for gx0 in range(0, self.nbx, self.g_max):
                self._group(bi, qp, gx0)
        return (self.out, self.logits) if self.return_logits else self.out

    def _group(self, bi, qp, gx0):
        """Queries of the block columns gx0 .. gx0+g of batch item ``bi`` (``qp``: its padded queries)."""
        b, py, px, rw = self.b, self.geo.py, self.geo.px, self.rw
        g = min(self.g_max, self.nbx - gx0)
        x0 = gx0 * b
        xn = min(g * b, self.w - x0)
        # Key columns lo .. hi of this group: gathered by ``Border.key`` where the window wraps, else
        # copied and zero outside the image (those keys are masked below).
        lo, hi = self.col0 + x0 - px, self.col0 + x0 + (g - 1) * b + rw - px
        if self.geo.border.wraps:
            dev = self.q.device
            iy = self.geo.border.key(torch.arange(-py, self.hq + py, device=dev), self.h)[0]
            ix = self.geo.border.key(torch.arange(lo, hi, device=dev), self.wk)[0]
            for buf, src in zip(self.strips, (self.k[bi], self.v[bi])):
                buf[:g].copy_(src[iy][:, ix].unfold(1, rw, b).permute(1, 0, 3, 2))     # (g, hq+2py, rw, e)
        else:
            _fill_strips(self.strips, self.k[bi], self.v[bi], lo, g, b, rw, py)
        qs = qp[:, x0:x0 + g * b].reshape(self.hq, g, b, self.d).transpose(0, 1).contiguous()  # (g, hq, b, d)
        grp_out = self.q.new_empty(g, self.hq, b, self.c)
        for by in range(0, self.nby, self.m_max):
            self._batch(bi, qs, grp_out, gx0, g, by, lo, hi)
        self.out[bi, :, x0:x0 + xn] = grp_out[:, :self.h].transpose(0, 1).reshape(self.h, g * b, self.c)[:, :xn]

    def _logits(self, bi, cview, gx0, g, by, m, yn, xn):
        """This batch's logits L_t = L_{t-1} + q.k as (n, b, b, kh, kw), written into carried logits if any."""
        b, kh, kw = self.b, self.geo.kh, self.geo.kw
        y0, x0, n = by * b, gx0 * b, g * m
        if self.blocks and self.logits is not None:
            lg = self.logits[bi, by:by + m, gx0:gx0 + g].view(n, b, b, kh, kw)
            lg.add_(cview) if self.prev_logits is not None else lg.copy_(cview)
        elif self.prev_logits is not None:     # image layout (m = 1)
            prev = self.prev_logits[bi, y0:y0 + yn, x0:x0 + xn]
            if yn < b or xn < g * b:
                prev = F.pad(prev, (0, 0, 0, g * b - xn, 0, b - yn))
            lg = cview + prev.reshape(b, g, b, kh, kw).transpose(0, 1)
        else:
            lg = self.lg_buf[:n].copy_(cview)
        if self.return_logits and not self.blocks:
            self.logits[bi, y0:y0 + yn, x0:x0 + xn] = lg.transpose(0, 1).reshape(b, g * b, self.geo.p)[:yn, :xn]
        return lg

    def _border_bias(self, lg, n, g, m, y0, x0):
        """Out-of-image keys to -inf (into the softmax buffer when there is one; carried logits stay as they are).
        Dummy (padding) queries keep every key so that no row is empty."""
        b, kh, kw, dev = self.b, self.geo.kh, self.geo.kw, self.q.device
        qy = y0 + torch.arange(m * b, device=dev)
        qx = x0 + torch.arange(g * b, device=dev)
        ky = qy[:, None] + self.offy[None, :]                                       # (m*b, kh)
        kx = self.col0 + qx[:, None] + self.offx[None, :]                            # (g*b, kw)
        ok_y = self.geo.border.key(ky, self.h)[1] | (qy >= self.h)[:, None]
        ok_x = self.geo.border.key(kx, self.wk)[1] | (qx >= self.w)[:, None]
        bias_y = torch.zeros(m * b, kh, dtype=lg.dtype, device=dev).masked_fill_(~ok_y, float('-inf'))
        bias_x = torch.zeros(g * b, kw, dtype=lg.dtype, device=dev).masked_fill_(~ok_x, float('-inf'))
        tgt = None if self.sm_buf is None else self.sm_buf[:n].view(n, b, b, kh, kw)
        return torch.add(lg, bias_y.view(m, b, 1, kh, 1), out=tgt).add_(bias_x.view(g, 1, b, 1, kw))

    def _batch(self, bi, qs, grp_out, gx0, g, by, lo, hi):
        """One batched matmul: g block columns (m = 1) or m block rows of one column, from block row ``by``."""
        b, geo, d = self.b, self.geo, self.d
        m = min(self.m_max, self.nby - by)
        n, y0, yn = g * m, by * b, min(m * b, self.h - by * b)                      # blocks; query rows
        xn = min(g * b, self.w - gx0 * b)
        keys, values = (_regions(st, g, m, y0, b, self.rh, self.rw) for st in self.strips)  # (n, rh*rw, d | c)
        s, a = self.s_buf[:n], self.a_buf[:n]
        qb = qs[:, y0:y0 + m * b].reshape(n, b * b, d)
        if self.low_precision:
            # bf16/fp16 batched matmuls take oneDNN's fast path only on whole contiguous batches (PyTorch
            # copies other layouts first): the copies of these per-batch contiguous regions are plain block
            # copies. The fresh logits come out in the low-precision dtype and go to the fp32 buffer ``s``.
            qb, keys, values = qb.contiguous(), keys.contiguous(), values.contiguous()
            s.copy_(torch.matmul(qb, keys.transpose(1, 2)))
        else:
            torch.matmul(qb, keys.transpose(1, 2), out=s)
        cview = _compact_view(s, b, self.rh, self.rw, geo.kh, geo.kw)               # (n, b, b, kh, kw)
        lg = self._logits(bi, cview, gx0, g, by, m, yn, xn)
        interior = (geo.border.all_keys(y0 - geo.py, y0 + m * b + geo.py, self.h)
                    and geo.border.all_keys(lo, hi, self.wk))
        if not interior:
            lg = self._border_bias(lg, n, g, m, y0, gx0 * b)
        # Range-limited softmax (fp32): an out-of-image key gets weight <= e^-30 instead of 0, but its
        # value in the strips is 0, so only the normaliser moves, by under fp32 resolution.
        wts = normalize_attention(lg.view(n, b * b, geo.p), self.normalization, count=geo.p if interior else None,
                                  softmax_buf=None if self.sm_buf is None else self.sm_buf[:n])
        _compact_view(a, b, self.rh, self.rw, geo.kh, geo.kw).copy_(wts.view(n, b, b, geo.kh, geo.kw))
        grp_out[:, y0:y0 + m * b] = torch.matmul(a, values).view(g, m * b, b, self.c)


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
    return _StripsKernel(q, k, v, geo, normalization, prev_logits, return_logits, block_size, block_layout,
                         col0).run()


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
