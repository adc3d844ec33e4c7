"""DnCNN (Zhang et al., TIP 2017), also the CNN stage of N3Net (Plötz & Roth, NeurIPS 2018)."""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn as nn

from nl_plugin.ops.amp import full_precision

from .arch_util import add_first_channels, dncnn_init_, run_sequential


@ARCH_REGISTRY.register()
class DnCNN(nn.Module):
    """DnCNN: conv+ReLU, (depth - 2) x [conv (no bias), BN, ReLU], conv; residual.

    Layout of N3Net's stages (and of DnCNN-17 with ``depth=17``, 556,097 parameters)::

        conv3x3(num_in_ch -> num_feat, bias) + ReLU
        (depth - 2) x [conv3x3(num_feat -> num_feat, no bias), BN, ReLU]
        conv3x3(num_feat -> num_out_ch, bias)
        + first min(num_in_ch, num_out_ch) input channels (if ``residual``)

    With one input and one output channel the residual is the usual "predict the noise" DnCNN
    (output = input + network, i.e. the network learns minus the noise).

    Args:
        num_in_ch (int): Input channels. Default: 1.
        num_out_ch (int): Output channels. Default: 1.
        num_feat (int): Intermediate channels. Default: 64.
        depth (int): Total number of conv layers (the paper's D; >= 2). DnCNN-S: 17, N3Net stages: 6.
            Default: 17.
        residual (bool): Add the first min(in, out) input channels to the output. Default: True.
        bn (bool): Use batch normalisation in the middle layers (without it the middle convs get a
            bias). Default: True.
        bn_eps (float): BatchNorm epsilon. Default: 1e-5.
        bn_momentum (float): BatchNorm momentum (PyTorch convention; official N3Net: 0.001).
            Default: 0.1.
        init (str): ``'official'`` (N3Net/DnCNN code: He-normal convs, clipped |N| BN weights) or
            ``'default'`` (PyTorch). Default: ``'official'``.
    """

    def __init__(self, num_in_ch: int = 1, num_out_ch: int = 1, num_feat: int = 64, depth: int = 17,
                 residual: bool = True, bn: bool = True, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 init: str = 'official') -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f'DnCNN depth must be >= 2 (first and last conv), got {depth}')
        if min(num_in_ch, num_out_ch, num_feat) < 1:
            raise ValueError(f'DnCNN channel counts must be positive, got num_in_ch={num_in_ch}, '
                             f'num_out_ch={num_out_ch}, num_feat={num_feat}')
        if init not in ('official', 'default'):
            raise ValueError(f"DnCNN init must be 'official' or 'default', got {init!r}")
        self.num_in_ch, self.num_out_ch, self.residual = num_in_ch, num_out_ch, residual
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        body = []
        for _ in range(depth - 2):
            body.append(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=not bn))
            if bn:
                body.append(nn.BatchNorm2d(num_feat, eps=bn_eps, momentum=bn_momentum))
            body.append(nn.ReLU(inplace=True))
        # indices 0, 3, 6, ... are convs and 1, 4, 7, ... BNs: the official checkpoint's layer1 layout
        self.body = nn.Sequential(*body)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1, bias=True)
        if init == 'official':
            dncnn_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_in_ch, H, W) -> (N, num_out_ch, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f'DnCNN expects (N, {self.num_in_ch}, H, W) input, got shape {tuple(x.shape)}')
        out = full_precision(self.conv_last, run_sequential(self.body, self.relu(self.conv_first(x))))
        return add_first_channels(out, x) if self.residual else out
