"""Public NLRN attention functions: validate the arguments once, ask the router, run the kernel.

All feature tensors are channels-last: ``q``/``k`` are (B, H, W, D) embeddings, ``v`` is (B, H, W, C).
A non-local step computes, for every query pixel i and every key pixel j in its neighbourhood,

    L_t(i, j) = L_{t-1}(i, j) + q_t(i) . k_t(j)        (NLRN eq. 5-6, no 1/sqrt(d) scaling)
    out(i)    = sum_j A(i, j) v(j),   A = softmax_j L_t(i, j)     ("softmax" normalisation)
                                   or A = L_t(i, j) / N_i           ("count": dot-product variants,
                                                                      N_i = number of valid keys)

Two neighbourhoods (scopes): global (``window_size=None``, every pixel attends to the whole tensor:
official NLRN on 43x43 training patches / 45x45 test tiles) and window (every pixel attends to the
q x q window centred on it; at the border out-of-image neighbours are excluded from the
normalisation, ``border='exclude'``, or taken from the opposite side, ``border='circular'``).

Under ``torch.autocast`` (or with bf16/fp16 inputs) q, k and v are cast once to the autocast dtype: the two
products q.k and A v run in it, while the logits L_t, their running sum over the steps, the softmax and the
count normalisation are fp32 (``common.py`` says why); the output is in the autocast dtype, carried logits fp32.
"""
from typing import Optional, Tuple, Union

import torch

from ..amp import accum_dtype, to_compute
from . import triton_window
from .common import check_qkv, check_window_args, requires_grad, window_geometry
from .dense import dense_logits_step, linear_attention, masked_window_sdpa, sdpa_attention
from .flex import flex_step, flex_window_attention
from .halo import halo_attention
from .halo_inference import strips_attention
from .router import Kernel, route_step, route_window
from .state import CorrelationState, Layout


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     normalization: str = 'softmax') -> torch.Tensor:
    """Attention of every pixel over the whole tensor (official NLRN scope), memory-light.

    Softmax uses ``F.scaled_dot_product_attention`` (scale 1, as NLRN has no 1/sqrt(d)); the
    'count' normalisation is linear attention: q (k^T v) / N, never forming the N x N matrix.

    Args:
        q, k (Tensor): (B, H, W, D). v (Tensor): (B, H, W, C).
        normalization (str): 'softmax' or 'count'.

    Returns:
        Tensor: (B, H, W, C).
    """
    check_qkv(q, k, v)
    check_window_args(None, 'exclude', normalization)
    q, k, v = to_compute(q), to_compute(k), to_compute(v)
    route = route_step(window_size=None, border='exclude', normalization=normalization, grad=requires_grad(q, k, v),
                       shape=tuple(q.shape[:3]), element_size=_logit_size(q), device=q.device, carried=None,
                       propagate=False)
    return _run_global(route.kernel, q, k, v)


def _logit_size(q):
    """Bytes per carried logit: logits accumulate in at least fp32 whatever the embeddings' dtype."""
    return torch.finfo(accum_dtype(q)).bits // 8


def _run_global(kernel, q, k, v):
    return sdpa_attention(q, k, v) if kernel is Kernel.SDPA else linear_attention(q, k, v)


def _run_window(kernel, q, k, v, window_size, border, normalization, prev_logits, return_logits, layout):
    """Run a window kernel; ``layout`` is that of the window logits carried in and out (BLOCKS or IMAGE)."""
    if kernel is Kernel.MASKED_SDPA:
        return masked_window_sdpa(q, k, v, window_size, border)
    if kernel is Kernel.FLEX:       # the router picks it only without carried logits
        return flex_window_attention(q, k, v, window_size, border)
    geo = window_geometry(q.shape[1], q.shape[2], window_size, border)
    if prev_logits is not None and layout is Layout.IMAGE and tuple(prev_logits.shape) != (*q.shape[:3], geo.p):
        raise ValueError(f'prev_logits must have shape {(*q.shape[:3], geo.p)} (compact window layout), '
                         f'got {tuple(prev_logits.shape)}')
    if kernel is Kernel.TRITON:
        if not triton_window.compile_failed(q, v, geo):
            try:
                return triton_window.triton_window_attention(q, k, v, geo, normalization, prev_logits, return_logits)
            except Exception as err:      # noqa: BLE001  (Triton's errors are told apart below)
                if not triton_window.note_failure(err, q, v, geo):
                    raise
        # a GPU that cannot compile the kernel for these widths: the halo kernels, same layout and result
        kernel = Kernel.HALO if requires_grad(q, k, v, prev_logits) else Kernel.STRIPS
    if kernel is Kernel.HALO:
        return halo_attention(q, k, v, geo, normalization, prev_logits, return_logits)
    return strips_attention(q, k, v, geo, normalization, prev_logits, return_logits,
                            block_layout=layout is Layout.BLOCKS)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, border: str = 'exclude',
                     normalization: str = 'softmax', prev_logits: Optional[torch.Tensor] = None,
                     return_logits: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Every pixel attends to the ``window_size`` x ``window_size`` window centred on it.

    Carried logits use a compact layout: ``logits[b, y, x, (dy+py)*(2px+1) + (dx+px)]`` for the
    neighbour (y+dy, x+dx), |dy| <= py, |dx| <= px, where (py, px) = (r, r) except for border
    'exclude' on images smaller than the window ((h-1, w-1) then). Entries for out-of-image
    neighbours are unspecified. The kernel is chosen by ``router.route_window``.

    Args:
        q, k (Tensor): (B, H, W, D) embeddings. v (Tensor): (B, H, W, C) values.
        window_size (int): Odd window side q (>= 1).
        border (str): 'exclude' (out-of-image neighbours are left out of the normalisation) or
            'circular' (wrap-around; needs q <= H and q <= W).
        normalization (str): 'softmax' or 'count'.
        prev_logits (Tensor, optional): (B, H, W, P) carried logits (see above). When autograd is
            not recording for it, it is updated IN PLACE to the new logits to save memory.
        return_logits (bool): Also return the accumulated logits (B, H, W, P).

    Returns:
        Tensor | tuple[Tensor, Tensor]: out (B, H, W, C) [, logits (B, H, W, P)].
    """
    check_qkv(q, k, v)
    if check_window_args(window_size, border, normalization, size=q.shape[1:3]) is None:
        raise ValueError('window_attention needs a window_size >= 1; use global_attention for global')
    q, k, v = to_compute(q), to_compute(k), to_compute(v)
    kernel = route_window(grad=requires_grad(q, k, v, prev_logits), normalization=normalization,
                          pixels=q.shape[1] * q.shape[2], prev_logits=prev_logits is not None,
                          return_logits=return_logits, device=q.device)
    return _run_window(kernel, q, k, v, window_size, border, normalization, prev_logits, return_logits, Layout.IMAGE)


def propagated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[CorrelationState] = None,
                         window_size: Optional[int] = None, border: str = 'exclude', normalization: str = 'softmax',
                         propagate: bool = True, attention_kernel: str = 'auto',
                         logit_memory: Optional[int] = None) -> Tuple[torch.Tensor, Optional[CorrelationState]]:
    """One non-local step with correlation propagation; the function a network calls per step.

    The carried representation (dense logits, window logits or concatenated embeddings, see
    ``Layout``) and the kernel are chosen by ``router.route_step``; all give the same result.

    Args:
        q, k (Tensor): (B, H, W, D) embeddings of this step. v (Tensor): (B, H, W, C).
        state (CorrelationState, optional): Returned by the previous step (None at the first).
        window_size (int | None): Odd window side; None = global attention over the tensor.
        border (str): 'exclude' or 'circular' (window scope only).
        normalization (str): 'softmax' or 'count'.
        propagate (bool): Carry the correlation to the next step. If False, returns state None (and the
            carried logits are read, not written).
        attention_kernel (str): 'auto' (the router chooses), or a kernel family to force: 'triton', 'flex',
            'halo' (window scope) or 'dense' (see ``router.ATTENTION_KERNELS``).
        logit_memory (int, optional): Ceiling in bytes of the carried window logits (``router.route_step``;
            default ``router.LOGIT_MEMORY_SHARE`` of the free device memory).

    Returns:
        tuple[Tensor, CorrelationState | None]: out (B, H, W, C) and the new state.
    """
    check_qkv(q, k, v)
    window_size = check_window_args(window_size, border, normalization, size=q.shape[1:3])
    q, k, v = to_compute(q), to_compute(k), to_compute(v)
    carried = None if state is None else state.layout
    grad = requires_grad(q, k, v) if state is None else requires_grad(q, k, v, state.q, state.k, state.logits)
    route = route_step(window_size=window_size, border=border, normalization=normalization, grad=grad,
                       shape=tuple(q.shape[:3]), element_size=_logit_size(q), device=q.device, carried=carried,
                       propagate=propagate, attention_kernel=attention_kernel, logit_memory=logit_memory)
    if route.kernel is Kernel.DENSE_LOGITS:
        out, logits = dense_logits_step(q, k, v, None if state is None else state.logits, window_size, border,
                                        normalization)
        return out, (CorrelationState(logits=logits, layout=Layout.DENSE) if propagate else None)
    if route.kernel is Kernel.FLEX:
        return flex_step(q, k, v, state, window_size, border, propagate)
    if carried is Layout.EMBEDDINGS:   # L_t = [q_1..q_t].[k_1..k_t]: the sum over steps is the product's own
        q = torch.cat([state.q.to(q.dtype), q], dim=-1)
        k = torch.cat([state.k.to(k.dtype), k], dim=-1)
    if route.kernel in (Kernel.SDPA, Kernel.LINEAR):
        out = _run_global(route.kernel, q, k, v)
    else:
        windowed = (Layout.IMAGE, Layout.BLOCKS)
        prev = state.logits if carried in windowed else None
        return_logits = route.carry in windowed
        layout = carried if carried in windowed else route.carry     # of the window logits in and out
        out = _run_window(route.kernel, q, k, v, window_size, border, normalization, prev, return_logits, layout)
        if return_logits:
            out, logits = out
            return out, CorrelationState(logits=logits, layout=route.carry)
    return out, (CorrelationState(q=q, k=k) if propagate else None)


__all__ = ['global_attention', 'window_attention', 'propagated_attention']
