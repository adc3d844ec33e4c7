"""Neural nearest neighbours (N3) blocks of N3Net (Plötz & Roth, NeurIPS 2018).

* :class:`N3Block` - the image block: learned embedding and temperature, continuous k-NN
  relaxation (eqs. 8-11) over a search region of patches, output ``[x, z_1 - x, ..., z_k - x]``.
  ``selection='knn'`` / ``'concrete'`` give the paper's ablations (hard k-NN on a fixed feature
  space, Concrete-distribution sampling).
* :class:`N3SetBlock` - the set version for non-image data (items (B, N, C), MLP embedding), as in
  the paper's correspondence-classification experiment.
"""
import difflib
import math
from functools import partial

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn as nn

from nl_plugin.ops import n3 as n3ops
from nl_plugin.ops.amp import accum_dtype, to_accum
from nl_plugin.utils import renamed_options

from .arch_util import run_sequential

_RENAMED_SELECTIONS = {'continuous': 'n3', 'hard': 'knn'}


def _embed_cnn(in_ch, feat, out_ch):
    """Official embedding / temperature CNN: conv-BN-ReLU, conv-BN-ReLU, conv (3x3 each)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, feat, 3, 1, 1, bias=False), nn.BatchNorm2d(feat), nn.ReLU(inplace=True),
        nn.Conv2d(feat, feat, 3, 1, 1, bias=False), nn.BatchNorm2d(feat), nn.ReLU(inplace=True),
        nn.Conv2d(feat, out_ch, 3, 1, 1, bias=True))


def _check_k_and_selection(owner, k, selection):
    if int(k) != k or k < 1:
        raise ValueError(f'{owner}: k must be a positive integer, got {k}')
    if selection in _RENAMED_SELECTIONS:
        raise ValueError(f'{owner}: selection {selection!r} is now called {_RENAMED_SELECTIONS[selection]!r}')
    if selection not in n3ops.SELECTIONS:
        close = difflib.get_close_matches(str(selection), n3ops.SELECTIONS, n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        raise ValueError(f'{owner}: selection must be one of {n3ops.SELECTIONS}, got {selection!r}{hint}')


@ARCH_REGISTRY.register()
@renamed_options(window_size='search_size')
class N3Block(nn.Module):
    """Neural nearest neighbours block on images (official denoising configuration by default).

    For every ``patch_size`` patch (at ``stride``) of the input ``x`` (B, C, H, W), the candidates
    are the other patches of its ``search_size x search_size`` patch neighbourhood (15 x 15 patches
    = an 80 x 80 pixel region; the region is clamped inside the image and the query excluded, 224
    candidates). Distances are squared Euclidean between flattened patches of the embedding
    ``E(x)``; logits ``BN(-d) / T`` with a per-patch temperature ``T = exp(mean_patch(logT(x)) +
    log 0.1)``; ``k`` weight vectors from the continuous k-NN relaxation; ``z_j`` = weighted average
    of candidate patches of ``x``, folded back with overlap averaging. Output
    ``cat([x, z_1 - x, ..., z_k - x])``: ``C * (k + 1)`` channels, neighbour-major.

    Sizes: images are zero-padded so that patches tile them (official rule, crop afterwards);
    images smaller than the search region use a region shrunk to the patch grid; if even that has
    fewer than ``k`` candidates (images under ~20 px), more padding is added. Time and memory are
    linear in the image area (tiled search, see :mod:`nl_plugin.ops.n3`).

    Under ``torch.autocast`` the embedding / temperature CNNs and the distance and aggregation products
    run in the autocast dtype; distances, their BN, temperatures, the k-NN relaxation's log-weights and
    the neighbour differences ``z_j - x`` are fp32, and so is the output.

    Args:
        num_in_ch (int): Channels ``C`` of the input (and of the neighbour volumes). Default: 8.
        k (int): Number of neighbours. Default: 7.
        patch_size (int): Patch side. Default: 10.
        stride (int): Patch stride. Default: 5.
        search_size (int): Search region side in patches (80 px = (15 - 1) * 5 + 10). Default: 15.
        embed_feat (int): Hidden channels of the embedding / temperature CNNs. Default: 64.
        embed_out_ch (int, optional): Embedding channels (default: ``num_in_ch``, official 8).
        temp_mode (str): Per-patch temperature from the log-temperature map: ``'mean'`` over the
            patch (official code) or ``'center'`` pixel (paper). Default: ``'mean'``.
        temp_offset (float): Added to the log-temperature (official: log 0.1). Default: log 0.1.
        knn_update (str): Where the temperature enters eqs. 8-11: ``'official'`` (logits
            ``BN(-d) / T``, ``log(1 - w)`` added to them) or ``'paper'`` (``softmax(alpha / T)``,
            ``log(1 - w)`` added to ``alpha``; exact hard k-NN limit as ``T -> 0``; see
            :func:`nl_plugin.ops.n3.continuous_knn`). Default: ``'official'``.
        selection (str): ``'n3'`` (continuous k-NN, eqs. 8-11), ``'knn'`` (hard k-NN on a fixed
            feature space: no embedding, no temperature, no distance BN; distances on the patches of
            the ``match`` tensor given to ``forward`` or of ``x``) or ``'concrete'`` (Concrete /
            Gumbel-softmax samples ``softmax(logits + G / T)`` with the same eq. 10 update while
            training; the deterministic relaxation in eval mode). Default: ``'n3'``.
        diff (bool): Output ``z_j - x`` (official; ``False``: ``z_j``). Default: True.
        bn_eps (float): Epsilon of the distance BatchNorm1d. Default: 1e-5.
        impl (str): ``'auto'`` (tiled, linear in area) or ``'reference'`` (gathers all candidate
            patches; for tests). Default: ``'auto'``.
    """

    def __init__(self, num_in_ch: int = 8, k: int = 7, patch_size: int = 10, stride: int = 5, search_size: int = 15,
                 embed_feat: int = 64, embed_out_ch: int | None = None, temp_mode: str = 'mean',
                 temp_offset: float = math.log(0.1), knn_update: str = 'official', selection: str = 'n3',
                 diff: bool = True, bn_eps: float = 1e-5, impl: str = 'auto') -> None:
        super().__init__()
        _check_k_and_selection(type(self).__name__, k, selection)
        if temp_mode not in ('mean', 'center'):
            raise ValueError(f"temp_mode must be 'mean' or 'center', got {temp_mode!r}")
        if patch_size < 1 or stride < 1 or stride > patch_size:
            raise ValueError(f'need 1 <= stride <= patch_size, got patch_size={patch_size}, stride={stride}')
        if search_size < 2:
            raise ValueError(f'search_size must be >= 2 patches, got {search_size}')
        if knn_update not in n3ops.KNN_UPDATES:
            raise ValueError(f'knn_update must be one of {n3ops.KNN_UPDATES}, got {knn_update!r}')
        if impl not in ('auto', 'reference'):
            raise ValueError(f"impl must be 'auto' or 'reference', got {impl!r}")
        self.num_in_ch, self.k, self.patch_size, self.stride = num_in_ch, int(k), patch_size, stride
        self.search_size, self.temp_mode, self.temp_offset = search_size, temp_mode, temp_offset
        self.selection, self.diff, self.impl, self.knn_update = selection, diff, impl, knn_update
        if selection == 'knn':
            self.embed = self.temp = self.dist_bn = None
        else:
            self.embed = _embed_cnn(num_in_ch, embed_feat, embed_out_ch or num_in_ch)
            self.temp = _embed_cnn(num_in_ch, embed_feat, 1)  # outputs a log-temperature map
            self.dist_bn = nn.BatchNorm1d(1, eps=bn_eps)  # one running mean/var for all distances

    @property
    def num_out_ch(self):
        return self.num_in_ch * (self.k + 1)

    def _padding(self, h, w):
        """Official padding, enlarged (by whole strides) while the search region holds fewer than k candidates."""
        p, s, search = self.patch_size, self.stride, self.search_size
        left, right, top, bottom = n3ops.patch_grid_padding(h, w, p, s)
        while True:
            nh, nw = (h + top + bottom - p) // s + 1, (w + left + right - p) // s + 1
            if min(search, nh) * min(search, nw) - 1 >= self.k:
                return left, right, top, bottom
            if nh <= nw:
                top, bottom = top + s // 2, bottom + s - s // 2
            else:
                left, right = left + s // 2, right + s - s // 2

    def _embedding(self, x, values, match, pad):
        """Embedding patches (B, L, D') and per-patch temperatures (B, L) (None for ``selection='knn'``)."""
        p, s = self.patch_size, self.stride
        if self.selection == 'knn':
            b, _, h, w = x.shape
            feat = x if match is None else match
            if feat.dim() != 4 or feat.shape[0] != b or feat.shape[-2:] != x.shape[-2:]:
                raise ValueError(f'match tensor must be (B={b}, C\', {h}, {w}), got shape {tuple(feat.shape)}')
            return (values if match is None else n3ops.extract_patches(F.pad(feat, pad), p, s)), None
        emb = n3ops.extract_patches(F.pad(run_sequential(self.embed, x), pad), p, s)
        log_temp = F.pad(run_sequential(self.temp, x), pad)
        return emb, n3ops.patch_temperature(log_temp, p, s, self.temp_mode, self.temp_offset)

    def _selection_inputs(self, dist, temp):
        """Per-query inputs (B, L, ...) of :func:`nl_plugin.ops.n3.neighbour_weights`."""
        if temp is None:  # hard k-NN on fixed features: no distance BN, no temperature
            return n3ops.selection_inputs(dist.neg_(), self.k)  # in place: no other use of dist, no extra buffer
        alpha = self.dist_bn(-dist.reshape(dist.shape[0], 1, -1)).view_as(dist)  # BN over all distances
        sample = self.selection == 'concrete' and self.training
        return n3ops.selection_inputs(alpha, self.k, temp.unsqueeze(-1), self.knn_update, sample)

    def forward(self, x: torch.Tensor, match: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, C * (k + 1), H, W).

        Args:
            x (Tensor): Block input (B, num_in_ch, H, W).
            match (Tensor, optional): (B, C', H, W) fixed feature space for ``selection='knn'``
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
        emb, temp = self._embedding(x, values, match, pad)

        if self.impl == 'reference':
            index = n3ops.candidate_index(nh, nw, self.search_size, device=x.device)
            dist = n3ops.patch_sqdist(emb, emb, index)
        else:
            plan = n3ops.make_tile_plan(nh, nw, self.search_size, device=x.device)
            dist = n3ops.tiled_patch_sqdist(emb, plan)  # (B, L, M)

        inputs = self._selection_inputs(dist, temp)
        wfn = partial(n3ops.neighbour_weights, k=self.k, selection=self.selection)
        count = n3ops.overlap_count((hp, wp), p, s, x.device, accum_dtype(x))
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
            out = x.new_empty(b, self.k + 1, c, h, w, dtype=z.dtype)  # z - x formed in fp32 under autocast
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
class N3SetBlock(nn.Module):
    """N3 block for sets / non-image data (paper section 5.1, correspondence classification).

    Items ``x`` (B, N, C) are embedded by an MLP; neighbours of each item are searched among all
    other items or among the candidates given as an index tensor; weights from the continuous k-NN
    relaxation (or hard k-NN / Concrete), neighbours ``z_j`` are weighted averages of candidate items.

    Args:
        num_in_ch (int): Item feature size ``C``.
        k (int): Number of neighbours. Default: 7.
        embed_feat (int): Hidden width of the embedding / temperature MLPs. Default: 64.
        embed_out_ch (int, optional): Embedding size (default ``num_in_ch``).
        learn_temp (bool): Per-item temperature ``exp(MLP(x) + temp_offset)``; otherwise 1.
            Default: True.
        temp_offset (float): Added to the log-temperature. Default: 0.
        dist_bn (bool): BatchNorm1d (1 channel) on the negative distances. Default: True.
        selection (str): ``'n3'`` (continuous k-NN), ``'knn'`` (hard k-NN on the raw items, no learned
            parts) or ``'concrete'`` (Concrete samples while training). Default: ``'n3'``.
        diff (bool): Output ``z_j - x`` instead of ``z_j``. Default: True.
        bn_eps (float): Distance BN epsilon. Default: 1e-5.
    """

    def __init__(self, num_in_ch: int, k: int = 7, embed_feat: int = 64, embed_out_ch: int | None = None,
                 learn_temp: bool = True, temp_offset: float = 0.0, dist_bn: bool = True, selection: str = 'n3',
                 diff: bool = True, bn_eps: float = 1e-5) -> None:
        super().__init__()
        _check_k_and_selection(type(self).__name__, k, selection)
        self.num_in_ch, self.k, self.selection, self.diff = num_in_ch, int(k), selection, diff
        self.temp_offset = temp_offset

        def mlp(out):
            return nn.Sequential(nn.Linear(num_in_ch, embed_feat), nn.ReLU(inplace=True),
                                 nn.Linear(embed_feat, embed_feat), nn.ReLU(inplace=True), nn.Linear(embed_feat, out))

        learned = selection != 'knn'
        self.embed = mlp(embed_out_ch or num_in_ch) if learned else None
        self.temp = mlp(1) if learned and learn_temp else None
        self.dist_bn = nn.BatchNorm1d(1, eps=bn_eps) if learned and dist_bn else None

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
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
        alpha = -dist
        if self.dist_bn is not None:
            alpha = self.dist_bn(alpha.reshape(b, 1, -1)).view_as(dist)
        temp = None if self.temp is None else torch.exp(to_accum(self.temp(x)) + self.temp_offset)  # (B, N, 1)
        sample = self.selection == 'concrete' and self.training
        inputs = n3ops.selection_inputs(alpha, self.k, temp, 'official', sample)  # logits alpha / T
        wts = n3ops.neighbour_weights(*inputs, k=self.k, selection=self.selection)  # (B, N, k, M)
        z = n3ops.aggregate_patches(wts, x, index)  # (B, N, k, C)
        if self.diff:
            z = z - x.unsqueeze(2)
        return torch.cat([x.unsqueeze(2), z], 2).reshape(b, n, c * (self.k + 1))
