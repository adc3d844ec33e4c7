"""Dtype rules of the ops under ``torch.autocast``: the dtype a matrix product runs in and the dtype that accumulates.

Autocast casts the inputs of convolutions and matrix products (``bmm``, ``matmul``, ``linear``...) to its
low-precision dtype and leaves every other op in the dtype of its inputs. The ops of this package keep the
quantities that need the precision (distances, logits, softmax statistics, sums of many terms) in
:func:`accum_dtype` and cast the operands of their large products to :func:`compute_dtype` once, before
gathering them tile by tile (a gather moves half the bytes in bf16, and autocast would otherwise cast every
tile again). Both functions are device-agnostic (CPU, CUDA) and give the tensor's own dtype outside autocast,
so fp32 and fp64 code paths are unchanged.
"""
import torch

__all__ = ['compute_dtype', 'accum_dtype', 'to_compute', 'to_accum', 'full_precision']

_LOW = (torch.float16, torch.bfloat16)


def _autocast_on(dev: str) -> bool:
    # the meta device (shape-only forwards, e.g. NonLocalInjection's probe) has no autocast state to ask
    return dev != 'meta' and torch.is_autocast_enabled(dev)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype of a matrix product of ``t`` here: the autocast dtype of ``t``'s device when autocast is on
    (for floating ``t`` of at most fp32), else ``t.dtype``."""
    dev = t.device.type
    if t.dtype in (torch.float32, *_LOW) and _autocast_on(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def accum_dtype(t: torch.Tensor) -> torch.dtype:
    """``t.dtype`` promoted to at least fp32 (fp16/bf16 -> fp32; fp32 and fp64 unchanged)."""
    return torch.float32 if t.dtype in _LOW else t.dtype


def to_compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`compute_dtype` (no copy when it already is)."""
    return t.to(compute_dtype(t))


def to_accum(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`accum_dtype` (no copy when it already is)."""
    return t.to(accum_dtype(t))


def full_precision(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with autocast off on ``x``'s device and ``x`` in at least fp32 (plain ``fn(x)`` outside autocast).

    For the layer that writes a restoration network's output: the restored image, or the residual added to
    the fp32 input. Its output is a small difference of large terms, so rounding the layer's inputs and
    weights to bf16 moves the output by a fraction of a grey level that the PSNR sees: on N3Nets trained
    300 iterations on the demo photographs (``scripts/precision_report.py``), the last conv in bf16 alone
    changed the PSNR of a 512x512 photograph by up to -0.09 dB, and nothing else did; in fp32 the change is
    +0.01 dB. With one to eight output channels it is a small share of the flops.
    """
    dev = x.device.type
    if not _autocast_on(dev):
        return fn(x)
    with torch.autocast(dev, enabled=False):
        return fn(to_accum(x))
