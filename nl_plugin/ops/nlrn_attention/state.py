"""The correlation carried from one NLRN non-local step to the next, tagged with its layout."""
import enum
from typing import NamedTuple, Optional

import torch


class Layout(str, enum.Enum):
    """Representation of a carried correlation (NLRN eq. 6: L_t = L_{t-1} + q_t k_t^T)."""
    EMBEDDINGS = 'embeddings'   # q, k: concatenated embeddings of all steps, (B, H, W, D*t) each
    DENSE = 'dense'             # logits: dense (B, N, N), N = H*W (small images with autograd, any scope)
    IMAGE = 'image'             # logits: compact window layout (B, H, W, P), see ``window_attention``
    BLOCKS = 'blocks'           # logits: (B, nby, nbx, b*b, P) of 8x8 query blocks (inference, in place)
    TOKENS = 'tokens'           # q, k: concatenated embeddings in the FlexAttention tile order (flex.py)


class CorrelationState(NamedTuple):
    """Correlation carried from one non-local step to the next (NLRN correlation propagation).

    ``layout`` says which representation is set: ``q`` and ``k`` for ``Layout.EMBEDDINGS`` and
    ``Layout.TOKENS`` (L_t = [q_1..q_t] . [k_1..k_t]^T), else ``logits`` in that layout.
    """
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    layout: Layout = Layout.EMBEDDINGS


__all__ = ['Layout', 'CorrelationState']
