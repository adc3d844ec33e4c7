"""Autograd halo kernel of window attention: blocks of queries against their key region, pure torch ops.

A block of b x b queries attends to its (b+2py) x (b+2px) key region with dense batched matmuls and
a mask, one row of blocks at a time, so memory stays O(W * b * (b+2r)^2) besides the carried logits.
Carried logits use the compact layout ``logits[b, y, x, (dy+py)*kw + (dx+px)]`` for the neighbour
(y+dy, x+dx) (see ``WindowGeometry``); entries for out-of-image neighbours are unspecified.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..amp import accum_dtype
from .common import WindowGeometry, normalize_attention


def default_block(h: int, w: int) -> int:
    """Query block side of the halo kernel for an h x w image."""
    return max(1, min(8, h, w))


def _padded_index(n, pad_lo, pad_hi, rule, device):
    """Pixel index and validity of the key positions -pad_lo .. n+pad_hi of an axis (``Border.key``)."""
    return rule.key(torch.arange(-pad_lo, n + pad_hi, device=device), n)


class _Halo(NamedTuple):
    """Padded inputs and the static geometry of one block, shared by every row of blocks."""
    b: int                    # block side
    nbx: int                  # blocks per row
    qp: torch.Tensor          # (B, hq, wq, D) queries, zero-padded to whole blocks
    kp: torch.Tensor          # (B, hq+2py, wq+2px, D) keys over the padded region
    vp: torch.Tensor          # (B, hq+2py, wq+2px, C) values
    vy: torch.Tensor          # (hq+2py,) padded row is in the image (or wraps round)
    key_ok_x: torch.Tensor    # (nbx, rw) region column is in the image
    q_real_x: torch.Tensor    # (nbx, b) query column is in the image
    out_win: torch.Tensor     # (b*b, rh*rw) region cell outside the query's window
    cidx: torch.Tensor        # (b*b, P) region cell of each compact offset


def _halo_setup(q, k, v, geo: WindowGeometry, b) -> _Halo:
    _, h, w, _ = q.shape
    py, px, r = geo.py, geo.px, geo.r
    nby, nbx = -(-h // b), -(-w // b)
    hq, wq = nby * b, nbx * b
    rh, rw = b + 2 * py, b + 2 * px
    dev = q.device
    # Padded keys/values (rows -py .. hq+py, cols -px .. wq+px) and which of them are in the image.
    iy, vy = _padded_index(h, py, py + hq - h, geo.border, dev)
    ix, vx = _padded_index(w, px, px + wq - w, geo.border, dev)
    kp = k.index_select(1, iy).index_select(2, ix)
    vp = v.index_select(1, iy).index_select(2, ix)
    qp = F.pad(q, (0, 0, 0, wq - w, 0, hq - h))
    # Static geometry of one block: query (i, j) vs region cell (u, s).
    ar_b = torch.arange(b, device=dev)
    du = torch.arange(rh, device=dev)[None, :] - py - ar_b[:, None]            # (b, rh) = dy
    ds = torch.arange(rw, device=dev)[None, :] - px - ar_b[:, None]            # (b, rw) = dx
    out_win = ((du.abs() > r)[:, None, :, None] | (ds.abs() > r)[None, :, None, :]).reshape(b * b, rh * rw)
    # Compact index: query (i, j), offset (dy, dx) -> region cell (i+dy+py, j+dx+px).
    oy = torch.arange(geo.kh, device=dev)[None, :] + ar_b[:, None]              # (b, kh)
    ox = torch.arange(geo.kw, device=dev)[None, :] + ar_b[:, None]              # (b, kw)
    cidx = (oy[:, None, :, None] * rw + ox[None, :, None, :]).reshape(b * b, geo.p)
    key_ok_x = vx.unfold(0, rw, b)                                               # (nbx, rw)
    q_real_x = (torch.arange(wq, device=dev) < w).view(nbx, b)                   # (nbx, b)
    return _Halo(b, nbx, qp, kp, vp, vy, key_ok_x, q_real_x, out_win, cidx)


def _block_row(hl: _Halo, geo: WindowGeometry, by, h, w, normalization, prev_logits, return_logits):
    """Output rows (and compact logits) of the row ``by`` of query blocks: (B, yn, W, C) [, (B, yn, W, P)]."""
    b, nbx, p = hl.b, hl.nbx, geo.p
    bsz, _, wq, d = hl.qp.shape
    c = hl.vp.shape[-1]
    rh, rw = b + 2 * geo.py, b + 2 * geo.px
    y0 = by * b
    yn = min(b, h - y0)                                                          # real query rows
    qb = hl.qp[:, y0:y0 + b].reshape(bsz, b, nbx, b, d).permute(0, 2, 1, 3, 4).reshape(bsz * nbx, b * b, d)
    kr = hl.kp[:, y0:y0 + rh].unfold(2, rw, b)                                   # (B, rh, nbx, d, rw)
    kr = kr.permute(0, 2, 1, 4, 3).reshape(bsz * nbx, rh * rw, d)
    vr = hl.vp[:, y0:y0 + rh].unfold(2, rw, b).permute(0, 2, 1, 4, 3).reshape(bsz * nbx, rh * rw, c)
    s = torch.bmm(qb, kr.transpose(1, 2)).view(bsz, nbx, b * b, rh * rw).to(accum_dtype(qb))   # fp32 logits
    idx = hl.cidx.expand(bsz, nbx, b * b, p)
    if prev_logits is not None:
        prev = prev_logits[:, y0:y0 + yn]
        prev = F.pad(prev, (0, 0, 0, wq - w, 0, b - yn))
        prev = prev.reshape(bsz, b, nbx, b, p).permute(0, 2, 1, 3, 4).reshape(bsz, nbx, b * b, p)
        s = s.scatter_add(3, idx, prev)                                          # L_t = L_{t-1} + q.k
    lc = None
    if return_logits:
        lc = s.gather(3, idx).view(bsz, nbx, b, b, p).permute(0, 2, 1, 3, 4).reshape(bsz, b, wq, p)[:, :yn, :w]
    # Invalid = outside the window or outside the image; padded (dummy) queries keep all keys.
    ar_b = torch.arange(b, device=s.device)
    key_ok = hl.vy[y0:y0 + rh][None, :, None] & hl.key_ok_x[:, None, :]          # (nbx, rh, rw)
    q_real = ((ar_b < yn)[None, :, None] & hl.q_real_x[:, None, :]).reshape(nbx, b * b)
    invalid = (hl.out_win[None] | ~key_ok.reshape(nbx, 1, rh * rw)) & q_real[:, :, None]
    a = normalize_attention(s, normalization, invalid)
    o = torch.bmm(a.view(bsz * nbx, b * b, rh * rw).to(vr.dtype), vr)            # (B*nbx, b*b, c)
    o = o.view(bsz, nbx, b, b, c).permute(0, 2, 1, 3, 4).reshape(bsz, b, wq, c)[:, :yn, :w]
    return o, lc


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geo: WindowGeometry, normalization: str,
                   prev_logits: Optional[torch.Tensor] = None, return_logits: bool = False, *,
                   block_size: Optional[int] = None):
    """Window attention with autograd (validated arguments; see the module docstring).

    Args:
        q, k (Tensor): (B, H, W, D) embeddings. v (Tensor): (B, H, W, C) values.
        geo (WindowGeometry): Window reach on this image (``window_geometry``).
        normalization (str): 'softmax' or 'count'.
        prev_logits (Tensor, optional): (B, H, W, P) carried logits.
        return_logits (bool): Also return the accumulated logits (B, H, W, P).
        block_size (int, optional): Query block side b (default ``default_block``).

    Returns:
        Tensor | tuple[Tensor, Tensor]: out (B, H, W, C) [, logits (B, H, W, P)].
    """
    _, h, w, _ = q.shape
    hl = _halo_setup(q, k, v, geo, block_size or default_block(h, w))
    outs, logit_rows = [], []
    for by in range(-(-h // hl.b)):
        o, lc = _block_row(hl, geo, by, h, w, normalization, prev_logits, return_logits)
        outs.append(o)
        logit_rows.append(lc)
    out = torch.cat(outs, 1)
    if not return_logits:
        return out
    return out, torch.cat(logit_rows, 1)


__all__ = ['halo_attention', 'default_block']
