"""What the non-local modules attend to: NLRN's attention of chosen pixels per step, N3's neighbour weights.

Only the chosen queries are computed: for an NLRN pixel, its q x q window of keys (or the whole image in
the global scope) at each step, from the embeddings of that step's non-local input, which forward hooks
on the step's first BatchNorm capture while the network runs on the whole image (no N x N map is ever
formed, so the window scope works at full image size). For an N3 block, the k weight vectors of one
query patch over its candidate patches, from the block input captured by a forward pre-hook.
"""
import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from nl_plugin.archs.arch_util import run_sequential
from nl_plugin.ops import n3 as n3ops
from nl_plugin.ops.nlrn_attention.common import border_rule


@dataclass
class PixelAttention:
    """Attention weights of one query pixel at every non-local step of NLRN.

    Attributes:
        pixel: (y, x) of the query.
        rows, cols: Image rows / columns of its keys (the window, clipped at the border or wrapped round).
        steps: Recurrent steps (0-based) that have a non-local module.
        weights: (S, len(rows), len(cols)) attention the network uses (with correlation propagation: the
            softmax of the summed correlations of all steps so far, NLRN eq. 6).
        step_weights: (S, ...) the normalised correlation of each step alone (what attention would be
            without propagation, with the same embeddings); None when the network does not propagate.
    """
    pixel: Tuple[int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    steps: List[int]
    weights: torch.Tensor
    step_weights: Optional[torch.Tensor] = None

    def full_map(self, which='weights', size=None):
        """(S, H, W) maps in image coordinates: zero outside the keys."""
        w = getattr(self, which)
        h, wd = size
        out = w.new_zeros(w.shape[0], h, wd)
        out[:, self.rows[:, None], self.cols[None, :]] = w
        return out


def key_positions(center, size, window_size, border):
    """Key rows (or columns) of the window around ``center`` on an axis of ``size`` pixels (sorted, unique).

    Window 0 (global scope): the whole axis. Else the window's keys by ``Border.key`` (each once):
    ``'exclude'``: the window clipped at the border; ``'circular'``: wrapped round.
    """
    if not window_size:
        return torch.arange(size)
    r = window_size // 2
    idx, valid = border_rule(border).key(torch.arange(-r, r + 1) + center, size)
    return torch.unique(idx[valid])


def _normalize(logits, normalization):
    flat = logits.reshape(logits.shape[0], -1)
    if normalization == 'softmax':
        return torch.softmax(flat, -1).view_as(logits)
    return (flat / flat.shape[-1]).view_as(logits)      # 'count': L / N (dot-product variants)


@contextlib.contextmanager
def _whole_image(net):
    """Run NLRN on the whole image: its band-streamed window inference calls the step modules on row bands."""
    saved = net.stream_inference
    net.stream_inference = False
    try:
        yield
    finally:
        net.stream_inference = saved


def _block_of_step(net, t):
    """The non-local module NLRN applies at step ``t`` (shared, or one per non-local step)."""
    blocks = net.nonlocal_blocks
    return blocks[0] if len(blocks) == 1 else blocks[net.nl_steps.index(t)]


def _correlations(blk, z, pixels, keys):
    """Correlation q(i) . k(j) of each query pixel i with its keys j: a list of (len(rows), len(cols))."""
    z = z.permute(0, 2, 3, 1)
    out = []
    for (y, xx), (rows, cols) in zip(pixels, keys):
        q = blk.embed(z[:, y:y + 1, xx:xx + 1], key_value=False)[0].reshape(-1)
        k = blk.embed(z[:, rows][:, :, cols], query=False)[0][0]
        out.append((k @ q.to(k.dtype)).float().cpu())
    return out


def _check_pixels(pixels, h, w):
    for y, xx in pixels:
        if not (0 <= y < h and 0 <= xx < w):
            raise ValueError(f'pixel (y={y}, x={xx}) is outside the {h}x{w} image')


def _keys(blk, pixels, h, w):
    # only the window scope has a window; the other scope attends over the whole tensor
    win = blk.window_size if blk.nl_scope == 'window' else 0
    return [(key_positions(y, h, win, blk.border), key_positions(xx, w, win, blk.border)) for y, xx in pixels]


@torch.no_grad()
def block_attention(block, z, pixels):
    """Attention of chosen pixels in one call of a WindowedNonLocalBlock (e.g. one inserted into a network).

    Args:
        block (WindowedNonLocalBlock): The block.
        z (Tensor): (1, C, H, W) its input (see :func:`capture_input`).
        pixels (list[tuple[int, int]]): (y, x) in the block input's coordinates.

    Returns:
        list[PixelAttention]: One per pixel, with one step.
    """
    h, w = z.shape[-2:]
    _check_pixels(pixels, h, w)
    keys = _keys(block, pixels, h, w)
    return [PixelAttention(p, rows, cols, [0], _normalize(corr[None], block.normalization))
            for p, (rows, cols), corr in zip(pixels, keys, _correlations(block, z[:1], pixels, keys))]


@torch.no_grad()
def nlrn_attention(net, x, pixels):
    """Attention of chosen pixels at every non-local step of an NLRN (eval mode), without N x N maps.

    Args:
        net (NLRN): The network (any scope, correlation, sharing or propagation setting).
        x (Tensor): (1, C, H, W) input image.
        pixels (list[tuple[int, int]]): (y, x) query pixels.

    Returns:
        list[PixelAttention]: One per pixel, in order.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f'nlrn_attention takes one image (1, C, H, W), got {tuple(x.shape)}')
    h, w = x.shape[-2:]
    _check_pixels(pixels, h, w)
    blk0 = net.nonlocal_blocks[0]
    keys = _keys(blk0, pixels, h, w)
    per_step = [[] for _ in pixels]     # this step's correlation of each pixel with its keys

    def capture(t):
        def hook(module, args, out):
            if out.shape[-2:] != (h, w):
                raise RuntimeError('NLRN ran its steps on parts of the image; attention capture needs whole maps')
            for i, corr in enumerate(_correlations(_block_of_step(net, t), F.relu(out), pixels, keys)):
                per_step[i].append(corr)
        return hook

    handles = [net.bns[t][0].register_forward_hook(capture(t)) for t in net.nl_steps]
    was_training = net.training
    net.eval()
    try:
        with _whole_image(net):
            net(x)
    finally:
        net.train(was_training)
        for hd in handles:
            hd.remove()
    results = []
    for (y, xx), (rows, cols), corr in zip(pixels, keys, per_step):
        corr = torch.stack(corr)                    # (S, len(rows), len(cols))
        norm = blk0.normalization
        if net.propagate_correlation:
            weights, alone = _normalize(corr.cumsum(0), norm), _normalize(corr, norm)
        else:
            weights, alone = _normalize(corr, norm), None
        results.append(PixelAttention((y, xx), rows, cols, list(net.nl_steps), weights, alone))
    return results


@dataclass
class PatchNeighbours:
    """The k neighbour weight vectors of one N3 query patch, and the block's temperatures.

    Attributes:
        pixel: (y, x) the query was chosen for (the patch whose centre is nearest to it).
        query: Index of the query patch in the row-major patch grid.
        weights: (k, M) weights of the neighbours over the M candidates (each row sums to one).
        candidates: (M,) grid indices of the candidate patches.
        grid: (nh, nw) patch grid; ``pad``: (left, right, top, bottom) zero padding of the block input.
        patch_size, stride: Patch geometry of the block.
        temperature: (nh, nw) per-patch temperatures T, or None for hard k-NN.
    """
    pixel: Tuple[int, int]
    query: int
    weights: torch.Tensor
    candidates: torch.Tensor
    grid: Tuple[int, int]
    pad: Tuple[int, int, int, int]
    patch_size: int
    stride: int
    temperature: Optional[torch.Tensor] = field(default=None, repr=False)

    def patch_box(self, index):
        """(top, left) of a grid patch in the block input's image coordinates (negative inside the padding)."""
        r, c = divmod(int(index), self.grid[1])
        return r * self.stride - self.pad[2], c * self.stride - self.pad[0]

    def weight_maps(self):
        """(k, H', W') maps on the padded input: each candidate's weight spread evenly over its patch.

        Each map sums to one (the padded canvas holds every patch; crop ``pad`` for the image part).
        """
        nh, nw = self.grid
        p, s = self.patch_size, self.stride
        onehot = self.weights.new_zeros(self.weights.shape[0], nh * nw)
        onehot[:, self.candidates] = self.weights
        # one value per patch, spread over its p x p pixels: fold of constant patches
        patches = onehot[:, :, None].expand(-1, -1, p * p) / (p * p)
        size = ((nh - 1) * s + p, (nw - 1) * s + p)
        return F.fold(patches.transpose(1, 2), size, p, stride=s)[:, 0]


def _patch_centre(index, grid, pad, p, s):
    r, c = divmod(int(index), grid[1])
    return r * s - pad[2] + (p - 1) / 2, c * s - pad[0] + (p - 1) / 2


def _query_patch(pixel, grid, pad, p, s):
    """Grid index of the patch whose centre is nearest to an image pixel."""
    rows = torch.arange(grid[0]) * s - pad[2] + (p - 1) / 2
    cols = torch.arange(grid[1]) * s - pad[0] + (p - 1) / 2
    return int((rows - pixel[0]).abs().argmin()) * grid[1] + int((cols - pixel[1]).abs().argmin())


@torch.no_grad()
def n3_neighbours(block, x, pixels=(), match=None, patches=None):
    """Neighbour weights of the query patches at chosen pixels of an N3Block input (eval mode).

    Args:
        block (N3Block): The block.
        x (Tensor): (B, C, H, W) its input (only the first image is used).
        pixels (list[tuple[int, int]]): (y, x) in the block input's coordinates.
        match (Tensor, optional): The fixed feature space of the hard k-NN selection.
        patches (list[int], optional): Query patches given by grid index instead of ``pixels``.

    Returns:
        list[PatchNeighbours]: One per pixel.
    """
    was_training = block.training
    block.eval()
    try:
        x = x[:1]
        h, w = x.shape[-2:]
        p, s = block.patch_size, block.stride
        pad = block._padding(h, w)
        xp, _ = n3ops.pad_to_patch_grid(x, p, s, pad)
        grid = n3ops.patch_grid_shape(xp.shape[-2], xp.shape[-1], p, s)
        temp = None
        if block.embed is None:     # hard k-NN on a fixed feature space: no embedding, no temperature
            src = x if match is None else match[:1]
            emb = n3ops.extract_patches(F.pad(src, pad), p, s)
        else:
            emb = n3ops.extract_patches(F.pad(run_sequential(block.embed, x), pad), p, s)
            temp = n3ops.patch_temperature(F.pad(run_sequential(block.temp, x), pad), p, s, block.temp_mode,
                                           block.temp_offset)
        index = n3ops.candidate_index(grid[0], grid[1], block.search_size, device=x.device)
        _check_pixels(pixels, h, w)
        queries = [(px, _query_patch(px, grid, pad, p, s)) for px in pixels]
        if patches is not None:
            queries = [(tuple(float(c) for c in _patch_centre(q, grid, pad, p, s)), int(q)) for q in patches]
        out = []
        for pixel, q in queries:
            dist = n3ops.patch_sqdist(emb[:, q:q + 1], emb, index[q:q + 1])      # (1, 1, M)
            inputs = block._selection_inputs(dist, None if temp is None else temp[:, q:q + 1])
            weights = n3ops.neighbour_weights(*inputs, k=block.k, selection=block.selection)[0, 0]  # (k, M)
            out.append(PatchNeighbours(tuple(pixel), q, weights.float().cpu(), index[q].cpu(), grid, pad, p, s,
                                       None if temp is None else temp[0].view(grid).float().cpu()))
        return out
    finally:
        block.train(was_training)


def capture_input(net, module, x):
    """Run ``net(x)`` (eval mode, no autograd): the first input ``module`` received and its ``match`` keyword."""
    seen = []

    def hook(m, args, kwargs):
        if not seen:
            seen.append((args[0], kwargs.get('match')))
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(x)
    finally:
        net.train(was_training)
        handle.remove()
    if not seen:
        raise RuntimeError(f'{type(module).__name__} did not run in the forward of {type(net).__name__}')
    return seen[0]




def network_attention(net, x, pixels, block=0):
    """Attention of chosen pixels in any network of this project: NLRN, or its ``block``-th N3Block or
    WindowedNonLocalBlock (N3Net, NonLocalInjection, ...).

    Pixels are in the input's coordinates and are scaled to the block input's size when that differs.

    Returns:
        tuple[str, list, Tensor]: ``'nlrn'``, ``'n3'`` or ``'block'``; the results; the input the block saw.
    """
    from nl_plugin.archs.n3block_arch import N3Block
    from nl_plugin.archs.windowed_nonlocal_arch import WindowedNonLocalBlock
    if hasattr(net, 'nonlocal_blocks') and hasattr(net, 'bns'):
        return 'nlrn', nlrn_attention(net, x, pixels), x
    blocks = [m for m in net.modules() if isinstance(m, (N3Block, WindowedNonLocalBlock))]
    if not blocks:
        raise ValueError(f'{type(net).__name__} has no N3Block or WindowedNonLocalBlock to look into')
    if not 0 <= block < len(blocks):
        raise ValueError(f'block {block}: {type(net).__name__} has {len(blocks)} non-local blocks '
                         f'(0..{len(blocks) - 1})')
    mod = blocks[block]
    z, match = capture_input(net, mod, x)
    sy, sx = z.shape[-2] / x.shape[-2], z.shape[-1] / x.shape[-1]
    scaled = [(min(int(y * sy), z.shape[-2] - 1), min(int(xx * sx), z.shape[-1] - 1)) for y, xx in pixels]
    if isinstance(mod, N3Block):
        return 'n3', n3_neighbours(mod, z, scaled, match=match), z
    return 'block', block_attention(mod, z, scaled), z


__all__ = ['PixelAttention', 'PatchNeighbours', 'nlrn_attention', 'block_attention', 'n3_neighbours',
           'capture_input', 'key_positions', 'network_attention']
