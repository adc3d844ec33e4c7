"""The one place that chooses which NLRN attention kernel runs, and what a step carries to the next.

Every choice depends only on the grad state, the image and batch size, the device, the layout of the
carried correlation and the available memory, and is logged at debug level (logger ``nl_plugin``):
``logging.getLogger('nl_plugin').setLevel(logging.DEBUG)`` shows which kernel each call runs.
All kernels give the same result up to floating-point rounding (tests compare each to the oracle).
"""
import enum
import logging
from typing import NamedTuple, Optional, Tuple

import torch

from . import flex
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


def _flex_applies(device, normalization):
    # FlexAttention on CUDA only: eager (CPU) it materialises the (N, N) scores. Softmax is the only
    # normalisation it has; 'count' stays on the halo kernels.
    return device.type == 'cuda' and normalization == 'softmax' and flex.available()


def _window_kernel(grad, normalization, pixels, prev_logits, return_logits, device):
    if grad and normalization == 'softmax' and not prev_logits and not return_logits and pixels <= DENSE_WINDOW_PIXELS:
        return Kernel.MASKED_SDPA
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


def _step_route(window_size, border, normalization, grad, shape, element_size, device, carried, propagate):
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
        return Route(_window_kernel(grad, normalization, n, True, propagate, device), carried)
    kernel = _window_kernel(grad, normalization, n, False, False, device)
    if kernel is Kernel.FLEX:
        return Route(kernel, Layout.TOKENS)
    if kernel is not Kernel.MASKED_SDPA and carried is None and propagate:
        need = b * n * window_geometry(h, w, window_size, border).p * element_size
        if need <= LOGIT_MEMORY_SHARE * _available_memory_bytes(device):
            kernel = _window_kernel(grad, normalization, n, False, True, device)
            return Route(kernel, Layout.IMAGE if grad else Layout.BLOCKS)
    return Route(kernel, Layout.EMBEDDINGS)


def route_step(*, window_size: Optional[int], border: str, normalization: str, grad: bool,
               shape: Tuple[int, int, int], element_size: int, device: torch.device, carried: Optional[Layout],
               propagate: bool) -> Route:
    """Kernel of one propagated non-local step and the representation it carries (``propagated_attention``).

    Dense (B, N, N) logits while autograd records and they take at most ``DENSE_LOGIT_BYTES`` (NLRN's
    43x43 training patches, any scope); the whole-tensor kernels in the global scope (on CUDA SDPA
    picks its flash / memory-efficient kernels); in the window scope fused masked SDPA for small images
    with autograd (carrying embeddings); else, for softmax on CUDA, FlexAttention carrying embeddings in
    its token order; else a halo kernel carrying window logits while they fit in memory, embeddings
    otherwise.

    Args:
        window_size (int | None): Validated odd window side; None = global.
        border (str): 'exclude' or 'circular'. normalization (str): 'softmax' or 'count'.
        grad (bool): Autograd records the step.
        shape (tuple[int, int, int]): (B, H, W).
        element_size (int): Bytes per element of the carried logits (fp32 also under autocast).
        device (torch.device): Device of the tensors.
        carried (Layout | None): Layout of the incoming correlation (None at the first step).
        propagate (bool): The step returns a correlation for the next one.

    Returns:
        Route: kernel and carried layout (None when ``propagate`` is False).
    """
    route = _step_route(window_size, border, normalization, grad, shape, element_size, device, carried, propagate)
    if not propagate:
        route = route._replace(carry=None)
    if not torch.compiler.is_compiling():
        logger.debug('nlrn attention: step -> %s, carry %s (window %s, grad=%s, %s, %s)', route.kernel.value,
                     route.carry and route.carry.value, window_size, grad, 'x'.join(map(str, shape)), device)
    return route


def route_network(*, grad: bool, training: bool, window_size: Optional[int], border: str, height: int, width: int,
                  device: torch.device, allow_bands: bool = True) -> Optional[Kernel]:
    """Whether a network streams its window-scope inference in bands of rows (``Kernel.BANDS``) or runs
    every step on the whole image (None; each step is then routed by ``route_step``). On CUDA with
    FlexAttention every step runs on the whole image (its carried embeddings are linear in the image).

    Args:
        grad (bool): Autograd records the forward. training (bool): The network is in training mode.
        window_size (int | None): Window side of the non-local steps; None = global.
        border (str): 'exclude' or 'circular' (bands need one of ``STREAM_BORDERS``).
        height, width (int): Image size.
        device (torch.device): Device of the input.
        allow_bands (bool): False keeps every step on the whole image (``NLRN.stream_inference``).
    """
    bands = (allow_bands and not grad and not training and window_size is not None and border_rule(border).streams
             and max(height, width) >= STREAM_WINDOWS * window_size and not _flex_applies(device, 'softmax'))
    kernel = Kernel.BANDS if bands else None
    if not torch.compiler.is_compiling():
        logger.debug('nlrn attention: network -> %s (window %s, grad=%s, training=%s, %dx%d, %s)',
                     'bands' if bands else 'per-step', window_size, grad, training, height, width, device)
    return kernel


__all__ = ['Kernel', 'Route', 'route_window', 'route_step', 'route_network', 'DENSE_WINDOW_PIXELS',
           'DENSE_LOGIT_BYTES', 'LOGIT_MEMORY_SHARE', 'STREAM_WINDOWS']
