"""Building blocks shared by several architectures: stage residual, official init, BN folding, upsampling, tiling."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn as nn


def add_first_channels(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Residual of N3Net's stages: the first ``min(C_in, C_out)`` input channels are added to the
    first ``min(C_in, C_out)`` output channels (official code); other output channels unchanged."""
    m = min(out.shape[1], x.shape[1])
    if m == out.shape[1]:
        return out + x[:, :m]
    return torch.cat([out[:, :m] + x[:, :m], out[:, m:]], 1)


def dncnn_init_(module: nn.Module, bn_weight_min: float = 0.025) -> None:
    """Official N3Net/DnCNN initialisation, in place.

    Convs ~ N(0, sqrt(2 / (9 * C_out))) with zero bias; BN weights ``|N(0, sqrt(2 / (9 * C)))|``
    clipped below at ``bn_weight_min``, BN bias 0.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            std = math.sqrt(2.0 / (9 * m.num_features))
            with torch.no_grad():
                m.weight.normal_(0.0, std).abs_().clamp_(min=bn_weight_min)
            nn.init.zeros_(m.bias)


def run_sequential(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run ``seq``; at inference (eval mode, no autograd) fold every conv -> BatchNorm pair into one
    conv (saves one full pass over the feature map per BN, same result up to rounding)."""
    if seq.training or torch.is_grad_enabled():
        return seq(x)
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) and nxt.track_running_stats:
            scale = nxt.weight * torch.rsqrt(nxt.running_var + nxt.eps)
            bias = nxt.bias - nxt.running_mean * scale
            if m.bias is not None:
                bias = bias + m.bias * scale
            x = F.conv2d(x, m.weight * scale.view(-1, 1, 1, 1), bias, m.stride, m.padding, m.dilation, m.groups)
            i += 2
        else:
            x = m(x)
            i += 1
    return x


def bicubic_upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upsampling by ``scale`` (PyTorch's kernel, not MATLAB's antialiased imresize)."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode='bicubic', align_corners=False)


def default_auto_tile(h: int, w: int, size: int = 512, overlap: int = 64,
                      above: int = 1024) -> Optional[Tuple[int, int]]:
    """Tiles of a convolutional network: one pass up to ``above`` pixels on the long side, else (size, overlap)."""
    return (size, overlap) if max(h, w) > above else None


def auto_tile(net: nn.Module, h: int, w: int) -> Optional[Tuple[int, int]]:
    """How ``net`` wants an h x w input tiled at inference: ``(size, overlap)`` in input pixels, or None for one
    pass. An architecture declares it with a method ``auto_tile(h, w)``; others get :func:`default_auto_tile`.
    Read by ``basicsr infer --tile auto`` and ``val: tile: auto``."""
    own = getattr(net, 'auto_tile', None)
    return own(h, w) if callable(own) else default_auto_tile(h, w)
