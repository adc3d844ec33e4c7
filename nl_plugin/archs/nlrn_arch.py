"""NLRN: Non-Local Recurrent Network (Liu, Wen, Fan, Loy, Huang, NeurIPS 2018)."""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from nl_plugin.archs.windowed_nonlocal_arch import WindowedNonLocalBlock


@ARCH_REGISTRY.register()
class NLRN(nn.Module):
    """Non-Local Recurrent Network for denoising and (bicubic-upsampled, Y channel) super-resolution.

    Official graph (paper Fig. 2, eq. 7): ``s0 = conv(BN(x))``; for t = 1..T:
    ``z = NL(ReLU(BN_t1(s)))``, ``s = conv_b(ReLU(BN_t3(conv_a(BN_t2(z))))) + s0``;
    ``out = x + conv_end(ReLU(BN_out(s)))``. Convs and the non-local module are shared across steps,
    every step has its own three BatchNorms (eps 1e-3, momentum 0.01 = TF 0.99). The default
    network has 330,625 parameters outside BatchNorm (340,099 trainable in all).

    Tensors are in [0, 1]. For SR feed the bicubic-upsampled Y channel (``num_in_ch=1``); the
    network is the same.

    Args:
        num_in_ch (int): Input channels. Default: 1.
        num_out_ch (int): Output channels; must equal ``num_in_ch`` (residual output). Default: 1.
        num_feat (int): Feature channels. Default: 128.
        num_embed (int): theta/phi channels of the non-local module. Default: 64.
        num_steps (int): Recurrent steps T. Default: 12.
        nl_scope (str): 'patch' (attention over the whole input tensor, official) or 'window'
            (q x q window around every pixel over the whole image, paper). Default: 'patch'.
        window_size (int | None): Odd q of the window scope; None or 0 = whole image. Default: 45.
        border (str): Window scope border: 'exclude' or 'circular'. Default: 'exclude'.
        correlation (str): Paper Table 1 correlation function, see
            ``WindowedNonLocalBlock``. Default: 'embedded_gaussian'.
        share_weights (bool): Share convs and non-local weights across steps (official). Default: True.
        nonlocal_every (int): Apply the non-local module at steps 1, 1+k, 1+2k, ... Default: 1.
        propagate_correlation (bool): Carry the correlation across steps (eq. 6). Default: True.
        bn_eps (float): BatchNorm epsilon. Default: 1e-3.
        bn_momentum (float): BatchNorm momentum (PyTorch convention). Default: 0.01.
    """

    def __init__(self, num_in_ch=1, num_out_ch=1, num_feat=128, num_embed=64, num_steps=12, nl_scope='patch',
                 window_size=45, border='exclude', correlation='embedded_gaussian', share_weights=True,
                 nonlocal_every=1, propagate_correlation=True, bn_eps=1e-3, bn_momentum=0.01):
        super().__init__()
        if num_out_ch != num_in_ch:
            raise ValueError(f'NLRN predicts a residual: num_out_ch ({num_out_ch}) must equal num_in_ch ({num_in_ch})')
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f'num_steps must be a positive int, got {num_steps!r}')
        if not isinstance(nonlocal_every, int) or nonlocal_every < 1:
            raise ValueError(f'nonlocal_every must be a positive int, got {nonlocal_every!r}')
        self.num_in_ch, self.num_steps, self.nonlocal_every = num_in_ch, num_steps, nonlocal_every
        self.propagate_correlation = propagate_correlation
        self.nl_steps = [t for t in range(num_steps) if t % nonlocal_every == 0]

        def bn(c):
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)

        def conv3(cin, cout):
            return nn.Conv2d(cin, cout, 3, 1, 1)

        self.bn_first = bn(num_in_ch)
        self.conv_first = conv3(num_in_ch, num_feat)
        n_conv = 1 if share_weights else num_steps
        n_nl = 1 if share_weights else len(self.nl_steps)
        self.nonlocal_blocks = nn.ModuleList(
            WindowedNonLocalBlock(num_feat, num_embed, correlation, nl_scope, window_size, border) for _ in range(n_nl))
        self.convs_a = nn.ModuleList(conv3(num_feat, num_feat) for _ in range(n_conv))
        self.convs_b = nn.ModuleList(conv3(num_feat, num_feat) for _ in range(n_conv))
        # Per-step BatchNorms (not shared): BN_t1 before ReLU/NL, BN_t2 before conv_a, BN_t3 before conv_b.
        self.bns = nn.ModuleList(nn.ModuleList(bn(num_feat) for _ in range(3)) for _ in range(num_steps))
        self.bn_last = bn(num_feat)
        self.conv_last = conv3(num_feat, num_out_ch)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not any(m is b.g for b in self.nonlocal_blocks):
                if not any(m is b.theta or m is b.phi for b in self.nonlocal_blocks):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        """Args:
            x (Tensor): (B, num_in_ch, H, W) degraded image in [0, 1].

        Returns:
            Tensor: (B, num_in_ch, H, W) restored image ``x + residual``.
        """
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f'NLRN expects input of shape (B, {self.num_in_ch}, H, W), got {tuple(x.shape)}')
        lean = not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        s0 = self.conv_first(self.bn_first(x))
        s, state = s0, None
        for t in range(self.num_steps):
            bn1, bn2, bn3 = self.bns[t]
            z = F.relu_(bn1(s)) if lean else F.relu(bn1(s))
            del s
            if t in self.nl_steps:
                block = self.nonlocal_blocks[0 if len(self.nonlocal_blocks) == 1 else self.nl_steps.index(t)]
                prev = state if self.propagate_correlation else None
                attn, state = block.attend(z, prev, propagate=self.propagate_correlation)
                z = z.add_(attn) if lean else z + attn      # z + A g (eq. 3)
                del attn
            i = 0 if len(self.convs_a) == 1 else t
            h = self.convs_a[i](bn2(z))                     # no ReLU between BN_t2 and conv_a (official)
            del z
            h = self.convs_b[i](F.relu_(bn3(h)) if lean else F.relu(bn3(h)))
            s = h.add_(s0) if lean else h + s0             # identity path from s0
        res = self.conv_last(F.relu(self.bn_last(s)))
        return x + res
