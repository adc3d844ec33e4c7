"""Embeddings that turn a correlation function of paper Table 1 into a dot product for the kernels."""
from typing import Tuple

import torch


def euclidean_embeddings(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
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


__all__ = ['euclidean_embeddings']
