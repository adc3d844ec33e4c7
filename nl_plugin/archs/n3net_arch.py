"""N3Net (Plötz & Roth, NeurIPS 2018): CNN stages interleaved with neural nearest neighbours blocks."""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn as nn

from nl_plugin.utils import renamed_options

from .arch_util import bicubic_upsample, default_auto_tile
from .dncnn_arch import DnCNN
from .n3block_arch import N3Block
from .vdsr_arch import VDSR


def _flush_denormal_enabled():
    """Whether denormal floats are flushed (probe: a denormal times 1 reads 0 when they are)."""
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0


@ARCH_REGISTRY.register()
@renamed_options(window_size='search_size', block_type='selection')
class N3Net(nn.Module):
    """N3Net: ``num_stages`` CNN stages with an N3 block between consecutive stages.

    Defaults are the official grayscale denoiser (705,511 parameters)::

        DnCNN(1 -> 8, depth 6) -> N3 -> DnCNN(64 -> 8) -> N3 -> DnCNN(64 -> 1)

    with 64 features, k = 7, 10x10 patches at stride 5, an 80x80 search region, per-stage residual
    on the first min(in, out) channels and no global skip. Variants from the paper:

    * light model: ``num_stages=2`` (one N3 block, 427,348 parameters);
    * super-resolution: ``stage_type='vdsr', depth=7, upscale=s`` (three VDSR stages on the
      bicubic-upsampled input; ``upscale=1`` when the data pipeline already upsamples, e.g. one
      model for x2/x3/x4);
    * real noise: ``num_feat=128, depth=9, num_inter_ch=32, k=3, num_noise_ch=2``;
    * ablations: ``selection='knn'`` (hard k-NN on a fixed feature space, ``knn_feature``) or
      ``'concrete'`` (stochastic Concrete sampling).

    In eval mode on CPU the forward flushes denormal floats (the released weights make the convs hit
    them, 2.5-3x slower) and restores the previous setting afterwards, and runs the convolutions on
    channels-last activations (faster with oneDNN); the output is a normal contiguous tensor.

    Args:
        num_in_ch (int): Image channels. Default: 1.
        num_out_ch (int): Output channels. Default: 1.
        num_feat (int): Features of the CNN stages. Default: 64.
        depth (int): Conv layers per stage. Default: 6.
        num_inter_ch (int): Channels between a stage and the next N3 block. Default: 8.
        num_stages (int): Number of CNN stages (N3 blocks: ``num_stages - 1``). Default: 3.
        k (int): Neighbours per N3 block. Default: 7.
        patch_size (int): Patch side. Default: 10.
        stride (int): Patch stride. Default: 5.
        search_size (int): Search region side in patches (80 px = (15 - 1) * 5 + 10). Default: 15.
        embed_feat (int): Hidden channels of the embedding / temperature CNNs. Default: 64.
        temp_mode (str): ``'mean'`` (official) or ``'center'`` (paper) patch temperature.
            Default: ``'mean'``.
        knn_update (str): ``'official'`` (log(1 - w) added to temperature-scaled logits) or
            ``'paper'`` (added before scaling; exact hard k-NN limit). Default: ``'official'``.
        diff (bool): N3 output ``z_j - x`` (official) instead of ``z_j``. Default: True.
        selection (str): Selection of the N3 blocks: ``'n3'`` (continuous k-NN), ``'knn'`` (hard k-NN
            baseline) or ``'concrete'`` (see :class:`N3Block`). Default: ``'n3'``.
        knn_feature (str): Feature space of ``selection='knn'``: ``'input'`` (the network input,
            e.g. the noisy image) or ``'block'`` (the block's own input). Default: ``'input'``.
        stage_type (str): ``'dncnn'`` or ``'vdsr'``. Default: ``'dncnn'``.
        upscale (int): Bicubic upsampling of the input before the first stage (SR). Default: 1.
        num_noise_ch (int): Extra input channels (noise maps) concatenated to the image channels in
            the input; the output still has ``num_out_ch`` channels. Default: 0.
        bn_eps (float): BatchNorm epsilon of the DnCNN stages. Default: 1e-5.
        bn_momentum (float): BatchNorm momentum of the DnCNN stages (official 0.001). Default: 0.001.
        init (str): ``'official'`` or ``'default'`` initialisation of the stages. Default: ``'official'``.
    """

    def __init__(self, num_in_ch: int = 1, num_out_ch: int = 1, num_feat: int = 64, depth: int = 6,
                 num_inter_ch: int = 8, num_stages: int = 3, k: int = 7, patch_size: int = 10, stride: int = 5,
                 search_size: int = 15, embed_feat: int = 64, temp_mode: str = 'mean', knn_update: str = 'official',
                 diff: bool = True, selection: str = 'n3', knn_feature: str = 'input', stage_type: str = 'dncnn',
                 upscale: int = 1, num_noise_ch: int = 0, bn_eps: float = 1e-5, bn_momentum: float = 0.001,
                 init: str = 'official') -> None:
        super().__init__()
        if knn_feature not in ('input', 'block'):
            raise ValueError(f"knn_feature must be 'input' or 'block', got {knn_feature!r}")
        if stage_type not in ('dncnn', 'vdsr'):
            raise ValueError(f"stage_type must be 'dncnn' or 'vdsr', got {stage_type!r}")
        if int(num_stages) != num_stages or num_stages < 1:
            raise ValueError(f'num_stages must be a positive integer, got {num_stages}')
        if int(upscale) != upscale or upscale < 1:
            raise ValueError(f'upscale must be a positive integer, got {upscale}')
        if num_noise_ch < 0:
            raise ValueError(f'num_noise_ch must be >= 0, got {num_noise_ch}')
        self.num_in_ch, self.num_noise_ch, self.upscale = num_in_ch, num_noise_ch, int(upscale)
        self.selection, self.knn_feature = selection, knn_feature
        in_total = num_in_ch + num_noise_ch
        block_out = num_inter_ch * (k + 1)

        def stage(cin, cout):
            if stage_type == 'dncnn':
                return DnCNN(cin, cout, num_feat, depth, residual=True, bn=True, bn_eps=bn_eps,
                             bn_momentum=bn_momentum, init=init)
            return VDSR(cin, cout, num_feat, depth, upscale=1, residual=True, init=init)

        chans = [in_total] + [block_out] * (num_stages - 1)
        outs = [num_inter_ch] * (num_stages - 1) + [num_out_ch]
        self.stages = nn.ModuleList(stage(ci, co) for ci, co in zip(chans, outs))
        self.n3_blocks = nn.ModuleList(
            N3Block(num_inter_ch, k=k, patch_size=patch_size, stride=stride, search_size=search_size,
                    embed_feat=embed_feat, temp_mode=temp_mode, knn_update=knn_update, selection=selection,
                    diff=diff) for _ in range(num_stages - 1))

    def auto_tile(self, h: int, w: int) -> tuple[int, int] | None:
        """Inference tiles (``basicsr infer --tile auto``, ``val: tile: auto``): one pass up to 1024 px, else
        512-pixel tiles overlapping by 96, more than a conv stage's receptive field plus half the 80-pixel
        search region of an N3 block."""
        return default_auto_tile(h, w, overlap=96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_in_ch + num_noise_ch, h, w) -> (N, num_out_ch, h * upscale, w * upscale)."""
        expected = self.num_in_ch + self.num_noise_ch
        if x.dim() != 4 or x.shape[1] != expected:
            extra = f' (+ {self.num_noise_ch} noise-map channels)' if self.num_noise_ch else ''
            raise ValueError(f'N3Net expects (N, {expected}, H, W) input: {self.num_in_ch} image channels{extra}; '
                             f'got shape {tuple(x.shape)}')
        flush = not self.training and x.device.type == 'cpu' and not _flush_denormal_enabled()
        if flush:
            torch.set_flush_denormal(True)
        try:
            return self._forward(x, channels_last=flush)
        finally:
            if flush:
                torch.set_flush_denormal(False)

    def _forward(self, x, channels_last=False):
        # CPU inference: channels-last activations make oneDNN's 3x3 convolutions ~1.5x faster
        fmt = (lambda t: t.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda t: t)
        x = bicubic_upsample(x, self.upscale)
        match = x[:, :self.num_in_ch] if self.selection == 'knn' and self.knn_feature == 'input' else None
        out = self.stages[0](fmt(x))
        for block, stage in zip(self.n3_blocks, self.stages[1:]):
            out = stage(fmt(block(out, match=match)))
        return out.contiguous()
