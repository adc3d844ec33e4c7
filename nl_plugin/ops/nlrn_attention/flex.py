"""FlexAttention kernel of window attention (CUDA): the q x q window as a block mask, propagation as embeddings.

Token order: FlexAttention works on a sequence in blocks of 128 queries x 128 keys and skips a block pair
when its block mask says no query of the one sees a key of the other. Pixels are ordered by 8 x 16 tiles
(one tile = one block, the image zero-padded to whole tiles), so the q = 45 window of a tile touches at
most 8 x 5 key tiles (5120 keys for 2025 in each window); in row-major order a block would be 128 pixels
of one row and its windows would touch 45 x 3 key blocks. ``mask_mod`` gives the exact window inside
the block pairs that the window only partly covers (and leaves padded pixels out); pairs wholly inside
every window are 'full' blocks that skip it.

Correlation propagation (NLRN eq. 6) is exact through the concatenated embeddings of the steps so far,
L_t = [q_1..q_t] . [k_1..k_t]^T, carried in token order (``Layout.TOKENS``): 2 D t floats a pixel,
linear in the image. Carried logits read as a bias in ``score_mod`` would need them as a tensor: dense
(B, N, N) is out of reach at full size, the compact window layout takes q^2 floats a pixel (2025 at
q = 45, more than the 1536 of 12 steps' embeddings), and the kernel does not return its logits to
update them. Without autograd the embeddings go into buffers with room for ``CARRY_STEPS`` steps, so a
step writes only its own: a concatenation would hold the previous state (still referenced by the
caller) and its copy at once.

Under autocast q, k and v arrive in the autocast dtype (``api.py`` casts them once) and so do the carried
embeddings; the kernel accumulates the scores, hence the sum over the steps, and the softmax statistics in
fp32, as the precision rule of ``common.py`` asks.
"""
import logging
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .common import border_rule, requires_grad, window_geometry
from .halo import halo_attention
from .halo_inference import strips_attention
from .state import CorrelationState, Layout

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention: the router never picks this kernel
    BlockMask = flex_attention = None

logger = logging.getLogger('nl_plugin')

TILE_H, TILE_W = 8, 16          # pixels of one token block (rows, columns)
BLOCK = TILE_H * TILE_W         # FlexAttention's default sparse block size
# Steps of embeddings a no-grad carry buffer holds before it grows (NLRN's T = 12).
CARRY_STEPS = 12
# Triton's tl.dot needs embedding widths of at least 16; narrower ones are zero-padded (no change to q.k).
MIN_WIDTH = 16
# Widths are padded to powers of two (Triton rounds them so anyway), so NLRN's 12 steps make 5 kernels,
# one compiled graph each; dynamo's default of 8 graphs per function would fall back to the eager
# kernel, which materialises the (N, N) scores.
RECOMPILE_LIMIT = 64


def available() -> bool:
    """Whether this torch has FlexAttention."""
    return flex_attention is not None


class TokenGrid(NamedTuple):
    """An h x w image as ``nty`` x ``ntx`` tiles of TILE_H x TILE_W tokens."""
    h: int
    w: int
    nty: int
    ntx: int

    @property
    def tokens(self) -> int:
        return self.nty * self.ntx * BLOCK


def token_grid(h: int, w: int) -> TokenGrid:
    return TokenGrid(h, w, -(-h // TILE_H), -(-w // TILE_W))


def to_tokens(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """(B, H, W, C) channels-last -> (B, 1, T, C) in tile order, zero-padded to whole tiles."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, grid.ntx * TILE_W - w, 0, grid.nty * TILE_H - h))
    return x.view(b, grid.nty, TILE_H, grid.ntx, TILE_W, c).transpose(2, 3).reshape(b, 1, grid.tokens, c)


def from_tokens(t: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """(B, 1, T, C) in tile order -> (B, H, W, C)."""
    b, c = t.shape[0], t.shape[-1]
    x = t.reshape(b, grid.nty, grid.ntx, TILE_H, TILE_W, c).transpose(2, 3)
    return x.reshape(b, grid.nty * TILE_H, grid.ntx * TILE_W, c)[:, :grid.h, :grid.w]


def window_mask_mod(grid: TokenGrid, window_size: int, border: str, device: torch.device):
    """``mask_mod(b, head, q_idx, kv_idx)``: both tokens are image pixels and kv is in q's window.

    The geometry is captured as tensors, not Python ints: a compiled kernel then serves every image size.
    """
    h, w, ntx, r = (torch.tensor(n, device=device) for n in (grid.h, grid.w, grid.ntx, window_size // 2))
    rule = border_rule(border)

    def position(i):
        tile, within = i // BLOCK, i % BLOCK
        return (tile // ntx) * TILE_H + within // TILE_W, (tile % ntx) * TILE_W + within % TILE_W

    def near(a, b, n):
        return rule.distance(a, b, n) <= r

    def mask_mod(b, head, q_idx, kv_idx):
        yq, xq = position(q_idx)
        yk, xk = position(kv_idx)
        return (yq < h) & (xq < w) & (yk < h) & (xk < w) & near(yq, yk, h) & near(xq, xk, w)
    return mask_mod


def _axis_blocks(n, tile, r, rule, device):
    """Tiles of one axis: (any, all) of 'both positions in the image and within r' for each tile pair."""
    nt = -(-n // tile)
    pos = torch.arange(nt * tile, device=device)
    inside = pos < n
    near = ((rule.distance(pos[:, None], pos[None, :], n) <= r) & inside[:, None] & inside[None, :])
    near = near.view(nt, tile, nt, tile)
    return near.any(3).any(1), near.all(3).all(1)


def _first(sel, values):
    """Per row: how many of ``sel`` hold, and ``values`` with those entries first (in their order)."""
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)
    return sel.sum(1).to(torch.int32), values.gather(1, order).to(torch.int32)


@torch.compiler.disable      # built eagerly and cached, also when a compiled network calls it
@lru_cache(maxsize=8)
def window_block_mask(h: int, w: int, window_size: int, border: str, device: torch.device) -> 'BlockMask':
    """Block mask of the q x q window on an h x w image in tile order, built from the window's geometry.

    A tile pair is partial when some pixel pair of it is in the window, full when all are (then
    ``mask_mod`` is skipped). The window is symmetric (j in the window of i iff i in that of j), so the
    query-side lists the backward pass reads are the key-side lists. Rows and columns are separable:
    the pair's test is the AND of a row-tile test and a column-tile test, so the lists come from two
    small per-axis tables (no (N, N) or (tiles, tiles) table).
    """
    grid, r, rule = token_grid(h, w), window_size // 2, border_rule(border)
    rows_any, rows_all = _axis_blocks(h, TILE_H, r, rule, device)
    cols_any, cols_all = _axis_blocks(w, TILE_W, r, rule, device)
    ar_y, ar_x = torch.arange(grid.nty, device=device), torch.arange(grid.ntx, device=device)
    ny, ry = _first(rows_any, ar_y.expand(grid.nty, -1))            # key tile rows of each query tile row
    nx, rx = _first(cols_any, ar_x.expand(grid.ntx, -1))
    ry, rx = ry[:, :int(ny.max())].long(), rx[:, :int(nx.max())].long()
    vy = torch.arange(ry.shape[1], device=device) < ny[:, None]
    vx = torch.arange(rx.shape[1], device=device) < nx[:, None]
    fy, fx = rows_all.gather(1, ry) & vy, cols_all.gather(1, rx) & vx
    n_q = grid.nty * grid.ntx

    def pairs(a, b):          # (nty, Ry) x (ntx, Rx) -> (query tiles, Ry * Rx)
        return (a[:, None, :, None] * b[None, :, None, :]).reshape(n_q, -1)
    index = pairs(ry, torch.ones_like(rx)) * grid.ntx + pairs(torch.ones_like(ry), rx)
    valid, full = pairs(vy, vx), pairs(fy, fx)
    num, idx = _first(valid & ~full, index)
    full_num, full_idx = _first(full, index)
    num, idx, full_num, full_idx = (t[None, None] for t in (num, idx, full_num, full_idx))
    n = grid.tokens
    return BlockMask(seq_lengths=(n, n), kv_num_blocks=num, kv_indices=idx, full_kv_num_blocks=full_num,
                     full_kv_indices=full_idx, q_num_blocks=num, q_indices=idx, full_q_num_blocks=full_num,
                     full_q_indices=full_idx, BLOCK_SIZE=(BLOCK, BLOCK),
                     mask_mod=window_mask_mod(grid, window_size, border, device))


_compiled = None


def _kernel(device: torch.device):
    """``flex_attention``, compiled once for CUDA; eager elsewhere (it then materialises the scores:
    enough for tests on small images) and inside a compiled network (which compiles it itself)."""
    global _compiled
    if torch.compiler.is_compiling():
        return flex_attention
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    if device.type != 'cuda':
        return flex_attention
    if _compiled is None:
        _compiled = torch.compile(flex_attention)
    return _compiled


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: 'BlockMask') -> torch.Tensor:
    """(B, 1, T, E) x2, (B, 1, T, C) -> (B, 1, T, C): softmax over the window, scale 1 (NLRN eq. 3-4)."""
    return _kernel(q.device)(q, k, v, block_mask=block_mask, scale=1.0)


def kernel_width(used: int, cap: Optional[int] = None) -> int:
    """Embedding width the kernel reads: ``used`` rounded up to a power of two >= MIN_WIDTH (at most ``cap``)."""
    width = max(MIN_WIDTH, 1 << (used - 1).bit_length())
    return width if cap is None else min(width, cap)


def _carry(prev: Optional[torch.Tensor], new: torch.Tensor, grow: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenated embeddings (B, 1, T, used) of the steps so far and the zero-padded (B, 1, T, width)
    tensor the kernel reads. With ``grow`` (no autograd), ``new`` is written into the buffer behind
    ``prev`` when ``prev`` is its filled part (else a buffer for CARRY_STEPS more steps is made)."""
    used = new.shape[-1] + (0 if prev is None else prev.shape[-1])
    if not grow:
        cat = new if prev is None else torch.cat([prev, new], -1)
        return cat, F.pad(cat, (0, kernel_width(used) - used))
    buf = None if prev is None else prev._base
    fits = buf is not None and getattr(buf, '_nl_filled', None) == prev.shape[-1] and buf.shape[-1] >= used
    if not fits:     # first step, a full buffer, or a state extended twice (the buffer's tail is taken)
        cap = max(used + new.shape[-1] * (CARRY_STEPS - 1), MIN_WIDTH)
        buf = new.new_zeros(*new.shape[:-1], cap)
        if prev is not None:
            buf[..., :prev.shape[-1]] = prev
    buf[..., used - new.shape[-1]:used] = new
    buf._nl_filled = used
    return buf[..., :used], buf[..., :kernel_width(used, buf.shape[-1])]


_FAILED = set()


def _run(q_in, k_in, v, used, grid, window_size, border):
    """The kernel on token-order embeddings; if it fails to compile for this width and dtype (Triton's limits
    on wide embeddings are not known in advance), the halo kernels on image-order embeddings (same result)."""
    c = v.shape[-1]
    v_in = to_tokens(v, grid)
    v_in = F.pad(v_in, (0, max(MIN_WIDTH - c, 0)))
    key = (q_in.device.type, q_in.dtype, q_in.shape[-1], v_in.shape[-1], torch.is_grad_enabled())
    if key not in _FAILED:
        block_mask = window_block_mask(grid.h, grid.w, window_size, border, q_in.device)
        try:
            return from_tokens(_attend(q_in, k_in, v_in, block_mask)[..., :c], grid)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:      # noqa: BLE001  (compiler errors have no common base class)
            if torch.compiler.is_compiling():
                raise
            _FAILED.add(key)
            logger.warning('nlrn attention: FlexAttention failed for %s; the halo kernel runs instead. %s: %s',
                           key, type(err).__name__, str(err).splitlines()[0] if str(err) else '')
    qi, ki = from_tokens(q_in[..., :used], grid), from_tokens(k_in[..., :used], grid)
    geo = window_geometry(grid.h, grid.w, window_size, border)
    if requires_grad(qi, ki, v):
        return halo_attention(qi, ki, v, geo, 'softmax')
    return strips_attention(qi, ki, v, geo, 'softmax')


def flex_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[CorrelationState],
              window_size: int, border: str, propagate: bool) -> Tuple[torch.Tensor, Optional[CorrelationState]]:
    """One softmax window-attention step with correlation propagation on validated arguments.

    Args:
        q, k (Tensor): (B, H, W, D) embeddings of this step. v (Tensor): (B, H, W, C).
        state (CorrelationState | None): Carried embeddings, ``Layout.TOKENS`` (or ``Layout.EMBEDDINGS``).
        window_size (int): Odd window side. border (str): 'exclude' or 'circular'.
        propagate (bool): Return the state for the next step (``Layout.TOKENS``).

    Returns:
        tuple[Tensor, CorrelationState | None]: out (B, H, W, C) and the state.
    """
    window_geometry(q.shape[1], q.shape[2], window_size, border)      # the border's size check
    grid = token_grid(q.shape[1], q.shape[2])
    prev_q = prev_k = None
    if state is not None:
        prev_q, prev_k = state.q, state.k
        if state.layout is Layout.EMBEDDINGS:
            prev_q, prev_k = to_tokens(prev_q, grid), to_tokens(prev_k, grid)
        elif state.layout is not Layout.TOKENS:
            raise ValueError(f'the FlexAttention kernel carries embeddings, not {state.layout.value} logits')
    # In-place carry buffers only in eager inference: autograd and a compiled graph get plain concatenations.
    grow = propagate and not requires_grad(q, k, v, prev_q, prev_k) and not torch.compiler.is_compiling()
    q_carry, q_in = _carry(prev_q, to_tokens(q, grid), grow)
    k_carry, k_in = _carry(prev_k, to_tokens(k, grid), grow)
    out = _run(q_in, k_in, v, q_carry.shape[-1], grid, window_size, border)
    return out, (CorrelationState(q=q_carry, k=k_carry, layout=Layout.TOKENS) if propagate else None)


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                          border: str) -> torch.Tensor:
    """Softmax window attention without carried correlation: (B, H, W, C)."""
    return flex_step(q, k, v, None, window_size, border, propagate=False)[0]


__all__ = ['available', 'TokenGrid', 'token_grid', 'to_tokens', 'from_tokens', 'window_mask_mod',
           'window_block_mask', 'kernel_width', 'flex_step', 'flex_window_attention', 'TILE_H', 'TILE_W',
           'CARRY_STEPS']
