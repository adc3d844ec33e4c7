"""How ``RestorationModel`` runs its network on the device: TF32, channels-last and ``torch.compile``.

YAML (top level)::

    tf32: true             # CUDA: fp32 matmuls and convs on TF32 tensor cores (default true; no effect on the CPU)
    channels_last: true    # CUDA: network weights and inputs in channels-last memory (default true on CUDA)
    compile: false         # true, or {mode: max-autotune, dynamic: false, ...}: torch.compile the network for
                           # training and validation; a compilation failure warns once and runs it eagerly
"""
from typing import Callable, Dict, Optional

import torch
from torch import nn

DEVICE_KEYS = ('tf32', 'channels_last', 'compile')
COMPILE_KEYS = ('mode', 'dynamic', 'fullgraph', 'backend', 'options')


def check_device_options(opt: dict) -> None:
    """Raise naming the key when ``tf32``, ``channels_last`` or ``compile`` has a bad value."""
    for key in ('tf32', 'channels_last'):
        if key in opt and not isinstance(opt[key], bool):
            raise ValueError(f'{key} must be true or false, got {opt[key]!r}')
    spec = opt.get('compile', False)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(COMPILE_KEYS))
        if unknown:
            raise KeyError(f'compile: unknown option key(s) {unknown}; valid keys: {list(COMPILE_KEYS)}')
    elif not isinstance(spec, bool):
        raise ValueError(f'compile must be true, false or a dict of torch.compile options, got {spec!r}')


def set_tf32(opt: dict, device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (``tf32``, default true): about 8x the fp32 matmul
    rate of an A100/H100 at a 10-bit mantissa in the products, accumulation still in fp32."""
    if device.type == 'cuda':
        enabled = opt.get('tf32', True)
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def channels_last(opt: dict, device: torch.device) -> bool:
    """Whether the network and its inputs use channels-last memory (``channels_last``, default: on CUDA).
    cuDNN's tensor-core convolutions are NHWC; NCHW tensors are transposed around every conv."""
    return opt.get('channels_last', device.type == 'cuda')


class CompiledNetworks:
    """The networks of a model through ``torch.compile`` (``compile:``), each compiled on its first call.

    Compilation happens lazily in the first forward (and backward); if it fails, ``disable`` logs the
    error once and that network runs eagerly from then on.

    Args:
        spec (bool | dict): The ``compile`` option.
        warn (callable): Logs a warning line.
    """

    def __init__(self, spec, warn: Callable[[str], None]):
        self.kwargs = None if not spec else ({} if spec is True else dict(spec))
        self.warn = warn
        self._compiled: Dict[int, Optional[nn.Module]] = {}

    def active(self, net: nn.Module) -> bool:
        """``net`` runs compiled (compile is on and has not failed for it)."""
        return self.kwargs is not None and self._compiled.get(id(net), True) is not None

    def __call__(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net(x)``, compiled while that works."""
        if not self.active(net):
            return net(x)
        if id(net) not in self._compiled:
            self._compiled[id(net)] = torch.compile(net, **self.kwargs)
        try:
            return self._compiled[id(net)](x)
        except Exception as err:   # noqa: BLE001  (dynamo, inductor and Triton raise unrelated types)
            if isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            self.disable(net, err)
            return net(x)

    def disable(self, net: nn.Module, err: BaseException) -> None:
        """Run ``net`` eagerly from now on, logging why."""
        self._compiled[id(net)] = None
        self.warn(f'compile: torch.compile of {type(net).__name__} failed ({_describe(err)}); '
                  f'it runs eagerly from now on')


def _describe(err: BaseException) -> str:
    """'Type: first line' of the error and of the innermost error it was raised from (the compiler's own)."""
    def line(e):
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
    inner = err
    while (getattr(inner, 'inner_exception', None) or inner.__cause__) is not None:   # dynamo keeps it in the former
        inner = getattr(inner, 'inner_exception', None) or inner.__cause__
    return line(err) if inner is err else f'{line(err)} <- {line(inner)}'


__all__ = ['DEVICE_KEYS', 'check_device_options', 'set_tf32', 'channels_last', 'CompiledNetworks']
