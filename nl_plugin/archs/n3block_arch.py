"""Neural nearest neighbours (N3) blocks of N3Net (Plötz & Roth, NeurIPS 2018) and their baselines.

* :class:`N3Block` - the image block: learned embedding and temperature, continuous k-NN
  relaxation (eqs. 8-11) over a search window of patches, output ``[x, z_1 - x, ..., z_k - x]``.
  ``selection='hard'`` / ``'concrete'`` give the paper's ablations (hard k-NN on a fixed feature
  space, Concrete-distribution sampling); :class:`KNNBlock` and :class:`ConcreteN3Block` are the
  same with those defaults, registered for YAML use.
* :class:`N3SetBlock` - the set version for non-image data (items (B, N, C), MLP embedding), as in
  the paper's correspondence-classification experiment.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn as nn

from basicsr.utils.registry import ARCH_REGISTRY

from nl_plugin.ops import n3 as n3ops

from .arch_util import run_sequential

_SELECTIONS = ('continuous', 'hard', 'concrete')


def _embed_cnn(in_ch, feat, out_ch):
    """Official embedding / temperature CNN: conv-BN-ReLU, conv-BN-ReLU, conv (3x3 each)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, feat, 3, 1, 1, bias=False), nn.BatchNorm2d(feat), nn.ReLU(inplace=True),
        nn.Conv2d(feat, feat, 3, 1, 1, bias=False), nn.BatchNorm2d(feat), nn.ReLU(inplace=True),
        nn.Conv2d(feat, out_ch, 3, 1, 1, bias=True))


def _check_common(k, selection, temp_mode):
    if int(k) != k or k < 1:
        raise ValueError(f'k must be a positive integer, got {k}')
    if selection not in _SELECTIONS:
        raise ValueError(f'selection must be one of {_SELECTIONS}, got {selection!r}')
    if temp_mode not in ('mean', 'center'):
        raise ValueError(f"temp_mode must be 'mean' or 'center', got {temp_mode!r}")


def _weight_fn(selection, k, training):
    """Maps (logits[, scaled Gumbel noise]) -> (..., k, M) neighbour weights."""
    if selection == 'hard':
        return lambda logits: n3ops.hard_knn_weights(-logits, k)
    if selection == 'concrete' and training:
        return lambda logits, noise: n3ops.continuous_knn(logits, k, noise=noise)
    return lambda logits: n3ops.continuous_knn(logits, k)


@ARCH_REGISTRY.register()
class N3Block(nn.Module):
    """Neural nearest neighbours block on images (official denoising configuration by default).

    For every ``patch_size`` patch (at ``stride``) of the input ``x`` (B, C, H, W), the candidates
    are the other patches of its ``window_size x window_size`` patch neighbourhood (15 x 15 patches
    = an 80 x 80 pixel region; the window is clamped inside the image and the query excluded, 224
    candidates). Distances are squared Euclidean between flattened patches of the embedding
    ``E(x)``; logits ``BN(-d) / T`` with a per-patch temperature ``T = exp(mean_patch(logT(x)) +
    log 0.1)``; ``k`` weight vectors from the continuous k-NN relaxation; ``z_j`` = weighted average
    of candidate patches of ``x``, folded back with overlap averaging. Output
    ``cat([x, z_1 - x, ..., z_k - x])``: ``C * (k + 1)`` channels, neighbour-major.

    Sizes: images are zero-padded so that patches tile them (official rule, crop afterwards);
    images smaller than the search region use a window shrunk to the patch grid; if even that has
    fewer than ``k`` candidates (images under ~20 px), more padding is added. Time and memory are
    linear in the image area (tiled search, see :mod:`nl_plugin.ops.n3`).

    Args:
        num_in_ch (int): Channels ``C`` of the input (and of the neighbour volumes). Default: 8.
        k (int): Number of neighbours. Default: 7.
        patch_size (int): Patch side. Default: 10.
        stride (int): Patch stride. Default: 5.
        window_size (int): Search window side in patches (80 px = (15 - 1) * 5 + 10). Default: 15.
        embed_feat (int): Hidden channels of the embedding / temperature CNNs. Default: 64.
        embed_out_ch (int, optional): Embedding channels (default: ``num_in_ch``, official 8).
        temp_mode (str): Per-patch temperature from the log-temperature map: ``'mean'`` over the
            patch (official code) or ``'center'`` pixel (paper). Default: ``'mean'``.
        temp_offset (float): Added to the log-temperature (official: log 0.1). Default: log 0.1.
        knn_update (str): Where the temperature enters eqs. 8-11: ``'official'`` (logits
            ``BN(-d) / T``, ``log(1 - w)`` added to them) or ``'paper'`` (``softmax(alpha / T)``,
            ``log(1 - w)`` added to ``alpha``; exact hard k-NN limit as ``T -> 0``; see
            :func:`nl_plugin.ops.n3.continuous_knn`). Default: ``'official'``.
        selection (str): ``'continuous'`` (N3, eqs. 8-11), ``'hard'`` (hard k-NN on a fixed feature
            space: no embedding, no temperature, no distance BN; distances on the patches of the
            ``match`` tensor given to ``forward`` or of ``x``) or ``'concrete'`` (Concrete /
            Gumbel-softmax samples ``softmax(logits + G / T)`` with the same eq. 10 update while
            training; the deterministic relaxation in eval mode). Default: ``'continuous'``.
        diff (bool): Output ``z_j - x`` (official; ``False``: ``z_j``). Default: True.
        bn_eps (float): Epsilon of the distance BatchNorm1d. Default: 1e-5.
        impl (str): ``'auto'`` (tiled, linear in area) or ``'reference'`` (gathers all candidate
            patches; for tests). Default: ``'auto'``.
    """

    def __init__(self, num_in_ch=8, k=7, patch_size=10, stride=5, window_size=15, embed_feat=64, embed_out_ch=None,
                 temp_mode='mean', temp_offset=math.log(0.1), knn_update='official', selection='continuous', diff=True,
                 bn_eps=1e-5, impl='auto'):
        super().__init__()
        _check_common(k, selection, temp_mode)
        if patch_size < 1 or stride < 1 or stride > patch_size:
            raise ValueError(f'need 1 <= stride <= patch_size, got patch_size={patch_size}, stride={stride}')
        if window_size < 2:
            raise ValueError(f'window_size must be >= 2 patches, got {window_size}')
        if knn_update not in ('official', 'paper'):
            raise ValueError(f"knn_update must be 'official' or 'paper', got {knn_update!r}")
        if impl not in ('auto', 'reference'):
            raise ValueError(f"impl must be 'auto' or 'reference', got {impl!r}")
        self.num_in_ch, self.k, self.patch_size, self.stride = num_in_ch, int(k), patch_size, stride
        self.window_size, self.temp_mode, self.temp_offset = window_size, temp_mode, temp_offset
        self.selection, self.diff, self.impl, self.knn_update = selection, diff, impl, knn_update
        if selection == 'hard':
            self.embed = self.temp = self.dist_bn = None
        else:
            self.embed = _embed_cnn(num_in_ch, embed_feat, embed_out_ch or num_in_ch)
            self.temp = _embed_cnn(num_in_ch, embed_feat, 1)  # outputs a log-temperature map
            self.dist_bn = nn.BatchNorm1d(1, eps=bn_eps)  # one running mean/var for all distances

    @property
    def num_out_ch(self):
        return self.num_in_ch * (self.k + 1)

    def _padding(self, h, w):
        """Official padding, enlarged (by whole strides) while the window holds fewer than k candidates."""
        p, s, win = self.patch_size, self.stride, self.window_size
        left, right, top, bottom = n3ops.patch_grid_padding(h, w, p, s)
        while True:
            nh, nw = (h + top + bottom - p) // s + 1, (w + left + right - p) // s + 1
            if min(win, nh) * min(win, nw) - 1 >= self.k:
                return left, right, top, bottom
            if nh <= nw:
                top, bottom = top + s // 2, bottom + s - s // 2
            else:
                left, right = left + s // 2, right + s - s // 2

    def _weights(self, dist, temp, b):
        """Per-query inputs (B, L, ...) and the function mapping their chunks to (..., k, M) weights."""
        k = self.k
        if temp is None:  # hard k-NN on fixed features
            return (lambda d: n3ops.hard_knn_weights(d, k)), (dist,)
        alpha = self.dist_bn(-dist.reshape(b, 1, -1)).view_as(dist)  # BN over all distances
        sample = self.selection == 'concrete' and self.training
        if self.knn_update == 'official':
            inputs = (alpha / temp.unsqueeze(-1),)
            if sample:  # Concrete: softmax((alpha + G) / T)
                g = n3ops.gumbel_noise(dist.shape[:2] + (k, dist.shape[-1]), dist)
                return (lambda lg, nz: n3ops.continuous_knn(lg, k, noise=nz)), inputs + (g / temp[..., None, None],)
            return (lambda lg: n3ops.continuous_knn(lg, k)), inputs
        inputs = (alpha, temp.unsqueeze(-1))
        if sample:
            g = n3ops.gumbel_noise(dist.shape[:2] + (k, dist.shape[-1]), dist)
            return (lambda a, t, nz: n3ops.continuous_knn(a, k, noise=nz, temperature=t)), inputs + (g,)
        return (lambda a, t: n3ops.continuous_knn(a, k, temperature=t)), inputs

    def forward(self, x, match=None):
        """(B, C, H, W) -> (B, C * (k + 1), H, W).

        Args:
            x (Tensor): Block input (B, num_in_ch, H, W).
            match (Tensor, optional): (B, C', H, W) fixed feature space for ``selection='hard'``
                (e.g. the noisy input image); default ``x``. Ignored by the learned selections.
        """
        if x.dim() != 4 or x.shape[1] != self.num_in_ch:
            raise ValueError(f'{type(self).__name__} expects (B, {self.num_in_ch}, H, W) input, '
                             f'got shape {tuple(x.shape)}')
        b, c, h, w = x.shape
        p, s = self.patch_size, self.stride
        pad = self._padding(h, w)
        xp, _ = n3ops.pad_to_patch_grid(x, p, s, pad)
        hp, wp = xp.shape[-2:]
        nh, nw = n3ops.patch_grid_shape(hp, wp, p, s)
        values = n3ops.extract_patches(xp, p, s)  # (B, L, C*p*p)

        if self.selection == 'hard':
            feat = x if match is None else match
            if feat.dim() != 4 or feat.shape[0] != b or feat.shape[-2:] != x.shape[-2:]:
                raise ValueError(f'match tensor must be (B={b}, C\', {h}, {w}), got shape {tuple(feat.shape)}')
            emb = values if match is None else n3ops.extract_patches(F.pad(feat, pad), p, s)
            temp = None
        else:
            emb = n3ops.extract_patches(F.pad(run_sequential(self.embed, x), pad), p, s)
            log_temp = F.pad(run_sequential(self.temp, x), pad)
            temp = n3ops.patch_temperature(log_temp, p, s, self.temp_mode, self.temp_offset)

        if self.impl == 'reference':
            index = n3ops.candidate_index(nh, nw, self.window_size, device=x.device)
            dist = n3ops.patch_sqdist(emb, emb, index)
        else:
            plan = n3ops.make_tile_plan(nh, nw, self.window_size, device=x.device)
            dist = n3ops.tiled_patch_sqdist(emb, plan)  # (B, L, M)

        wfn, inputs = self._weights(dist, temp, b)
        count = n3ops.overlap_count((hp, wp), p, s, x.device, x.dtype)
        if self.impl == 'reference':
            z = n3ops.aggregate_patches(wfn(*inputs), values, index)  # (B, L, k, C*p*p)
            z = torch.stack([n3ops.fold_patches(z[:, :, j], (hp, wp), p, s, average=False)
                             for j in range(self.k)], 1)
        else:
            z = n3ops.tiled_aggregate_fold(inputs, values, plan, wfn, p, s, c)  # (B, k, C, H', W')
        left, _, top, _ = pad
        z = z[..., top:top + h, left:left + w]
        count = count[..., top:top + h, left:left + w]
        if not torch.is_grad_enabled():  # inference: write straight into the output, no temporaries
            out = x.new_empty(b, self.k + 1, c, h, w)
            out[:, 0] = x
            torch.div(z, count, out=out[:, 1:])
            if self.diff:
                out[:, 1:] -= x.unsqueeze(1)
            return out.view(b, c * (self.k + 1), h, w)
        z = z / count
        if self.diff:
            z = z - x.unsqueeze(1)
        return torch.cat([x.unsqueeze(1), z], 1).reshape(b, c * (self.k + 1), h, w)


@ARCH_REGISTRY.register()
class KNNBlock(N3Block):
    """Hard k-NN baseline block: :class:`N3Block` with ``selection='hard'`` (no learned parts).

    Matches patches in a fixed feature space (``match`` given to ``forward``, e.g. the noisy image,
    or the block input) and returns the k nearest patches as ``[x, z_1 - x, ..., z_k - x]``.
    Takes the same arguments as :class:`N3Block`.
    """

    def __init__(self, num_in_ch=8, k=7, patch_size=10, stride=5, window_size=15, diff=True, impl='auto', **kwargs):
        kwargs.pop('selection', None)
        super().__init__(num_in_ch=num_in_ch, k=k, patch_size=patch_size, stride=stride, window_size=window_size,
                         selection='hard', diff=diff, impl=impl, **kwargs)


@ARCH_REGISTRY.register()
class ConcreteN3Block(N3Block):
    """Stochastic baseline: :class:`N3Block` with ``selection='concrete'`` (Concrete distribution).

    Takes the same arguments as :class:`N3Block`.
    """

    def __init__(self, *args, **kwargs):
        kwargs['selection'] = 'concrete'
        super().__init__(*args, **kwargs)


@ARCH_REGISTRY.register()
class N3SetBlock(nn.Module):
    """N3 block for sets / non-image data (paper section 5.1, correspondence classification).

    Items ``x`` (B, N, C) are embedded by an MLP; neighbours of each item are searched among all
    other items or among the candidates given as an index tensor; weights from the continuous k-NN
    relaxation (or hard / Concrete), neighbours ``z_j`` are weighted averages of candidate items.

    Args:
        num_in_ch (int): Item feature size ``C``.
        k (int): Number of neighbours. Default: 7.
        embed_feat (int): Hidden width of the embedding / temperature MLPs. Default: 64.
        embed_out_ch (int, optional): Embedding size (default ``num_in_ch``).
        learn_temp (bool): Per-item temperature ``exp(MLP(x) + temp_offset)``; otherwise 1.
            Default: True.
        temp_offset (float): Added to the log-temperature. Default: 0.
        dist_bn (bool): BatchNorm1d (1 channel) on the negative distances. Default: True.
        selection (str): ``'continuous'``, ``'hard'`` (on the raw items, no learned parts) or
            ``'concrete'``. Default: ``'continuous'``.
        diff (bool): Output ``z_j - x`` instead of ``z_j``. Default: True.
        bn_eps (float): Distance BN epsilon. Default: 1e-5.
    """

    def __init__(self, num_in_ch, k=7, embed_feat=64, embed_out_ch=None, learn_temp=True, temp_offset=0.0,
                 dist_bn=True, selection='continuous', diff=True, bn_eps=1e-5):
        super().__init__()
        _check_common(k, selection, 'mean')
        self.num_in_ch, self.k, self.selection, self.diff = num_in_ch, int(k), selection, diff
        self.temp_offset = temp_offset

        def mlp(out):
            return nn.Sequential(nn.Linear(num_in_ch, embed_feat), nn.ReLU(inplace=True),
                                 nn.Linear(embed_feat, embed_feat), nn.ReLU(inplace=True), nn.Linear(embed_feat, out))

        learned = selection != 'hard'
        self.embed = mlp(embed_out_ch or num_in_ch) if learned else None
        self.temp = mlp(1) if learned and learn_temp else None
        self.dist_bn = nn.BatchNorm1d(1, eps=bn_eps) if learned and dist_bn else None

    def forward(self, x, index=None):
        """(B, N, C) -> (B, N, C * (k + 1)).

        Args:
            x (Tensor): Items (B, N, num_in_ch).
            index (LongTensor, optional): (N, M) or (B, N, M) candidate indices (each row must not
                contain the item itself unless that is intended); default: all other items.
        """
        if x.dim() != 3 or x.shape[2] != self.num_in_ch:
            raise ValueError(f'N3SetBlock expects (B, N, {self.num_in_ch}) items, got shape {tuple(x.shape)}')
        b, n, c = x.shape
        if index is None:
            index = n3ops.all_pairs_index(n, device=x.device)
        elif index.dim() not in (2, 3) or index.shape[-2] != n or (index.dim() == 3 and index.shape[0] != b):
            raise ValueError(f'index must be (N={n}, M) or (B={b}, N={n}, M), got shape {tuple(index.shape)}')
        if index.shape[-1] < self.k:
            raise ValueError(f'k={self.k} neighbours requested but index gives only {index.shape[-1]} candidates')
        emb = x if self.embed is None else self.embed(x)
        dist = n3ops.patch_sqdist(emb, emb, index)  # (B, N, M)
        logits = -dist
        if self.dist_bn is not None:
            logits = self.dist_bn(logits.reshape(b, 1, -1)).view_as(dist)
        inputs = (logits,)
        if self.temp is not None:
            t = torch.exp(self.temp(x) + self.temp_offset)  # (B, N, 1)
            logits = logits / t
            inputs = (logits,)
        if self.selection == 'concrete' and self.training:
            g = n3ops.gumbel_noise(logits.shape[:2] + (self.k, logits.shape[-1]), logits)
            inputs = (logits, g if self.temp is None else g / t.unsqueeze(-1))
        wts = _weight_fn(self.selection, self.k, self.training)(*inputs)  # (B, N, k, M)
        z = n3ops.aggregate_patches(wts, x, index)  # (B, N, k, C)
        if self.diff:
            z = z - x.unsqueeze(2)
        return torch.cat([x.unsqueeze(2), z], 2).reshape(b, n, c * (self.k + 1))
