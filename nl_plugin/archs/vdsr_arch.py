"""VDSR (Kim et al., CVPR 2016), also the CNN stage of N3Net's super-resolution model."""
import math

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn as nn

from nl_plugin.ops.amp import full_precision

from .arch_util import add_first_channels, bicubic_upsample


@ARCH_REGISTRY.register()
class VDSR(nn.Module):
    """VDSR: conv+ReLU, (depth - 2) x [conv+ReLU], conv; global residual on the interpolated input.

    Args:
        num_in_ch (int): Input channels. Default: 1.
        num_out_ch (int): Output channels. Default: 1.
        num_feat (int): Intermediate channels. Default: 64.
        depth (int): Total number of conv layers (>= 2). VDSR: 20, N3Net-SR stages: 7. Default: 20.
        upscale (int): Bicubic upsampling applied to the input inside ``forward`` (LR in, HR out, as
            BasicSR's SR pipeline expects). 1 means the input is already interpolated (e.g. a
            multi-scale x2/x3/x4 model fed bicubic-upsampled images). Default: 1.
        residual (bool): Add the first min(in, out) input channels to the output. Default: True.
        init (str): ``'official'`` (He-normal convs, zero bias, as in VDSR) or ``'default'``.
            Default: ``'official'``.
    """

    def __init__(self, num_in_ch: int = 1, num_out_ch: int = 1, num_feat: int = 64, depth: int = 20, upscale: int = 1,
                 residual: bool = True, init: str = 'official') -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f'VDSR depth must be >= 2, got {depth}')
        if min(num_in_ch, num_out_ch, num_feat) < 1:
            raise ValueError(f'VDSR channel counts must be positive, got num_in_ch={num_in_ch}, '
                             f'num_out_ch={num_out_ch}, num_feat={num_feat}')
        if int(upscale) != upscale or upscale < 1:
            raise ValueError(f'VDSR upscale must be a positive integer, got {upscale}')
        if init not in ('official', 'default'):
            raise ValueError(f"VDSR init must be 'official' or 'default', got {init!r}")
        self.num_in_ch, self.upscale, self.residual = num_in_ch, int(upscale), residual
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        body = []
        for _ in range(depth - 2):
            body += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*body)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        if init == 'official':
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (9 * m.out_channels)))
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, upscale: int | None = None) -> torch.Tensor:
        """(N, num_in_ch, h, w) -> (N, num_out_ch, h * upscale, w * upscale).

        ``upscale`` overrides the constructor's factor for this call (multi-scale use).
        """
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f'VDSR expects (N, {self.num_in_ch}, H, W) input, got shape {tuple(x.shape)}')
        x = bicubic_upsample(x, self.upscale if upscale is None else upscale)
        out = full_precision(self.conv_last, self.body(self.relu(self.conv_first(x))))
        return add_first_channels(out, x) if self.residual else out
