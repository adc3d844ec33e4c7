"""The one place that chooses which NLRN attention kernel runs, and what a step carries to the next.

Every choice depends only on the grad state, the image and batch size, the device, the layout of the
carried correlation and the available memory, and is logged at debug level (logger ``nl_plugin``):
``logging.getLogger('nl_plugin').setLevel(logging.DEBUG)`` shows which kernel each call runs.
All kernels give the same result up to floating-point rounding (tests compare each to the oracle).
"""
import difflib
import enum
import logging
from typing import NamedTuple, Optional, Tuple

import torch

from . import flex, triton_window
from .common import border_rule, window_geometry
from .state import Layout

logger = logging.getLogger('nl_plugin')

# Up to this many pixels, a window-scope step with autograd runs as fused attention over the whole
# (small) image with the window as a mask: at NLRN's 43x43 training size a q = 45 window covers most
# of the image, so the halo blocks would compute more than the dense logits.
DENSE_WINDOW_PIXELS = 64 * 64
# With autograd on, a propagated step keeps dense (B, N, N) logits while they take at most this
# many bytes: carrying the concatenated embeddings instead grows the logit matmul by D every step
# (12 steps: 6.5x its flops, and the fused kernel pads v to the embedding size).
DENSE_LOGIT_BYTES = 256 * 2**20
# Window logits (P floats a pixel) are carried while they fit this share of the available memory;
# else the embeddings (2*D*t floats a pixel, O(P * D * t) work per step instead of O(P * D)).
LOGIT_MEMORY_SHARE = 0.4
# A network streams window-scope inference in bands of rows once the image's long side spans this
# many windows (below that, the rows kept for the windows' reach are most of the image anyway).
STREAM_WINDOWS = 4
#: ``attention_kernel`` values: 'auto' lets this module choose; the others force a kernel family for the window
#: scope ('triton': the fused Triton step carrying image-layout logits; 'flex': FlexAttention carrying embeddings;
#: 'halo': the halo kernels carrying window logits, or bands of rows in inference; 'dense': dense (B, N, N) logits).
ATTENTION_KERNELS = ('auto', 'triton', 'flex', 'halo', 'dense')
#: kernels that the global scope (attention over the whole tensor) can run
GLOBAL_ATTENTION_KERNELS = ('auto', 'dense')


class Kernel(str, enum.Enum):
    """The attention kernels (module that implements each in brackets)."""
    SDPA = 'sdpa'                   # softmax over the whole tensor, one fused SDPA (dense.py)
    LINEAR = 'linear'               # 'count' over the whole tensor, q (k^T v) / N (dense.py)
    MASKED_SDPA = 'masked_sdpa'     # window as the mask of one fused SDPA, small images with autograd (dense.py)
    DENSE_LOGITS = 'dense_logits'   # dense (B, N, N) logits carried across steps, autograd (dense.py)
    HALO = 'halo'                   # blocked halo kernel with autograd, image-layout logits (halo.py)
    STRIPS = 'strips'               # no-grad halo kernel on key/value strips, block-layout logits (halo_inference.py)
    BANDS = 'bands'                 # a network streams bands of rows through all steps (halo_inference.py)
    FLEX = 'flex'                   # FlexAttention, window as a block mask, embeddings carried (CUDA; flex.py)
    TRITON = 'triton'               # fused Triton step, image-layout logits in place, autograd (CUDA; triton_window.py)


class Route(NamedTuple):
    """Kernel of one step and the layout of the correlation it carries to the next (None: nothing)."""
    kernel: Kernel
    carry: Optional[Layout]


def _available_memory_bytes(device: torch.device) -> int:
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


def check_attention_kernel(attention_kernel: str, window: bool = True) -> str:
    """Validate an ``attention_kernel`` value (one of ``ATTENTION_KERNELS``; the global scope takes
    ``GLOBAL_ATTENTION_KERNELS``) and return it."""
    if attention_kernel not in ATTENTION_KERNELS:
        close = difflib.get_close_matches(str(attention_kernel), ATTENTION_KERNELS, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise ValueError(f'attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}{hint}')
    if not window and attention_kernel not in GLOBAL_ATTENTION_KERNELS:
        raise ValueError(f'attention_kernel {attention_kernel!r} is a window-scope kernel; the global scope takes '
                         f'{GLOBAL_ATTENTION_KERNELS}')
    return attention_kernel


def _triton_applies(device):
    # 'auto' takes the fused Triton step on CUDA only (on the CPU it exists only under the interpreter, for tests).
    return device.type == 'cuda' and triton_window.available()


def _require_triton(device):
    reason = triton_window.unavailable_reason(device)
    if reason:
        raise ValueError(reason)


def _flex_applies(device, normalization):
    # FlexAttention on CUDA only: eager (CPU) it materialises the (N, N) scores. Softmax is the only
    # normalisation it has; 'count' stays on the halo kernels.
    return device.type == 'cuda' and normalization == 'softmax' and flex.available()


def _window_kernel(grad, normalization, pixels, prev_logits, return_logits, device, triton=True):
    if grad and normalization == 'softmax' and not prev_logits and not return_logits and pixels <= DENSE_WINDOW_PIXELS:
        return Kernel.MASKED_SDPA
    if triton and _triton_applies(device):
        return Kernel.TRITON
    if not prev_logits and not return_logits and _flex_applies(device, normalization):
        return Kernel.FLEX
    return Kernel.HALO if grad else Kernel.STRIPS


def route_window(*, grad: bool, normalization: str, pixels: int, prev_logits: bool, return_logits: bool,
                 device: torch.device) -> Kernel:
    """Kernel of one window-attention call with image-layout logits (``window_attention``).

    Args:
        grad (bool): Autograd records the call.
        normalization (str): 'softmax' or 'count'.
        pixels (int): H*W.
        prev_logits (bool): Logits are carried in. return_logits (bool): Logits are carried out.
        device (torch.device): Device of the tensors.
    """
    kernel = _window_kernel(grad, normalization, pixels, prev_logits, return_logits, device)
    if not torch.compiler.is_compiling():   # a logging call would break a compiled graph
        logger.debug('nlrn attention: window_attention -> %s (grad=%s, %d px, %s)', kernel.value, grad, pixels, device)
    return kernel


def _logit_bytes(batch: int, height: int, width: int, window_size: int, border: str, element_size: int) -> int:
    """Bytes of a batch's carried window logits in the compact layout (P entries a pixel)."""
    return batch * height * width * window_geometry(height, width, window_size, border).p * element_size


def _logits_fit(need: int, device: torch.device, logit_memory: Optional[int] = None) -> bool:
    """Whether carried logits of ``need`` bytes fit the ceiling: ``logit_memory`` bytes when given, else
    ``LOGIT_MEMORY_SHARE`` of the memory available on ``device``."""
    ceiling = logit_memory if logit_memory is not None else LOGIT_MEMORY_SHARE * _available_memory_bytes(device)
    return need <= ceiling


def _forced_route(attention_kernel, window_size, border, normalization, grad, shape, element_size, device, carried,
                  propagate, logit_memory=None):
    """The route of an explicit ``attention_kernel`` (window scope, or 'dense' in either scope)."""
    b, h, w = shape
    if attention_kernel == 'dense':
        if carried not in (None, Layout.DENSE):
            raise ValueError(f"attention_kernel 'dense' carries dense logits, got a {carried.value} state")
        return Route(Kernel.DENSE_LOGITS, Layout.DENSE)
    if attention_kernel == 'triton':
        _require_triton(device)
        if carried not in (None, Layout.IMAGE):
            raise ValueError(f"attention_kernel 'triton' carries image-layout logits, got a {carried.value} state")
        return Route(Kernel.TRITON, Layout.IMAGE)
    if attention_kernel == 'flex':
        if not flex.available() or normalization != 'softmax':
            raise ValueError("attention_kernel 'flex' needs torch's FlexAttention and softmax normalisation "
                             f"(this correlation normalises by {normalization!r}); use 'auto' or 'halo'")
        if carried not in (None, Layout.TOKENS, Layout.EMBEDDINGS):
            raise ValueError(f"attention_kernel 'flex' carries embeddings, got a {carried.value} state")
        return Route(Kernel.FLEX, Layout.TOKENS)
    # 'halo': window logits while they fit, else embeddings
    kernel = Kernel.HALO if grad else Kernel.STRIPS
    if carried in (Layout.IMAGE, Layout.BLOCKS):
        if grad and carried is Layout.BLOCKS:
            raise ValueError('block-layout logits are inference-only (autograd is recording)')
        return Route(kernel, carried)
    if carried not in (None, Layout.EMBEDDINGS):
        raise ValueError(f"attention_kernel 'halo' carries window logits or embeddings, got a {carried.value} state")
    if carried is None and propagate and \
            _logits_fit(_logit_bytes(b, h, w, window_size, border, element_size), device, logit_memory):
        return Route(kernel, Layout.IMAGE if grad else Layout.BLOCKS)
    return Route(kernel, Layout.EMBEDDINGS)


def _step_route(window_size, border, normalization, grad, shape, element_size, device, carried, propagate,
                attention_kernel='auto', logit_memory=None):
    if attention_kernel == 'dense' or (attention_kernel != 'auto' and window_size is not None):
        return _forced_route(attention_kernel, window_size, border, normalization, grad, shape, element_size, device,
                             carried, propagate, logit_memory)
    b, h, w = shape
    n = h * w
    if carried is Layout.TOKENS:
        if window_size is None:
            raise ValueError('global attention carries embeddings or dense logits, not FlexAttention tokens')
        return Route(Kernel.FLEX, Layout.TOKENS)
    if carried is Layout.DENSE or (carried is None and propagate and grad
                                   and b * n * n * element_size <= DENSE_LOGIT_BYTES):
        return Route(Kernel.DENSE_LOGITS, Layout.DENSE)
    windowed = carried in (Layout.IMAGE, Layout.BLOCKS)
    if window_size is None:
        if windowed:
            raise ValueError('global attention carries embeddings or dense logits, not window logits')
        return Route(Kernel.SDPA if normalization == 'softmax' else Kernel.LINEAR, Layout.EMBEDDINGS)
    if windowed:
        if grad and carried is Layout.BLOCKS:
            raise ValueError('block-layout logits are inference-only (autograd is recording)')
        return Route(_window_kernel(grad, normalization, n, True, propagate, device, triton=carried is Layout.IMAGE),
                     carried)
    # The Triton step carries window logits, never the growing concatenated embeddings (its tiles hold D).
    kernel = _window_kernel(grad, normalization, n, False, False, device, triton=carried is None)
    if kernel is Kernel.TRITON:
        # Training keeps the logits and their gradient: twice the carried tensor.
        need = _logit_bytes(b, h, w, window_size, border, element_size) * (2 if grad else 1)
        if not propagate or _logits_fit(need, device, logit_memory):
            return Route(kernel, Layout.IMAGE)
        kernel = _window_kernel(grad, normalization, n, False, False, device, triton=False)
    if kernel is Kernel.FLEX:
        return Route(kernel, Layout.TOKENS)
    if kernel is not Kernel.MASKED_SDPA and carried is None and propagate:
        need = _logit_bytes(b, h, w, window_size, border, element_size)
        if _logits_fit(need, device, logit_memory):
            kernel = _window_kernel(grad, normalization, n, False, True, device, triton=False)
            return Route(kernel, Layout.IMAGE if grad else Layout.BLOCKS)
    return Route(kernel, Layout.EMBEDDINGS)


def route_step(*, window_size: Optional[int], border: str, normalization: str, grad: bool,
               shape: Tuple[int, int, int], element_size: int, device: torch.device, carried: Optional[Layout],
               propagate: bool, attention_kernel: str = 'auto', logit_memory: Optional[int] = None) -> Route:
    """Kernel of one propagated non-local step and the representation it carries (``propagated_attention``).

    Dense (B, N, N) logits while autograd records and they take at most ``DENSE_LOGIT_BYTES`` (NLRN's
    43x43 training patches, any scope); the whole-tensor kernels in the global scope (on CUDA SDPA
    picks its flash / memory-efficient kernels); in the window scope fused masked SDPA for small images
    with autograd (carrying embeddings); else on CUDA the fused Triton step carrying image-layout window
    logits while they fit the memory ceiling (twice over with autograd, for their gradient); else, for softmax on
    CUDA, FlexAttention carrying embeddings in its token order; else a halo kernel carrying window logits while they
    fit the ceiling, embeddings otherwise. An explicit ``attention_kernel`` forces its kernel family in the window
    scope ('dense' in either scope); a kernel that cannot run here is refused with one line saying why.

    Args:
        window_size (int | None): Validated odd window side; None = global.
        border (str): 'exclude' or 'circular'. normalization (str): 'softmax' or 'count'.
        grad (bool): Autograd records the step.
        shape (tuple[int, int, int]): (B, H, W).
        element_size (int): Bytes per element of the carried logits (fp32 also under autocast).
        device (torch.device): Device of the tensors.
        carried (Layout | None): Layout of the incoming correlation (None at the first step).
        propagate (bool): The step returns a correlation for the next one.
        attention_kernel (str): One of ``ATTENTION_KERNELS`` ('auto': chosen here).
        logit_memory (int, optional): Ceiling in bytes of the carried window logits, the one ``route_network`` was
            given (default ``LOGIT_MEMORY_SHARE`` of the free device memory).

    Returns:
        Route: kernel and carried layout (None when ``propagate`` is False).
    """
    check_attention_kernel(attention_kernel, window=window_size is not None)
    route = _step_route(window_size, border, normalization, grad, shape, element_size, device, carried, propagate,
                        attention_kernel, logit_memory)
    if not propagate:
        route = route._replace(carry=None)
    if not torch.compiler.is_compiling():
        logger.debug('nlrn attention: step -> %s, carry %s (attention_kernel %s, window %s, grad=%s, %s, %s)',
                     route.kernel.value, route.carry and route.carry.value, attention_kernel, window_size, grad,
                     'x'.join(map(str, shape)), device)
    return route


def band_kernel(attention_kernel: str, device: torch.device) -> Kernel:
    """Attention kernel inside the bands of a streamed network: the Triton step where it runs the whole-image
    steps (on CUDA, or forced), the strips kernel otherwise."""
    triton = attention_kernel == 'triton' or (attention_kernel == 'auto' and _triton_applies(device))
    return Kernel.TRITON if triton else Kernel.STRIPS


def route_network(*, grad: bool, training: bool, window_size: Optional[int], border: str, height: int, width: int,
                  device: torch.device, allow_bands: bool = True, attention_kernel: str = 'auto',
                  batch: int = 1, logit_memory: Optional[int] = None) -> Optional[Kernel]:
    """Whether a network streams its window-scope inference in bands of rows (``Kernel.BANDS``) or runs
    every step on the whole image (None; each step is then routed by ``route_step``). On the CPU (and with
    ``attention_kernel='halo'``) it streams once the image spans ``STREAM_WINDOWS`` windows. With the Triton step
    (CUDA, or forced) it streams only when the whole image's fp32 window logits would not fit the memory ceiling,
    the band kernel being the Triton step then (``band_kernel``). With FlexAttention (CUDA without Triton, or
    forced) and dense logits every step runs on the whole image.

    Args:
        grad (bool): Autograd records the forward. training (bool): The network is in training mode.
        window_size (int | None): Window side of the non-local steps; None = global.
        border (str): 'exclude' or 'circular' (bands need one of ``STREAM_BORDERS``).
        height, width (int): Image size.
        device (torch.device): Device of the input.
        allow_bands (bool): False keeps every step on the whole image (``NLRN.stream_inference``).
        attention_kernel (str): One of ``ATTENTION_KERNELS``.
        batch (int): Images in the batch (the carried logits scale with it).
        logit_memory (int, optional): Ceiling in bytes of the whole image's carried logits before the Triton
            path streams (default ``LOGIT_MEMORY_SHARE`` of the free device memory); give each step's
            ``route_step`` the same.
    """
    bands = (allow_bands and not grad and not training and window_size is not None and border_rule(border).streams
             and attention_kernel in ('auto', 'halo', 'triton'))
    if bands:
        if band_kernel(attention_kernel, device) is Kernel.TRITON:
            need = _logit_bytes(batch, height, width, window_size, border, 4)   # fp32 logits
            bands = not _logits_fit(need, device, logit_memory)
        else:
            bands = max(height, width) >= STREAM_WINDOWS * window_size and \
                (attention_kernel == 'halo' or not _flex_applies(device, 'softmax'))
    kernel = Kernel.BANDS if bands else None
    if not torch.compiler.is_compiling():
        logger.debug('nlrn attention: network -> %s (attention_kernel %s, window %s, grad=%s, training=%s, %dx%d, %s)',
                     'bands' if bands else 'per-step', attention_kernel, window_size, grad, training, height, width,
                     device)
    return kernel


__all__ = ['Kernel', 'Route', 'route_window', 'route_step', 'route_network', 'band_kernel', 'check_attention_kernel',
           'ATTENTION_KERNELS', 'GLOBAL_ATTENTION_KERNELS', 'DENSE_WINDOW_PIXELS', 'DENSE_LOGIT_BYTES',
           'LOGIT_MEMORY_SHARE', 'STREAM_WINDOWS']
