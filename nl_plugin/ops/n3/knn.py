"""The k-NN relaxation of the N3 block: continuous k-NN (paper eqs. 8-11), hard k-NN, Concrete noise, temperature."""
import math
from collections.abc import Sequence

import torch

from ..amp import accum_dtype, to_accum
from .patch_grid import extract_patches

__all__ = ['log1mexp', 'continuous_knn', 'hard_knn_weights', 'gumbel_noise', 'patch_temperature', 'SELECTIONS',
           'KNN_UPDATES', 'selection_inputs', 'neighbour_weights']

_LN2 = math.log(2.0)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, numerically stable (Mächler 2012).

    ``log1p(-exp(a))`` for ``a < -log 2``, ``log(-expm1(a))`` otherwise. Each branch gets an input
    clamped to its own range so that neither produces NaN gradients through :func:`torch.where`.
    ``a = -inf`` gives 0; ``a = 0`` gives ``-inf``.
    """
    small = a < -_LN2
    lo = torch.log1p(-torch.exp(a.clamp(max=-_LN2)))
    hi = torch.log(-torch.expm1(a.clamp(min=-_LN2)))
    return torch.where(small, lo, hi)


def continuous_knn(logits: torch.Tensor, k: int, noise: torch.Tensor | None = None,
                   temperature: torch.Tensor | float | None = None) -> torch.Tensor:
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
        Tensor: (..., k, M) weights in at least fp32; each row sums to 1.
    """
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}')
    # Precision: the relaxation runs in at least fp32 whatever its inputs (autocast leaves these ops in their
    # inputs' dtype on CPU). Logits ~ -d / T reach hundreds: bf16 would round them by ~1 (a weight error of e),
    # and the k log(1 - w) updates add to the same logits.
    logits = to_accum(logits)
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


def hard_knn_weights(dist: torch.Tensor, k: int) -> torch.Tensor:
    """One-hot weights of the ``k`` nearest candidates (ties broken by candidate order).

    Args:
        dist (Tensor): (..., M) distances.
        k (int): Number of neighbours, ``<= M``.

    Returns:
        Tensor: (..., k, M); row ``j`` is the indicator of the j-th nearest candidate.
    """
    if k > dist.shape[-1]:
        raise ValueError(f'k={k} neighbours requested but only {dist.shape[-1]} candidates are available')
    dist = to_accum(dist)  # weights in at least fp32, as from the other selections
    idx = torch.topk(dist, k, dim=-1, largest=False, sorted=True).indices  # (..., k)
    out = dist.new_zeros(*dist.shape[:-1], k, dist.shape[-1])
    return out.scatter_(-1, idx.unsqueeze(-1), 1.0)


def gumbel_noise(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel samples ``-log(-log U)`` on the device of ``like``, in its dtype promoted to at least fp32."""
    dtype = accum_dtype(like)
    u = torch.rand(shape, generator=generator, device=like.device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    e = -torch.log(u.clamp(min=tiny))  # Exp(1) samples
    return -torch.log(e.clamp(min=tiny))


def patch_temperature(log_temp: torch.Tensor, patch_size: int, stride: int, mode: str = 'mean',
                      offset: float = math.log(0.1)) -> torch.Tensor:
    """Per-patch temperature ``T = exp(log_temp_patch + offset)`` from a log-temperature map.

    Args:
        log_temp (Tensor): (B, 1, H, W) exactly tiled log-temperature map (already padded).
        patch_size (int): ``p``.
        stride (int): ``s``.
        mode (str): ``'mean'`` over the patch (official code) or ``'center'`` pixel
            ``(p // 2, p // 2)`` of the patch (paper). Default: ``'mean'``.
        offset (float): Added to the log-temperature (official: ``log(0.1)``).

    Returns:
        Tensor: (B, L) positive temperatures, in at least fp32 (they divide the logits).
    """
    patches = extract_patches(to_accum(log_temp), patch_size, stride)  # (B, L, p*p)
    if mode == 'mean':
        lt = patches.mean(-1)
    elif mode == 'center':
        lt = patches[..., (patch_size // 2) * patch_size + patch_size // 2]
    else:
        raise ValueError(f"temperature mode must be 'mean' or 'center', got {mode!r}")
    return torch.exp(lt + offset)


SELECTIONS = ('n3', 'knn', 'concrete')
KNN_UPDATES = ('official', 'paper')


def selection_inputs(alpha: torch.Tensor, k: int, temperature: torch.Tensor | None = None,
                     knn_update: str = 'official', sample: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-query inputs ``(logits, temperature, noise)`` of :func:`neighbour_weights`.

    Places the temperature ``T`` in eqs. 8-11 and draws the Gumbel noise ``G`` of Concrete sampling:

    * ``knn_update='official'``: logits ``alpha / T`` and noise ``G / T`` (the softmax sees
      ``(alpha + G) / T``; the ``log(1 - w)`` update is added to the scaled logits);
    * ``knn_update='paper'``: logits ``alpha``, temperature ``T`` and noise ``G`` (the update is added
      to ``alpha``; see :func:`continuous_knn`).

    Args:
        alpha (Tensor): (..., M) logits before the temperature (e.g. the normalised negative distances).
        k (int): Number of neighbours (noise is drawn for each).
        temperature (Tensor, optional): (..., 1) per-query temperature; ``None``: no scaling.
        knn_update (str): ``'official'`` or ``'paper'`` placement of the temperature.
        sample (bool): Draw Gumbel noise (Concrete selection while training).

    Returns:
        tuple: ``logits`` (..., M), ``temperature`` (..., 1) or None, ``noise`` (..., k, M) or None.
    """
    if knn_update not in KNN_UPDATES:
        raise ValueError(f'knn_update must be one of {KNN_UPDATES}, got {knn_update!r}')
    noise = gumbel_noise(alpha.shape[:-1] + (k, alpha.shape[-1]), alpha) if sample else None
    if temperature is None:
        return alpha, None, noise
    if knn_update == 'official':
        return alpha / temperature, None, None if noise is None else noise / temperature.unsqueeze(-1)
    return alpha, temperature, noise


def neighbour_weights(logits: torch.Tensor, temperature: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, *, k: int, selection: str = 'n3') -> torch.Tensor:
    """Weights of the ``k`` neighbours for one of the paper's selection rules.

    Args:
        logits (Tensor): (..., M) logits, e.g. from :func:`selection_inputs`; for ``'knn'`` the
            negative distances.
        temperature (Tensor, optional): (..., 1) paper placement of the temperature.
        noise (Tensor, optional): (..., k, M) Gumbel noise (Concrete sampling).
        k (int): Number of neighbours.
        selection (str): ``'n3'`` or ``'concrete'`` (:func:`continuous_knn`, eqs. 8-11; Concrete
            samples when ``noise`` is given) or ``'knn'`` (:func:`hard_knn_weights` on ``-logits``).

    Returns:
        Tensor: (..., k, M) weights; each row sums to 1.
    """
    if selection == 'knn':
        return hard_knn_weights(-logits, k)
    if selection not in SELECTIONS:
        raise ValueError(f'selection must be one of {SELECTIONS}, got {selection!r}')
    return continuous_knn(logits, k, noise=noise, temperature=temperature)
