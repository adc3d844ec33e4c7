"""Mixed-precision policy of :class:`~nl_plugin.models.restoration_model.RestorationModel`.

YAML (BasicSR keeps training options under ``train:`` and validation/test options under ``val:``)::

    train:
      precision: bf16      # fp32 | bf16 | fp16 | auto: forward pass and loss of every training step
    val:
      precision: auto      # the same choices, for validation during training and for `basicsr test`

Both default to ``fp32`` (no autocast). ``bf16`` / ``fp16`` run the network under PyTorch's own
``torch.autocast(device_type, dtype)``: convolutions and the large matrix products run in the low-precision
dtype, and each architecture keeps in fp32 what needs the precision (its comments say what and why).
Parameters, optimizer state, BN running statistics and checkpoints stay fp32 (autocast never changes a
parameter's dtype: the optimizer updates fp32 master weights). ``fp16`` scales the loss with
``torch.amp.GradScaler`` (fp16 gradients underflow otherwise; bf16 has fp32's exponent range and needs no
scaler); the scaler's state is not saved with the training state, a resumed run recalibrates it in a few steps.
``auto`` picks bf16 where the hardware runs it fast (a CPU with the ``amx_bf16`` or ``avx512_bf16`` flag in
``/proc/cpuinfo``, a CUDA device with native bf16) and fp32 elsewhere; the log says which and why.
"""
import contextlib
import difflib
import os
from typing import Callable

import torch

from ..utils import cpuinfo_field

__all__ = ['PRECISIONS', 'check_precision', 'cpu_bf16_flags', 'fast_bf16', 'resolve_precision', 'autocast',
           'ModelPrecision']

PRECISIONS = ('fp32', 'bf16', 'fp16', 'auto')
_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
#: CPU flags of native bf16 arithmetic (AMX tiles on Xeon Sapphire Rapids+, AVX512-BF16 on Cooper Lake / Zen 4+)
CPU_BF16_FLAGS = ('amx_bf16', 'avx512_bf16')
_ALIASES = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16'}


def check_precision(value: str, where: str) -> str:
    """``value`` if it is one of :data:`PRECISIONS`, else a one-line ``ValueError`` naming ``where``."""
    if value in PRECISIONS:
        return value
    close = difflib.get_close_matches(str(value), PRECISIONS + ('float32', 'bfloat16', 'float16'), n=1)
    hint = f' (did you mean {_ALIASES.get(close[0], close[0])!r}?)' if close else ''
    raise ValueError(f'{where}: precision must be one of {PRECISIONS}, got {value!r}{hint}')


def cpu_bf16_flags(cpuinfo: str = '/proc/cpuinfo') -> tuple[str, ...]:
    """The native-bf16 flags of this CPU (subset of :data:`CPU_BF16_FLAGS`); empty where unreadable."""
    flags = set((cpuinfo_field('flags', cpuinfo) or '').split())
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def fast_bf16(device: torch.device | str, cpuinfo: str = '/proc/cpuinfo') -> tuple[bool, str]:
    """Whether ``device`` runs bf16 convolutions and matrix products natively, and why (one phrase)."""
    device = torch.device(device)
    if device.type == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        # compute capability >= 8.0 (Ampere) has bf16 tensor cores; older GPUs only emulate bf16
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f'CUDA device {index} supports bf16 natively (compute capability {major}.{minor})'
        return False, f'CUDA device {index} has no native bf16 (compute capability {major}.{minor} < 8.0)'
    if device.type == 'cpu':
        if not os.path.exists(cpuinfo):
            return False, f'CPU flags unknown ({cpuinfo} not found)'
        flags = cpu_bf16_flags(cpuinfo)
        if not flags:
            return False, f'CPU has neither {" nor ".join(CPU_BF16_FLAGS)} in {cpuinfo}'
        if not torch.backends.mkldnn.is_available():
            return False, f'CPU has {"/".join(flags)} but this PyTorch build has no oneDNN'
        return True, f'CPU has {"/".join(flags)}'
    return False, f'no bf16 detection for device type {device.type!r}'


def resolve_precision(precision: str, device: torch.device | str,
                      cpuinfo: str = '/proc/cpuinfo') -> tuple[torch.dtype | None, str]:
    """The autocast dtype for ``precision`` on ``device`` (``None``: fp32, no autocast) and the reason.

    Args:
        precision (str): One of :data:`PRECISIONS`.
        device (torch.device): Where the network runs.
        cpuinfo (str): CPU flag file read by ``auto``.

    Returns:
        tuple: ``(dtype or None, reason)``.
    """
    check_precision(precision, 'precision')
    if precision != 'auto':
        return _DTYPES[precision], 'set in the options'
    fast, why = fast_bf16(device, cpuinfo)
    return (torch.bfloat16, f'auto: {why}') if fast else (None, f'auto: {why}')


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``, or a no-op context for ``dtype=None`` (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _name(dtype):
    return {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dtype]


class ModelPrecision:
    """The training and validation precisions of one model, and the fp16 loss scaling.

    Args:
        opt (dict): BasicSR options; reads ``train:precision`` and ``val:precision`` (default ``fp32``).
        device (torch.device): The model's device.
        logger (logging.Logger, optional): Receives one line per precision with the choice and its reason.
    """

    def __init__(self, opt: dict, device: torch.device | str, logger=None) -> None:
        self.device = torch.device(device)
        train = (opt.get('train') or {}).get('precision', 'fp32') if opt.get('is_train') else 'fp32'
        val = (opt.get('val') or {}).get('precision', 'fp32')
        self.train_dtype, train_why = resolve_precision(check_precision(train, 'train:precision'), self.device)
        self.val_dtype, val_why = resolve_precision(check_precision(val, 'val:precision'), self.device)
        enabled = self.train_dtype is torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=enabled) if enabled else None
        if logger is not None:
            if opt.get('is_train'):
                logger.info(f'Training precision: {_name(self.train_dtype)} ({train_why})')
            logger.info(f'Validation precision: {_name(self.val_dtype)} ({val_why})')
            if torch.float16 in (self.train_dtype, self.val_dtype) and self.device.type == 'cpu':
                logger.warning('fp16 on CPU is correct but slow on most CPUs; bf16 is the fast CPU format')

    @staticmethod
    def check_options(opt: dict) -> None:
        """One-line ``ValueError`` naming ``train:precision`` or ``val:precision`` if it is not a valid choice."""
        for section in ('train', 'val'):
            value = (opt.get(section) or {}).get('precision')
            if value is not None:
                check_precision(value, f'{section}:precision')

    def run(self, net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, training: bool) -> torch.Tensor:
        """``net(x)`` under :meth:`autocast`; a low-precision output is returned as fp32 (losses, metrics and the
        residual add see fp32)."""
        with self.autocast(training):
            out = net(x)
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out

    def autocast(self, training: bool) -> contextlib.AbstractContextManager:
        """Autocast context of a training step (``training=True``) or of inference."""
        return autocast(self.device, self.train_dtype if training else self.val_dtype)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()``; with fp16, of the scaled loss, then the gradients are unscaled in place (so that
        gradient clipping and checks see true values)."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; with fp16, skipped when a gradient overflowed, and the loss scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
