"""Dense kernels: fused SDPA (global, or masked to the window on small images), linear and dense-logit steps.

All take channels-last (B, H, W, D) embeddings and (B, H, W, C) values on validated arguments; the
router (``router.py``) decides when each one runs.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..amp import accum_dtype
from .common import dense_window_mask, normalize_attention


def _sdpa(qf, kf, vf, mask=None):
    """Fused softmax attention without NLRN's missing 1/sqrt(d): (B, 1, N, D), (B, 1, N, C) -> (B, 1, N, C)."""
    d, c = qf.shape[-1], vf.shape[-1]
    # The fused CPU kernel needs equal head sizes: zero-padding q/k (or v) changes nothing.
    if d < c:
        qf, kf = F.pad(qf, (0, c - d)), F.pad(kf, (0, c - d))
    elif c < d and not qf.is_cuda:
        vf = F.pad(vf, (0, d - c))
    return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=1.0)[..., :c]


def _flat(q, k, v):
    b, h, w, d = q.shape
    return q.reshape(b, 1, h * w, d), k.reshape(b, 1, h * w, d), v.reshape(b, 1, h * w, v.shape[-1])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of every pixel over the whole tensor, one fused SDPA (memory O(N)): (B, H, W, C)."""
    out = _sdpa(*_flat(q, k, v))
    return out.reshape(*q.shape[:3], v.shape[-1])


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """'count' attention over the whole tensor as q (k^T v) / N, never forming the N x N matrix: (B, H, W, C)."""
    qf, kf, vf = _flat(q, k, v)
    n = q.shape[1] * q.shape[2]
    out = normalize_attention(qf @ (kf.transpose(-1, -2) @ vf), 'count', count=n).to(vf.dtype)
    return out.reshape(*q.shape[:3], v.shape[-1])


def masked_window_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                       border: str) -> torch.Tensor:
    """Softmax window attention of a small image as one fused masked attention (memory O(N)): (B, H, W, C)."""
    b, h, w, _ = q.shape
    mask = dense_window_mask(h, w, window_size, border, q.device)
    out = _sdpa(*_flat(q, k, v), mask)
    return out.reshape(b, h, w, -1)


def dense_logits_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prev_logits: Optional[torch.Tensor],
                      window_size: Optional[int], border: str,
                      normalization: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One propagated step on dense logits ``prev + q k^T`` (NLRN eq. 5-6), differentiable.

    Args:
        q, k (Tensor): (B, H, W, D). v (Tensor): (B, H, W, C).
        prev_logits (Tensor | None): (B, N, N) logits of the previous steps.
        window_size (int | None): Odd window side (mask, see ``window_mask``); None for the whole image.
        border (str): 'exclude' or 'circular'.
        normalization (str): 'softmax' or 'count'.

    Returns:
        tuple[Tensor, Tensor]: out (B, H, W, C) and the logits (B, N, N).
    """
    b, h, w, d = q.shape
    qf, kf, vf = q.reshape(b, h * w, d), k.reshape(b, h * w, d), v.reshape(b, h * w, -1)
    acc = accum_dtype(q)
    if prev_logits is None:
        logits = torch.bmm(qf, kf.transpose(1, 2)).to(acc)
    elif acc == q.dtype:    # fused L_{t-1} + q k^T
        logits = torch.baddbmm(prev_logits, qf, kf.transpose(1, 2))
    else:   # low-precision product, fp32 running sum (baddbmm would round L_{t-1} to q's dtype); the explicit
        # conversion then a same-dtype add is ~2x faster on the CPU than a mixed-dtype add
        logits = torch.bmm(qf, kf.transpose(1, 2)).to(acc).add_(prev_logits)
    if window_size is None:
        attn = normalize_attention(logits, normalization, count=h * w)
    else:
        mask = dense_window_mask(h, w, window_size, border, q.device)
        attn = normalize_attention(logits, normalization, ~mask, mask.sum(-1, keepdim=True))
    return torch.bmm(attn.to(vf.dtype), vf).reshape(b, h, w, -1), logits


__all__ = ['sdpa_attention', 'linear_attention', 'masked_window_sdpa', 'dense_logits_step']
