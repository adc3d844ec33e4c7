"""NLRN: Non-Local Recurrent Network (Liu, Wen, Fan, Loy, Huang, NeurIPS 2018)."""
from typing import Callable, List, Optional, Tuple

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from nl_plugin.archs.nlrn_layout import attach_range_marker
from nl_plugin.archs.nlrn_stream import stream_forward
from nl_plugin.archs.windowed_nonlocal_arch import WindowedNonLocalBlock
from nl_plugin.ops.amp import full_precision
from nl_plugin.ops.nlrn_attention import CorrelationState
from nl_plugin.ops.nlrn_attention.common import border_rule
from nl_plugin.ops.nlrn_attention.router import Kernel, route_network

# How a 3x3 conv is applied: ``conv(module, x)``. On the whole image it is the module itself; the
# window-scope stream applies it to bands of rows (``nlrn_stream``).
ConvFn = Callable[[nn.Conv2d, torch.Tensor], torch.Tensor]


def whole_image(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``ConvFn`` of the whole-image graph."""
    return conv(x)


def _one_or_per_step(modules: nn.ModuleList, index: int) -> nn.Module:
    """The shared module (a list of one) or the one of step ``index``."""
    return modules[0 if len(modules) == 1 else index]


class NLRNStep:
    """The modules of one recurrent step t and its graph (paper Fig. 2, eq. 7; NLRN.md):

        z = ReLU(BN_t1(s));  z = z + A g  (non-local, at the steps that have it);
        h = conv_a(BN_t2(z));  s = conv_b(ReLU(BN_t3(h))) + s0

    ``NLRN.forward`` runs it on the whole image (``features`` then ``update``); the window-scope
    stream runs the same methods on bands of rows, with its own banded attention. ``inplace`` reuses
    the buffers when autograd is off.

    Args:
        bns (nn.ModuleList): BN_t1, BN_t2, BN_t3 of this step.
        conv_a, conv_b (nn.Conv2d): The step's 3x3 convs.
        block (WindowedNonLocalBlock | None): Non-local module, None at steps without one.
    """

    def __init__(self, bns: nn.ModuleList, conv_a: nn.Conv2d, conv_b: nn.Conv2d,
                 block: Optional[WindowedNonLocalBlock]):
        self.bn1, self.bn2, self.bn3 = bns
        self.conv_a, self.conv_b, self.block = conv_a, conv_b, block

    def features(self, s: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """z = ReLU(BN_t1(s)), the input of the non-local module."""
        return F.relu_(self.bn1(s)) if inplace else F.relu(self.bn1(s))

    @staticmethod
    def add_attention(z: torch.Tensor, attn: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """z + A g (eq. 3)."""
        return z.add_(attn) if inplace else z + attn

    def hidden(self, z: torch.Tensor, conv: ConvFn = whole_image) -> torch.Tensor:
        """h = conv_a(BN_t2(z)); no ReLU between BN_t2 and conv_a (official)."""
        return conv(self.conv_a, self.bn2(z))

    def next_state(self, h: torch.Tensor, s0: torch.Tensor, conv: ConvFn = whole_image,
                   inplace: bool = False) -> torch.Tensor:
        """s = conv_b(ReLU(BN_t3(h))) + s0: the identity path is from s0, not from s."""
        h = conv(self.conv_b, F.relu_(self.bn3(h)) if inplace else F.relu(self.bn3(h)))
        return h.add_(s0) if inplace else h + s0

    def update(self, z: torch.Tensor, s0: torch.Tensor, state: Optional[CorrelationState], propagate: bool,
               inplace: bool = False, carry_out: Optional[bool] = None,
               logit_memory: Optional[int] = None) -> Tuple[torch.Tensor, Optional[CorrelationState]]:
        """The step after ``features`` on the whole image: the new s and the carried correlation.
        ``carry_out`` False (the last non-local step) reads the carried correlation without passing it on;
        ``logit_memory`` is the network's ceiling in bytes of the carried window logits."""
        if self.block is not None:
            attn, state = self.block.attend(z, state if propagate else None,
                                            propagate=propagate if carry_out is None else carry_out,
                                            logit_memory=logit_memory)
            z = self.add_attention(z, attn, inplace)
            del attn
        h = self.hidden(z)
        del z
        return self.next_state(h, s0, inplace=inplace), state


@ARCH_REGISTRY.register()
class NLRN(nn.Module):
    """Non-Local Recurrent Network for denoising and (bicubic-upsampled, Y channel) super-resolution.

    Official graph (paper Fig. 2, eq. 7): ``s0 = conv(BN(x))``; for t = 1..T:
    ``z = NL(ReLU(BN_t1(s)))``, ``s = conv_b(ReLU(BN_t3(conv_a(BN_t2(z))))) + s0``;
    ``out = x + conv_end(ReLU(BN_out(s)))``. Convs and the non-local module are shared across steps,
    every step has its own three BatchNorms (eps 1e-3, momentum 0.01 = TF 0.99). The default
    network has 330,625 parameters outside BatchNorm (340,099 trainable in all).

    Tensors are in [0, 1]. Inside, the input is multiplied by ``img_range`` and the output divided by
    it (BasicSR's EDSR convention), so that the parameters, the BN epsilons, the loss gradients and
    their clipping are at the official 0..255 scale: trained from scratch, the network starts and
    moves as the official one. For SR feed the bicubic-upsampled Y channel (``num_in_ch=1``); the
    network is the same. Window-scope inference on large images is streamed in bands of rows
    (``nlrn_stream``), with the same result; ``router.route_network`` decides.

    Args:
        num_in_ch (int): Input channels. Default: 1.
        num_out_ch (int): Output channels; must equal ``num_in_ch`` (residual output). Default: 1.
        num_feat (int): Feature channels. Default: 128.
        num_embed (int): theta/phi channels of the non-local module. Default: 64.
        num_steps (int): Recurrent steps T. Default: 12.
        nl_scope (str): 'global' (attention over the whole input tensor, official) or 'window'
            (q x q window around every pixel over the whole image, paper). Default: 'global'.
        window_size (int): Odd q of the window scope. Default: 45.
        border (str): Window scope border: 'exclude' or 'circular'. Default: 'exclude'.
        correlation (str): Paper Table 1 correlation function, see
            ``WindowedNonLocalBlock``. Default: 'embedded_gaussian'.
        share_weights (bool): Share convs and non-local weights across steps (official). Default: True.
        nonlocal_every (int): Apply the non-local module at steps 1, 1+k, 1+2k, ... Default: 1.
        propagate_correlation (bool): Carry the correlation across steps (eq. 6). Default: True.
        bn_eps (float): BatchNorm epsilon. Default: 1e-3.
        bn_momentum (float): BatchNorm momentum (PyTorch convention). Default: 0.01.
        img_range (float): Pixel range the network works at inside (official: 255). Saved with the
            weights; a state dict of another range is converted on load (``nlrn_layout``). Default: 255.
        attention_kernel (str): Kernel of the non-local steps: 'auto' (on CUDA the fused Triton window step),
            'triton', 'flex', 'halo' (window scope) or 'dense' (``WindowedNonLocalBlock``). Default: 'auto'.
        logit_memory_gb (float, optional): Ceiling in GB of the carried window logits: window-scope inference with
            the Triton step streams bands of rows through all steps once the whole image's fp32 logits would exceed
            it, and a step on the whole image carries embeddings instead of logits past it. Default: None (40% of
            the free device memory, ``router.LOGIT_MEMORY_SHARE``).
    """

    #: Constructor arguments that choose how this machine computes, not what: not stored with the weights
    #: (``weights.arch_from_opt``), ignored where a file gives them, not compared on resume.
    RUNTIME_ARGS = ('attention_kernel', 'logit_memory_gb')

    def __init__(self, num_in_ch: int = 1, num_out_ch: int = 1, num_feat: int = 128, num_embed: int = 64,
                 num_steps: int = 12, nl_scope: str = 'global', window_size: int = 45, border: str = 'exclude',
                 correlation: str = 'embedded_gaussian', share_weights: bool = True, nonlocal_every: int = 1,
                 propagate_correlation: bool = True, bn_eps: float = 1e-3, bn_momentum: float = 0.01,
                 img_range: float = 255.0, attention_kernel: str = 'auto', logit_memory_gb: Optional[float] = None):
        super().__init__()
        if logit_memory_gb is not None and not float(logit_memory_gb) > 0:
            raise ValueError(f'logit_memory_gb must be > 0 (or null for the default), got {logit_memory_gb!r}')
        self.logit_memory_gb = logit_memory_gb
        if not float(img_range) > 0:
            raise ValueError(f'img_range must be > 0, got {img_range!r}')
        if num_out_ch != num_in_ch:
            raise ValueError(f'NLRN predicts a residual: num_out_ch ({num_out_ch}) must equal num_in_ch ({num_in_ch})')
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f'num_steps must be a positive int, got {num_steps!r}')
        if not isinstance(nonlocal_every, int) or nonlocal_every < 1:
            raise ValueError(f'nonlocal_every must be a positive int, got {nonlocal_every!r}')
        self.num_in_ch, self.num_steps, self.nonlocal_every = num_in_ch, num_steps, nonlocal_every
        self.img_range = float(img_range)
        #: Window-scope inference on large images may run in bands of rows (same result, less memory). Set
        #: False to run every step on the whole image, e.g. to capture per-step activations with hooks.
        self.stream_inference = True
        self.propagate_correlation = propagate_correlation
        self.nl_steps = [t for t in range(num_steps) if t % nonlocal_every == 0]

        def bn(c):
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)

        def conv3(cin, cout):
            return nn.Conv2d(cin, cout, 3, 1, 1)

        def one_or_per_step(make, n):
            return nn.ModuleList(make() for _ in range(1 if share_weights else n))

        self.bn_first = bn(num_in_ch)
        self.conv_first = conv3(num_in_ch, num_feat)
        self.nonlocal_blocks = one_or_per_step(lambda: WindowedNonLocalBlock(
            num_feat, num_embed, correlation=correlation, nl_scope=nl_scope, window_size=window_size,
            border=border, attention_kernel=attention_kernel), len(self.nl_steps))
        self.convs_a = one_or_per_step(lambda: conv3(num_feat, num_feat), num_steps)
        self.convs_b = one_or_per_step(lambda: conv3(num_feat, num_feat), num_steps)
        # Per-step BatchNorms (not shared): BN_t1 before ReLU/NL, BN_t2 before conv_a, BN_t3 before conv_b.
        self.bns = nn.ModuleList(nn.ModuleList(bn(num_feat) for _ in range(3)) for _ in range(num_steps))
        self.bn_last = bn(num_feat)
        self.conv_last = conv3(num_feat, num_out_ch)
        self.reset_parameters()
        attach_range_marker(self, self.img_range)

    def reset_parameters(self) -> None:
        """Xavier-uniform 3x3 kernels and zero biases (TF defaults); the non-local blocks init themselves."""
        for conv in (self.conv_first, *self.convs_a, *self.convs_b, self.conv_last):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def steps(self) -> List[NLRNStep]:
        """The T recurrent steps, with their shared or own modules."""
        return [NLRNStep(self.bns[t], _one_or_per_step(self.convs_a, t), _one_or_per_step(self.convs_b, t),
                         _one_or_per_step(self.nonlocal_blocks, self.nl_steps.index(t)) if t in self.nl_steps
                         else None) for t in range(self.num_steps)]

    def stem(self, x: torch.Tensor, conv: ConvFn = whole_image) -> torch.Tensor:
        """s0 = conv1(BN_in(x))."""
        return conv(self.conv_first, self.bn_first(x))

    def head(self, x: torch.Tensor, s: torch.Tensor, conv: ConvFn = whole_image) -> torch.Tensor:
        """x + conv_end(ReLU(BN_out(s))) (residual learning); conv_end in fp32 under autocast (``full_precision``)."""
        return x + full_precision(lambda t: conv(self.conv_last, t), F.relu(self.bn_last(s)))

    def auto_tile(self, h: int, w: int) -> Optional[Tuple[int, int]]:
        """Inference tiles (``basicsr infer --tile auto``, ``val: tile: auto``): ``(size, overlap)`` or None.

        Global scope: 45x45 tiles at stride 23, the attention extent it was trained on (the official test
        protocol is 45:38, about 10x as many tiles). Window scope with a border whose bands stream
        (``Border.streams``: 'exclude') streams the image by itself (``nlrn_stream``): tiles of 2048 only
        past 2048 px on the short side. The circular border does not stream (its logits cover the whole
        image): tiles of 512 past 512 px.
        """
        blk = self.nonlocal_blocks[0]
        if blk.nl_scope != 'window':
            return 45, 22
        if border_rule(blk.border).streams:
            return (2048, 128) if min(h, w) > 2048 else None
        return (512, 128) if max(h, w) > 512 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x (Tensor): (B, num_in_ch, H, W) degraded image in [0, 1].

        Returns:
            Tensor: (B, num_in_ch, H, W) restored image ``x + residual``.
        """
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f'NLRN expects input of shape (B, {self.num_in_ch}, H, W), got {tuple(x.shape)}')
        x = x * self.img_range      # official pixel scale inside; every path below works on it
        lean = not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        blk = self.nonlocal_blocks[0]
        logit_memory = None if self.logit_memory_gb is None else int(self.logit_memory_gb * 2**30)
        path = route_network(grad=not lean, training=self.training, window_size=blk.attention_window,
                             border=blk.border, height=x.shape[2], width=x.shape[3], device=x.device,
                             allow_bands=self.stream_inference, attention_kernel=blk.attention_kernel,
                             batch=x.shape[0], logit_memory=logit_memory)
        if path is Kernel.BANDS:
            return stream_forward(self, x) / self.img_range
        s0 = self.stem(x)
        s, state = s0, None
        # The last window-scope step reads the carried logits without writing them back.
        last_nl = self.nl_steps[-1] if blk.attention_window is not None else None
        for t, step in enumerate(self.steps()):
            z = step.features(s, inplace=lean)
            del s      # s and z are dropped as early as possible: a step peaks at the attention
            s, state = step.update(z, s0, state, self.propagate_correlation, inplace=lean,
                                   carry_out=False if t == last_nl else None, logit_memory=logit_memory)
            del z
        return self.head(x, s) / self.img_range
