"""The dense oracle: one NLRN non-local step from full N x N logits and an explicit window mask."""
from typing import Optional, Tuple

import torch

from ..amp import accum_dtype, to_compute
from .common import check_qkv, check_window_args, dense_window_mask, normalize_attention


def dense_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: Optional[int] = None,
                              border: str = 'exclude', normalization: str = 'softmax',
                              prev_logits: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Naive dense non-local step: full N x N logits with an explicit window mask (NLRN eq. 3-6).

    Args:
        q, k (Tensor): (B, H, W, D) embeddings.
        v (Tensor): (B, H, W, C) values.
        window_size (int | None): Odd window side; None = global attention.
        border (str): 'exclude' or 'circular' (see ``window_mask``).
        normalization (str): 'softmax' or 'count' (divide by the number of valid keys).
        prev_logits (Tensor, optional): (B, N, N) logits carried from the previous step.

    Returns:
        tuple[Tensor, Tensor]: out (B, H, W, C) and the accumulated logits (B, N, N). Under autocast the
        products run in the autocast dtype and the logits and weights are fp32, as in the kernels.
    """
    check_qkv(q, k, v)
    window_size = check_window_args(window_size, border, normalization, size=q.shape[1:3])
    q, k, v = to_compute(q), to_compute(k), to_compute(v)
    b, h, w, d = q.shape
    mask = dense_window_mask(h, w, window_size, border, q.device)
    logits = (q.reshape(b, h * w, d) @ k.reshape(b, h * w, d).transpose(1, 2)).to(accum_dtype(q))
    if prev_logits is not None:
        logits = logits + prev_logits
    attn = normalize_attention(logits, normalization, ~mask)
    out = attn.to(v.dtype) @ v.reshape(b, h * w, -1)
    return out.reshape(b, h, w, -1), logits


__all__ = ['dense_attention_reference']
