"""Non-local attention with correlation propagation (NLRN, Liu et al., NeurIPS 2018), as pure functions.

All feature tensors here are channels-last: ``q``/``k`` are (B, H, W, D) embeddings, ``v`` is (B, H, W, C).
A non-local step computes, for every query pixel i and every key pixel j in its neighbourhood,

    L_t(i, j) = L_{t-1}(i, j) + q_t(i) . k_t(j)        (NLRN eq. 5-6, no 1/sqrt(d) scaling)
    out(i)    = sum_j A(i, j) v(j),   A = softmax_j L_t(i, j)     ("softmax" normalisation)
                                   or A = L_t(i, j) / N_i           ("count": dot-product variants,
                                                                      N_i = number of valid keys)

Two neighbourhoods ("scopes"):

* global: every pixel of the tensor attends to every pixel (official NLRN code, 43x43 training
  patches / 45x45 test tiles). ``global_attention``.
* window: every pixel attends to the q x q window centred on it (the paper's description).
  ``window_attention``. At the border, out-of-image neighbours are either excluded from the
  normalisation (``border='exclude'``) or taken from the opposite side (``border='circular'``).

Correlation propagation can carry either the accumulated logits (``window_attention(...,
prev_logits=...)``, compact per-window layout (B, H, W, P)) or, equivalently, the concatenated
embeddings, since L_t = [q_1..q_t] . [k_1..k_t]^T. ``propagated_attention`` picks the
representation at run time and is the function a network calls once per step.

Every function has a naive dense counterpart (``dense_attention_reference``) built from an explicit
window mask over full attention, used by the tests.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

NORMALIZATIONS = ('softmax', 'count')
BORDERS = ('exclude', 'circular')

__all__ = [
    'CorrelationState', 'window_mask', 'dense_attention_reference', 'global_attention',
    'window_attention', 'window_attention_rows', 'propagated_attention', 'euclidean_embeddings',
    'check_window_args', 'compact_window_size'
]


class CorrelationState(NamedTuple):
    """Correlation carried from one non-local step to the next (NLRN correlation propagation).

    Exactly one representation is set:

    * ``q``, ``k``: concatenated embeddings of all steps so far, (B, H, W, D*t) each.
    * ``logits``: accumulated logits: dense (B, N, N), N = H*W, for small images while autograd
      records (any scope), else window logits in a layout of ``window_attention``: (B, H, W, P)
      when autograd records, the block layout (B, nby, nbx, b*b, P) in inference.
    """
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


def check_window_args(window_size, border, normalization='softmax'):
    """Validate the neighbourhood arguments; returns the window size as int (0 = global)."""
    if border not in BORDERS:
        raise ValueError(f'border must be one of {BORDERS}, got {border!r}')
    if normalization not in NORMALIZATIONS:
        raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got {normalization!r}')
    if window_size is None:
        return 0
    if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 0:
        raise ValueError(f'window_size must be a non-negative int or None, got {window_size!r}')
    if window_size and window_size % 2 == 0:
        raise ValueError(f'window_size must be odd (window centred on the pixel), got {window_size}')
    return window_size


def _check_qkv(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError('q, k, v must be channels-last (B, H, W, D); got shapes '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if q.shape != k.shape:
        raise ValueError(f'q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}')
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f'v must share (B, H, W) with q, got {tuple(v.shape)} and {tuple(q.shape)}')


def euclidean_embeddings(x):
    """Embeddings whose dot product is the Euclidean correlation, up to a per-query constant.

    -||x_i - x_j||^2 = 2 x_i.x_j - ||x_j||^2 - ||x_i||^2; the last term is constant over the keys of
    query i (also after summation over steps), so softmax over keys is unchanged without it.

    Args:
        x (Tensor): (B, H, W, C) features.

    Returns:
        tuple[Tensor, Tensor]: q = [2x, -1] and k = [x, ||x||^2], both (B, H, W, C+1).
    """
    q = torch.cat([2 * x, -torch.ones_like(x[..., :1])], dim=-1)
    k = torch.cat([x, (x * x).sum(-1, keepdim=True)], dim=-1)
    return q, k


# ----------------------------------------------------------------------------- dense reference


def window_mask(h, w, window_size, border='exclude', device=None):
    """Boolean (N, N) mask, N = h*w (row-major): True where key j is in the window of query i.

    Args:
        h, w (int): Image size.
        window_size (int | None): Odd window side q; None or 0 = whole image (global).
        border (str): 'exclude' (plain distance, out-of-image keys do not exist) or 'circular'
            (wrap-around distance).
    """
    window_size = check_window_args(window_size, border)
    n = h * w
    if not window_size:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    r = window_size // 2

    def near(size):   # (size, size): positions within r of each other (wrap-around if circular)
        i = torch.arange(size, device=device)
        d = (i[:, None] - i[None, :]).abs()
        return (torch.minimum(d, size - d) if border == 'circular' else d) <= r
    # Row and column conditions combined as an outer AND: no (N, N) integer temporaries.
    return (near(h)[:, None, :, None] & near(w)[None, :, None, :]).reshape(n, n)


def dense_attention_reference(q, k, v, window_size=None, border='exclude', normalization='softmax',
                              prev_logits=None):
    """Naive dense non-local step: full N x N logits with an explicit window mask.

    Args:
        q, k (Tensor): (B, H, W, D) embeddings.
        v (Tensor): (B, H, W, C) values.
        window_size (int | None): Odd window side; None/0 = global attention.
        border (str): 'exclude' or 'circular' (see ``window_mask``).
        normalization (str): 'softmax' or 'count' (divide by the number of valid keys).
        prev_logits (Tensor, optional): (B, N, N) logits carried from the previous step.

    Returns:
        tuple[Tensor, Tensor]: out (B, H, W, C) and the accumulated logits (B, N, N).
    """
    _check_qkv(q, k, v)
    b, h, w, d = q.shape
    mask = window_mask(h, w, window_size, border, device=q.device)
    logits = q.reshape(b, h * w, d) @ k.reshape(b, h * w, d).transpose(1, 2)
    if prev_logits is not None:
        logits = logits + prev_logits
    if normalization == 'softmax':
        attn = torch.softmax(logits.masked_fill(~mask, float('-inf')), dim=-1)
    else:
        attn = logits.masked_fill(~mask, 0) / mask.sum(-1, keepdim=True)
    out = attn @ v.reshape(b, h * w, -1)
    return out.reshape(b, h, w, -1), logits


# ----------------------------------------------------------------------------- global scope


def global_attention(q, k, v, normalization='softmax'):
    """Attention of every pixel over the whole tensor (official NLRN scope), memory-light.

    Softmax uses ``F.scaled_dot_product_attention`` (scale 1, as NLRN has no 1/sqrt(d)); the
    'count' normalisation is linear attention: q (k^T v) / N, never forming the N x N matrix.

    Args:
        q, k (Tensor): (B, H, W, D). v (Tensor): (B, H, W, C).
        normalization (str): 'softmax' or 'count'.

    Returns:
        Tensor: (B, H, W, C).
    """
    _check_qkv(q, k, v)
    b, h, w, d = q.shape
    c = v.shape[-1]
    qf, kf, vf = q.reshape(b, 1, h * w, d), k.reshape(b, 1, h * w, d), v.reshape(b, 1, h * w, c)
    if normalization == 'count':
        out = (qf @ (kf.transpose(-1, -2) @ vf)) / (h * w)
    elif normalization == 'softmax':
        out = _sdpa(qf, kf, vf)
    else:
        raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got {normalization!r}')
    return out.reshape(b, h, w, c)


def _sdpa(qf, kf, vf, mask=None):
    """Fused softmax attention without NLRN's missing 1/sqrt(d): (B, 1, N, D), (B, 1, N, C) -> (B, 1, N, C)."""
    d, c = qf.shape[-1], vf.shape[-1]
    # The fused CPU kernel needs equal head sizes: zero-padding q/k (or v) changes nothing.
    if d < c:
        qf, kf = F.pad(qf, (0, c - d)), F.pad(kf, (0, c - d))
    elif c < d and not qf.is_cuda:
        vf = F.pad(vf, (0, d - c))
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=1.0)[..., :c]


# Up to this many pixels, a window-scope step with autograd runs as fused attention over the whole
# (small) image with the window as a mask: at NLRN's 43x43 training size a q = 45 window covers most
# of the image, so the halo blocks would compute more than the dense logits.
_DENSE_WINDOW_PIXELS = 64 * 64


def _masked_window_sdpa(q, k, v, window_size, border):
    """Softmax window attention of a small image as one fused masked attention (memory O(N))."""
    b, h, w, d = q.shape
    mask = window_mask(h, w, window_size, border, device=q.device)
    out = _sdpa(q.reshape(b, 1, h * w, d), k.reshape(b, 1, h * w, d), v.reshape(b, 1, h * w, -1), mask)
    return out.reshape(b, h, w, -1)


# With autograd on, a propagated step keeps dense (B, N, N) logits while they take at most this
# many bytes: carrying the concatenated embeddings instead grows the logit matmul by D every step
# (12 steps: 6.5x its flops, and the fused kernel pads v to the embedding size).
_DENSE_LOGIT_BYTES = 256 * 2**20


def _dense_step(q, k, v, prev_logits, window_size, border, normalization):
    """One propagated step on dense logits ``prev + q k^T`` (NLRN eq. 5-6), differentiable.

    Args:
        q, k (Tensor): (B, H, W, D). v (Tensor): (B, H, W, C).
        prev_logits (Tensor | None): (B, N, N) logits of the previous steps.
        window_size (int): 0 for the whole image, else the odd window side (mask, see ``window_mask``).

    Returns:
        tuple[Tensor, Tensor]: out (B, H, W, C) and the logits (B, N, N).
    """
    b, h, w, d = q.shape
    qf, kf, vf = q.reshape(b, h * w, d), k.reshape(b, h * w, d), v.reshape(b, h * w, -1)
    logits = torch.bmm(qf, kf.transpose(1, 2)) if prev_logits is None else \
        torch.baddbmm(prev_logits, qf, kf.transpose(1, 2))
    mask = window_mask(h, w, window_size, border, device=q.device) if window_size else None
    if normalization == 'softmax':
        attn = torch.softmax(logits if mask is None else logits.masked_fill(~mask, float('-inf')), dim=-1)
    else:
        attn = (logits if mask is None else logits.masked_fill(~mask, 0)) / \
            (h * w if mask is None else mask.sum(-1, keepdim=True))
    return torch.bmm(attn, vf).reshape(b, h, w, -1), logits


def _use_masked_sdpa(q, k, v, normalization, prev_logits=None, return_logits=False):
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (grad and normalization == 'softmax' and prev_logits is None and not return_logits
            and q.shape[1] * q.shape[2] <= _DENSE_WINDOW_PIXELS)


# ----------------------------------------------------------------------------- window scope


def _window_geometry(h, w, window_size, border):
    r = window_size // 2
    if border == 'circular':
        if window_size > h or window_size > w:
            raise ValueError(f"border='circular' needs window_size <= image size, got window_size="
                             f'{window_size} for a {h}x{w} image')
        return r, r, r
    # Keys further than h-1 (w-1) rows (columns) away are never inside the image.
    return r, min(r, h - 1), min(r, w - 1)


def compact_window_size(h, w, window_size, border='exclude'):
    """Number P of entries per pixel in the compact logits layout of ``window_attention``."""
    window_size = check_window_args(window_size, border)
    _, py, px = _window_geometry(h, w, window_size, border)
    return (2 * py + 1) * (2 * px + 1)


def _padded_index(n, pad_lo, pad_hi, circular, device):
    pos = torch.arange(-pad_lo, n + pad_hi, device=device)
    valid = (pos >= 0) & (pos < n)
    idx = pos % n if circular else pos.clamp(0, n - 1)
    return idx, valid | circular


def _default_block(h, w):
    return max(1, min(8, h, w))


def window_attention(q, k, v, window_size, border='exclude', normalization='softmax', prev_logits=None,
                     return_logits=False, block_size=None, logits_layout='image'):
    """Every pixel attends to the ``window_size`` x ``window_size`` window centred on it.

    Blocked "halo" algorithm: a block of b x b queries attends to its (b+2r) x (b+2r) key region
    with dense batched matmuls and a mask, one row of blocks at a time, so memory stays
    O(W * b * (b+2r)^2) besides the optional carried logits. Differentiable (pure torch ops).

    Carried logits use a compact layout: ``logits[b, y, x, (dy+py)*(2px+1) + (dx+px)]`` for the
    neighbour (y+dy, x+dx), |dy| <= py, |dx| <= px, where (py, px) = (r, r) except for border
    'exclude' on images smaller than the window ((h-1, w-1) then). Entries for out-of-image
    neighbours are unspecified.

    Args:
        q, k (Tensor): (B, H, W, D) embeddings. v (Tensor): (B, H, W, C) values.
        window_size (int): Odd window side q (>= 1).
        border (str): 'exclude' (out-of-image neighbours are left out of the normalisation) or
            'circular' (wrap-around; needs q <= H and q <= W).
        normalization (str): 'softmax' or 'count'.
        prev_logits (Tensor, optional): (B, H, W, P) carried logits (see above). When autograd is
            not recording for it, it is updated IN PLACE to the new logits to save memory.
        return_logits (bool): Also return the accumulated logits (B, H, W, P).
        block_size (int, optional): Query block side b of the blocked algorithm (default: chosen
            from the size; with autograd on a small image and softmax, one fused masked attention
            over the image is used instead unless a block size is given).
        logits_layout (str): 'image' for the (B, H, W, P) layout above, or 'blocks' for the
            inference-only layout (B, nby, nbx, b*b, P) of query blocks (faster: updated in place,
            no permutes; only valid with autograd off and the same block size).

    Returns:
        Tensor | tuple[Tensor, Tensor]: out (B, H, W, C) [, logits (B, H, W, P)].
    """
    _check_qkv(q, k, v)
    window_size = check_window_args(window_size, border, normalization)
    if window_size == 0:
        raise ValueError('window_attention needs a window_size >= 1; use global_attention for global')
    bsz, h, w, d = q.shape
    c = v.shape[-1]
    r, py, px = _window_geometry(h, w, window_size, border)
    kh, kw = 2 * py + 1, 2 * px + 1
    p = kh * kw
    if prev_logits is not None and logits_layout == 'image' and tuple(prev_logits.shape) != (bsz, h, w, p):
        raise ValueError(f'prev_logits must have shape {(bsz, h, w, p)} (compact window layout), '
                         f'got {tuple(prev_logits.shape)}')
    tensors = (q, k, v) if prev_logits is None else (q, k, v, prev_logits)
    if logits_layout not in ('image', 'blocks'):
        raise ValueError(f"logits_layout must be 'image' or 'blocks', got {logits_layout!r}")
    if block_size is None and _use_masked_sdpa(q, k, v, normalization, prev_logits, return_logits):
        return _masked_window_sdpa(q, k, v, window_size, border)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _window_attention_nograd(q, k, v, r, py, px, border, normalization, prev_logits,
                                        return_logits, block_size or _FAST_BLOCK, logits_layout == 'blocks')
    if logits_layout == 'blocks':
        raise ValueError("logits_layout='blocks' is inference-only (autograd is recording)")
    b = block_size or _default_block(h, w)
    nby, nbx = -(-h // b), -(-w // b)
    hq, wq = nby * b, nbx * b
    rh, rw = b + 2 * py, b + 2 * px
    dev = q.device
    circ = border == 'circular'

    # Padded keys/values (rows -py .. hq+py, cols -px .. wq+px) and which of them are in the image.
    iy, vy = _padded_index(h, py, py + hq - h, circ, dev)
    ix, vx = _padded_index(w, px, px + wq - w, circ, dev)
    kp = k.index_select(1, iy).index_select(2, ix)
    vp = v.index_select(1, iy).index_select(2, ix)
    qp = F.pad(q, (0, 0, 0, wq - w, 0, hq - h))

    # Static geometry of one block: query (i, j) vs region cell (u, s).
    ar_b = torch.arange(b, device=dev)
    du = torch.arange(rh, device=dev)[None, :] - py - ar_b[:, None]            # (b, rh) = dy
    ds = torch.arange(rw, device=dev)[None, :] - px - ar_b[:, None]            # (b, rw) = dx
    out_win = ((du.abs() > r)[:, None, :, None] | (ds.abs() > r)[None, :, None, :]).reshape(b * b, rh * rw)
    # Compact index: query (i, j), offset (dy, dx) -> region cell (i+dy+py, j+dx+px).
    oy = torch.arange(kh, device=dev)[None, :] + ar_b[:, None]                  # (b, kh)
    ox = torch.arange(kw, device=dev)[None, :] + ar_b[:, None]                  # (b, kw)
    cidx = (oy[:, None, :, None] * rw + ox[None, :, None, :]).reshape(b * b, p)
    key_ok_x = vx.unfold(0, rw, b)                                               # (nbx, rw)
    q_real_x = (torch.arange(wq, device=dev) < w).view(nbx, b)                   # (nbx, b)

    tensors = (q, k, v) if prev_logits is None else (q, k, v, prev_logits)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    inplace = prev_logits is not None and not grad
    outs, logit_rows = [], []
    out_buf = None if grad else q.new_empty(bsz, h, w, c)
    logit_buf = None
    if return_logits and not grad:
        logit_buf = prev_logits if inplace else q.new_empty(bsz, h, w, p)

    for by in range(nby):
        y0 = by * b
        yn = min(b, h - y0)                                                      # real query rows
        qb = qp[:, y0:y0 + b].reshape(bsz, b, nbx, b, d).permute(0, 2, 1, 3, 4).reshape(bsz * nbx, b * b, d)
        kr = kp[:, y0:y0 + rh].unfold(2, rw, b)                                  # (B, rh, nbx, d, rw)
        kr = kr.permute(0, 2, 1, 4, 3).reshape(bsz * nbx, rh * rw, d)
        vr = vp[:, y0:y0 + rh].unfold(2, rw, b).permute(0, 2, 1, 4, 3).reshape(bsz * nbx, rh * rw, c)
        s = torch.bmm(qb, kr.transpose(1, 2)).view(bsz, nbx, b * b, rh * rw)
        idx = cidx.expand(bsz, nbx, b * b, p)
        if prev_logits is not None:
            prev = prev_logits[:, y0:y0 + yn]
            prev = F.pad(prev, (0, 0, 0, wq - w, 0, b - yn))
            prev = prev.reshape(bsz, b, nbx, b, p).permute(0, 2, 1, 3, 4).reshape(bsz, nbx, b * b, p)
            s = s.scatter_add_(3, idx, prev) if not grad else s.scatter_add(3, idx, prev)
        if return_logits:
            lc = s.gather(3, idx).view(bsz, nbx, b, b, p).permute(0, 2, 1, 3, 4).reshape(bsz, b, wq, p)
            lc = lc[:, :yn, :w]
            if grad:
                logit_rows.append(lc)
            else:
                logit_buf[:, y0:y0 + yn] = lc
        # Invalid = outside the window or outside the image; padded (dummy) queries keep all keys.
        key_ok = vy[y0:y0 + rh][None, :, None] & key_ok_x[:, None, :]            # (nbx, rh, rw)
        q_real = ((ar_b < yn)[None, :, None] & q_real_x[:, None, :]).reshape(nbx, b * b)
        invalid = (out_win[None] | ~key_ok.reshape(nbx, 1, rh * rw)) & q_real[:, :, None]
        if normalization == 'softmax':
            if grad:
                a = torch.softmax(s.masked_fill(invalid, float('-inf')), dim=-1)
            else:
                a = torch.softmax(s.masked_fill_(invalid, float('-inf')), dim=-1)
        else:
            count = (~invalid).sum(-1, keepdim=True).to(s.dtype)
            a = s.masked_fill(invalid, 0) / count
        o = torch.bmm(a.view(bsz * nbx, b * b, rh * rw), vr)                     # (B*nbx, b*b, c)
        o = o.view(bsz, nbx, b, b, c).permute(0, 2, 1, 3, 4).reshape(bsz, b, wq, c)[:, :yn, :w]
        if grad:
            outs.append(o)
        else:
            out_buf[:, y0:y0 + yn] = o
    out = torch.cat(outs, 1) if grad else out_buf
    if not return_logits:
        return out
    logits = torch.cat(logit_rows, 1) if grad else logit_buf
    return out, logits



_FAST_BLOCK = 8
_GROUP_BYTES = 3 * 2**20     # halo logits of one group of query blocks stay cache-resident
# fp32 softmax of logits spread over a wide range is slow on the CPU: torch's vectorised exp leaves
# its fast path for arguments below about -87 (10x slower), and weights near 1e-38 make the value
# matmul meet denormals. Logits further than this below their row's maximum are raised to it
# first (so are the -inf of out-of-image keys): each such weight becomes e^-30 (~1e-13) of the
# largest, changing a normaliser >= 1 by at most P * 1e-13, under fp32 resolution. float64 keeps
# the plain softmax.
_LOGIT_RANGE = 30.0


def _range_limited_softmax(x, buf):
    """Softmax over the last dim of logits ``x`` (N, P) (-inf allowed), via ``buf`` (N, P); see _LOGIT_RANGE."""
    floor = x.amax(-1, keepdim=True).sub_(_LOGIT_RANGE)
    return torch.softmax(torch.maximum(x, floor, out=buf), dim=-1)


@torch.no_grad()
def _window_attention_nograd(q, k, v, r, py, px, border, normalization, prev_logits, return_logits, b, blocks,
                             col0=0):
    """Inference path of ``window_attention``: same result, no index tensors, few copies.

    ``q`` holds the query columns ``col0 .. col0 + q.shape[2]`` of the image that ``k``/``v`` cover
    (``col0 = 0`` and equal sizes for a whole image; see ``window_attention_rows``).

    Block columns are processed in groups: the keys and values a group reaches are copied once into
    column strips (g, H + 2py, b + 2px, D + C), so the halo region of each query block is a strided
    (rh*rw, D) / (rh*rw, C) view that the batched matmuls read in place (several block rows of one
    column are batched the same way, their regions overlapping). The in-window logits of query
    (i, j) are the (kh, kw) sub-block of its halo logits starting at region cell (i, j); over a block
    they form the strided view ``_compact_view`` (no gather). Softmax runs on the compact layout and
    the weights go into the same view of a halo buffer whose other entries stay zero, for the value
    matmul.
    """
    bsz, h, wk, d = k.shape
    w = q.shape[2]
    c = v.shape[-1]
    kh, kw = 2 * py + 1, 2 * px + 1
    p = kh * kw
    nby, nbx = -(-h // b), -(-w // b)
    hq, wq = nby * b, nbx * b
    rh, rw = b + 2 * py, b + 2 * px
    rr, bb = rh * rw, b * b
    dev = q.device
    circ = border == 'circular'
    # Blocks per batched matmul: a group of g block columns, or for a single block column (a band,
    # see ``window_attention_rows``) m block rows, so that their halo logits stay cache-resident.
    n_max = max(1, _GROUP_BYTES // (bb * rr * q.element_size()))
    g_max = min(nbx, n_max)
    image_logits = not blocks and (prev_logits is not None or return_logits)
    m_max = min(nby, n_max) if g_max == 1 and not image_logits else 1
    n_max = max(g_max, m_max)
    out = q.new_empty(bsz, h, w, c)
    logits = None
    if blocks and prev_logits is not None and tuple(prev_logits.shape) != (bsz, nby, nbx, bb, p):
        raise ValueError(f'prev_logits in block layout must have shape {(bsz, nby, nbx, bb, p)}, '
                         f'got {tuple(prev_logits.shape)}')
    if blocks and prev_logits is not None:
        logits = prev_logits                                                     # updated in place
    elif return_logits:
        logits = prev_logits if prev_logits is not None else \
            q.new_empty((bsz, nby, nbx, bb, p) if blocks else (bsz, h, w, p))
    offy = torch.arange(kh, device=dev) - py
    offx = torch.arange(kw, device=dev) - px
    # Buffers reused by every batch of blocks (fewer allocations and page faults). ``a_buf``
    # holds the attention weights in halo layout: the in-window entries of a block are the same
    # strided view for every block, so the others are zeroed once here and never written.
    s_buf = q.new_empty(n_max, bb, rr)
    strips = q.new_empty(g_max, hq + 2 * py, rw, d + c)     # keys and values of a group, see ``_fill_strips``
    strips[:, :py].zero_()
    strips[:, py + h:].zero_()
    a_buf = q.new_zeros(n_max, bb, rr)
    # Fresh logits of a batch when they are not written straight into block-layout carried logits.
    lg_buf = q.new_empty(n_max, b, b, kh, kw) if prev_logits is None and not (blocks and return_logits) else None
    sm_buf = q.new_empty(n_max, bb, p) if normalization == 'softmax' and q.element_size() <= 4 else None
    for bi in range(bsz):
        qp = F.pad(q[bi], (0, 0, 0, wq - w, 0, hq - h))
        for gx0 in range(0, nbx, g_max):
            g = min(g_max, nbx - gx0)
            x0 = gx0 * b
            xn = min(g * b, w - x0)
            # Key columns lo .. hi of this group, zero outside the image (or wrapped round if circular).
            lo, hi = col0 + x0 - px, col0 + x0 + (g - 1) * b + rw - px
            if circ:
                iy = torch.arange(-py, hq + py, device=dev) % h
                ix = torch.arange(lo, hi, device=dev) % wk
                kv = torch.cat([k[bi], v[bi]], -1)[iy][:, ix]
                strips[:g].copy_(kv.unfold(1, rw, b).permute(1, 0, 3, 2))            # (g, hq+2py, rw, d+c)
            else:   # zero outside the image (those keys are masked below)
                _fill_strips(strips, k[bi], v[bi], lo, g, b, rw, py)
            qs = qp[:, x0:x0 + g * b].reshape(hq, g, b, d).transpose(0, 1).contiguous()  # (g, hq, b, d)
            os = q.new_empty(g, hq, b, c)
            for by in range(0, nby, m_max):
                m = min(m_max, nby - by)
                n, y0, yn = g * m, by * b, min(m * b, h - by * b)                    # blocks; query rows
                reg = _regions(strips, g, m, y0, b, rh, rw)                         # (n, rh*rw, d+c)
                s, a = s_buf[:n], a_buf[:n]
                torch.matmul(qs[:, y0:y0 + m * b].reshape(n, bb, d), reg[..., :d].transpose(1, 2), out=s)
                cview = _compact_view(s, b, rh, rw, kh, kw)                          # (n, b, b, kh, kw)
                if blocks and logits is not None:
                    lg = logits[bi, by:by + m, gx0:gx0 + g].view(n, b, b, kh, kw)   # L_t = L_{t-1} + q.k
                    lg.add_(cview) if prev_logits is not None else lg.copy_(cview)
                elif prev_logits is not None:     # image layout (m = 1)
                    prev = prev_logits[bi, y0:y0 + yn, x0:x0 + xn]
                    if yn < b or xn < g * b:
                        prev = F.pad(prev, (0, 0, 0, g * b - xn, 0, b - yn))
                    lg = cview + prev.reshape(b, g, b, kh, kw).transpose(0, 1)
                else:
                    lg = lg_buf[:n].copy_(cview)
                if return_logits and not blocks:
                    logits[bi, y0:y0 + yn, x0:x0 + xn] = lg.transpose(0, 1).reshape(b, g * b, p)[:yn, :xn]
                interior = circ or (y0 - py >= 0 and y0 + m * b + py <= h and lo >= 0 and hi <= wk)
                if not interior:
                    # Out-of-image keys; dummy (padding) queries keep every key so no row is empty.
                    qy = y0 + torch.arange(m * b, device=dev)
                    qx = x0 + torch.arange(g * b, device=dev)
                    ky = qy[:, None] + offy[None, :]                                    # (m*b, kh)
                    kx = col0 + qx[:, None] + offx[None, :]                              # (g*b, kw)
                    ok_y = ((ky >= 0) & (ky < h)) | (qy >= h)[:, None]
                    ok_x = ((kx >= 0) & (kx < wk)) | (qx >= w)[:, None]
                    bias_y = torch.zeros(m * b, kh, dtype=lg.dtype, device=dev).masked_fill_(~ok_y, float('-inf'))
                    bias_x = torch.zeros(g * b, kw, dtype=lg.dtype, device=dev).masked_fill_(~ok_x, float('-inf'))
                    # Into the softmax buffer when there is one (the carried logits stay as they are).
                    tgt = None if sm_buf is None else sm_buf[:n].view(n, b, b, kh, kw)
                    lg = torch.add(lg, bias_y.view(m, b, 1, kh, 1), out=tgt).add_(bias_x.view(g, 1, b, 1, kw))
                lg = lg.view(n, bb, p)
                if normalization == 'softmax':
                    # Range-limited (fp32): an out-of-image key gets weight <= e^-30 instead of 0, but its
                    # value in the strips is 0, so only the normaliser moves, by under fp32 resolution.
                    wts = _range_limited_softmax(lg, sm_buf[:n]) if sm_buf is not None else torch.softmax(lg, dim=-1)
                elif interior:
                    wts = lg / p
                else:
                    valid = torch.isfinite(lg)
                    wts = lg.masked_fill(~valid, 0.) / valid.sum(-1, keepdim=True)
                _compact_view(a, b, rh, rw, kh, kw).copy_(wts.view(n, b, b, kh, kw))
                os[:, y0:y0 + m * b] = torch.matmul(a, reg[..., d:]).view(g, m * b, b, c)
            out[bi, :, x0:x0 + xn] = os[:, :h].transpose(0, 1).reshape(h, g * b, c)[:, :xn]
    return (out, logits) if return_logits else out


def _regions(strips, g, m, y0, b, rh, rw):
    """Halo regions of g block columns (m = 1) or of m block rows of one column (g = 1) from row y0,
    as an (n, rh*rw, D+C) view of ``strips`` (G, hq+2py, rw, D+C): consecutive block rows overlap."""
    if m == 1:
        return strips[:g, y0:y0 + rh].reshape(g, rh * rw, -1)
    st = strips.stride()
    return strips[0, y0:].as_strided((m, rh * rw, strips.shape[-1]), (b * st[1], st[2], st[3]))


def _fill_strips(strips, k, v, lo, g, b, rw, py):
    """Copy the key/value columns that ``g`` block columns reach into ``strips`` (G, hq+2py, rw, D+C).

    Strip j holds columns lo + j*b .. lo + j*b + rw of [k, v] (H, W, D+C) in its rows py .. py+H;
    the rows outside are zeroed once by the caller and out-of-image columns here, so one
    buffer serves every group without clearing it.
    """
    h, wk, d = k.shape
    for j in range(g):
        a = lo + j * b
        s0, s1 = max(a, 0), min(a + rw, wk)
        st = strips[j, py:py + h]
        if s0 > a:
            st[:, :s0 - a].zero_()
        if s1 < a + rw:
            st[:, max(s1, s0) - a:].zero_()
        if s1 > s0:
            st[:, s0 - a:s1 - a, :d] = k[:, s0:s1]
            st[:, s0 - a:s1 - a, d:] = v[:, s0:s1]


def window_attention_rows(q, k, v, row0, window_size, normalization='softmax', prev_logits=None,
                          return_logits=False, image_height=None):
    """Window attention (border 'exclude') of a band of query rows; inference only.

    Lets a network process an image in horizontal bands: the queries are the rows
    ``row0 .. row0 + n`` of the key image ``k``/``v``, which must hold every in-image row their
    windows reach (rows beyond ``k`` count as outside the image). Same result as those rows of
    ``window_attention(..., border='exclude')`` on the whole image.

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
            (see ``compact_window_size``). Default: Hk.

    Returns:
        Tensor | tuple[Tensor, Tensor]: out (B, n, W, C) [, logits].
    """
    _check_qkv(k, k, v)
    if q.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f'q must be (B, n, W, D) rows of k {tuple(k.shape)}, got {tuple(q.shape)}')
    if not 0 <= row0 <= k.shape[1] - q.shape[1]:
        raise ValueError(f'query rows {row0}..{row0 + q.shape[1]} are not rows of k (height {k.shape[1]})')
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError('window_attention_rows is inference-only (autograd is recording)')
    window_size = check_window_args(window_size, 'exclude', normalization)
    if window_size == 0:
        raise ValueError('window_attention_rows needs a window_size >= 1')
    r = window_size // 2
    # On the transposed band the query rows are columns: one group of block columns whose key
    # strips are the whole band, copied once (rows of blocks are then plain views).
    py, px = min(r, k.shape[2] - 1), min(r, (image_height or k.shape[1]) - 1)
    res = _window_attention_nograd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), r, py, px, 'exclude',
                                   normalization, prev_logits, return_logits, _FAST_BLOCK, True, col0=row0)
    if return_logits:
        return res[0].transpose(1, 2), res[1]
    return res.transpose(1, 2)


def _compact_view(s, b, rh, rw, kh, kw):
    """(m, b*b, rh*rw) halo logits -> strided view (m, b, b, kh, kw) of the in-window entries."""
    rr = rh * rw
    m = s.shape[0]
    st = s.stride()
    return s.as_strided((m, b, b, kh, kw), (st[0], b * rr + rw, rr + 1, rw, 1), s.storage_offset())


# ----------------------------------------------------------------------------- one propagated step


def _available_memory_bytes(device):
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def _store_logits_auto(q, p):
    """Run-time choice of the carried-state representation for the window scope.

    Stored logits cost P floats per pixel but make every step O(P * D); concatenated embeddings
    cost 2*D*t floats per pixel and O(P * D * t) per step. Logits are kept while they fit 40% of
    the currently available memory.
    """
    need = q.shape[0] * q.shape[1] * q.shape[2] * p * q.element_size()
    return need <= 0.4 * _available_memory_bytes(q.device)


def propagated_attention(q, k, v, state=None, window_size=None, border='exclude', normalization='softmax',
                         propagate=True, store_logits=None):
    """One non-local step with correlation propagation; the function a network calls per step.

    Args:
        q, k (Tensor): (B, H, W, D) embeddings of this step. v (Tensor): (B, H, W, C).
        state (CorrelationState, optional): Returned by the previous step (None at the first).
        window_size (int | None): Odd window side; None or 0 = global attention over the tensor.
        border (str): 'exclude' or 'circular' (window scope only).
        normalization (str): 'softmax' or 'count'.
        propagate (bool): Carry the correlation to the next step. If False, returns state None.
        store_logits (bool, optional): Window scope: carry window logits (True) or concatenated
            embeddings (False). Default: decided at run time: while autograd records and the dense
            (B, N, N) logits take at most 256 MB (NLRN's 43x43 training patches), dense logits in
            either scope; otherwise window logits while they fit in memory.

    Returns:
        tuple[Tensor, CorrelationState | None]: out (B, H, W, C) and the new state.
    """
    window_size = check_window_args(window_size, border, normalization)
    dense = state is not None and state.logits is not None and state.logits.dim() == 3
    if (state is None and propagate and store_logits is None and torch.is_grad_enabled()
            and any(t.requires_grad for t in (q, k, v))):
        b, n = q.shape[0], q.shape[1] * q.shape[2]
        dense = b * n * n * q.element_size() <= _DENSE_LOGIT_BYTES
    if dense:
        out, logits = _dense_step(q, k, v, None if state is None else state.logits, window_size, border,
                                  normalization)
        return out, (CorrelationState(logits=logits) if propagate else None)
    if state is not None and state.q is not None:
        q = torch.cat([state.q, q], dim=-1)
        k = torch.cat([state.k, k], dim=-1)
    if not window_size:
        if state is not None and state.logits is not None:
            raise ValueError('global attention carries embeddings or dense logits, not window logits')
        out = global_attention(q, k, v, normalization)
        return out, (CorrelationState(q=q, k=k) if propagate else None)
    if not store_logits and (state is None or state.logits is None) and _use_masked_sdpa(q, k, v, normalization):
        # Small image in training: carry the embeddings and run fused masked attention.
        out = window_attention(q, k, v, window_size, border, normalization)
        return out, (CorrelationState(q=q, k=k) if propagate else None)
    layout = 'image' if torch.is_grad_enabled() and (q.requires_grad or v.requires_grad) else 'blocks'
    if state is not None and state.logits is not None:
        layout = 'blocks' if state.logits.dim() == 5 else 'image'
        out, logits = window_attention(q, k, v, window_size, border, normalization,
                                       prev_logits=state.logits, return_logits=propagate, logits_layout=layout)
        return out, (CorrelationState(logits=logits) if propagate else None)
    if propagate and state is None:
        if store_logits is None:
            store_logits = _store_logits_auto(q, compact_window_size(q.shape[1], q.shape[2], window_size, border))
        if store_logits:
            out, logits = window_attention(q, k, v, window_size, border, normalization, return_logits=True,
                                           logits_layout=layout)
            return out, CorrelationState(logits=logits)
    out = window_attention(q, k, v, window_size, border, normalization)
    return out, (CorrelationState(q=q, k=k) if propagate else None)
