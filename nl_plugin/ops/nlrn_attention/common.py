"""Shared by every NLRN attention kernel: argument checks, window geometry, window mask, normalisation.

The attention weights of every kernel come from ``normalize_attention`` (the fused SDPA kernels apply
the same softmax inside ``F.scaled_dot_product_attention``).

Precision rule of every kernel under ``torch.autocast`` (bf16/fp16): the products q.k and A v run in the
autocast dtype; the logits are fp32 from the product's output on: the carried logits and their running sum
L_t = L_{t-1} + q_t.k_t, the softmax (its maximum, exponentials and normaliser) and the count division.
A logit error e changes a weight by a factor e^e, and logits reach tens to hundreds (bf16 spacing 0.5 at
100): the bf16 product's rounding of each fresh q_t.k_t (at most 2^-8 of it) is unavoidable, but rounding the
running sum L_t as well would add an error of the size of |L_t| (which grows with t) at each of the T steps.
Measured on random embeddings with logits up to 75: 1.35% relative output error with this rule, of which 0.8%
comes from rounding q, k, v themselves. The weights enter the value product in the autocast dtype (they are
in [0, 1]; at most a relative 2^-8 per weight).
"""
from typing import NamedTuple, Optional, Tuple

import torch

from ..amp import to_accum

NORMALIZATIONS = ('softmax', 'count')


class Border(NamedTuple):
    """How the q x q window meets the image border: the one statement of the rule every kernel derives from.

    Along an axis of n pixels the window of query i reaches the key positions i + o, |o| <= r = q // 2.
    ``key`` says which pixel a key position is and whether it is a key at all; ``distance`` is the same
    rule as a predicate on two pixels (``key`` and ``distance`` agree: tests/test_border_rule.py), for the
    kernels that test pixel pairs (the dense mask, FlexAttention's block mask); ``reach`` clamps the offsets
    kept in the compact logits layout. A new border mode is one more entry of ``BORDER_RULES``.
    """
    name: str
    wraps: bool     # positions outside the image are those of the opposite side; else they hold no key

    def key(self, pos: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(index, valid) of the key positions ``pos`` (int tensor, any values) on an axis of n pixels.

        'circular': every position is a key, the pixel ``pos mod n``. 'exclude': only the positions in
        the image are keys (left out of the normalisation); the index of the others is clamped into the
        image so that it can be gathered, and masked.
        """
        if self.wraps:
            return pos % n, torch.ones_like(pos, dtype=torch.bool)
        return pos.clamp(0, n - 1), (pos >= 0) & (pos < n)

    def distance(self, a: torch.Tensor, b: torch.Tensor, n) -> torch.Tensor:
        """Window distance of pixels a and b on an axis of n: b is in the window of a iff it is <= r."""
        d = (a - b).abs()
        return torch.minimum(d, n - d) if self.wraps else d

    def all_keys(self, lo: int, hi: int, n: int) -> bool:
        """Whether every key position lo .. hi-1 on an axis of n pixels is a key (no border masking needed)."""
        return self.wraps or (lo >= 0 and hi <= n)

    def reach(self, window_size: int, n: int) -> int:
        """Largest offset |o| <= r at which a key can lie on an axis of n pixels (the compact layout keeps these).

        A wrapping window must fit the image (else a pixel would be its own neighbour twice).
        """
        r = window_size // 2
        if self.wraps:
            if window_size > n:
                raise ValueError(f'border={self.name!r} needs window_size <= image size, got window_size='
                                 f'{window_size} for an image side of {n} pixels')
            return r
        return min(r, n - 1)

    @property
    def streams(self) -> bool:
        """Whether a band of rows needs only the rows within the window's reach (so bands of rows can be
        computed alone, ``window_attention_rows``): true unless the window wraps round to the far side."""
        return not self.wraps


BORDER_RULES = {b.name: b for b in (Border('exclude', wraps=False), Border('circular', wraps=True))}
BORDERS = tuple(BORDER_RULES)
# Borders a network may stream in bands of rows (``router.route_network``, ``window_attention_rows``).
STREAM_BORDERS = tuple(name for name, rule in BORDER_RULES.items() if rule.streams)


def border_rule(border: str) -> Border:
    """The ``Border`` named ``border`` (one of ``BORDERS``)."""
    if border not in BORDER_RULES:
        raise ValueError(f'border must be one of {BORDERS}, got {border!r}')
    return BORDER_RULES[border]

# fp32 softmax of logits spread over a wide range is slow on the CPU: torch's vectorised exp leaves
# its fast path for arguments below about -87 (10x slower), and weights near 1e-38 make the value
# matmul meet denormals. Logits further than this below their row's maximum are raised to it
# first (so are the -inf of out-of-image keys): each such weight becomes e^-30 (~1e-13) of the
# largest, changing a normaliser >= 1 by at most P * 1e-13, under fp32 resolution.
LOGIT_RANGE = 30.0


def check_window_args(window_size: Optional[int], border: str = 'exclude', normalization: str = 'softmax',
                      size: Optional[Tuple[int, int]] = None) -> Optional[int]:
    """Validate the neighbourhood arguments of the attention ops.

    Args:
        window_size (int | None): Odd window side q >= 1, or None for global attention (whole tensor).
        border (str): One of ``BORDERS``.
        normalization (str): One of ``NORMALIZATIONS``.
        size (tuple[int, int], optional): (H, W) of the image: also check that the window suits it
            (``Border.reach``).

    Returns:
        int | None: ``window_size``.
    """
    border_rule(border)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got {normalization!r}')
    if window_size is None:
        return None
    if not isinstance(window_size, int) or isinstance(window_size, bool) or window_size < 1:
        raise ValueError(f'window_size must be an odd int >= 1 (None: global attention), got {window_size!r}')
    if window_size % 2 == 0:
        raise ValueError(f'window_size must be odd (window centred on the pixel), got {window_size}')
    for n in size or ():
        border_rule(border).reach(window_size, n)
    return window_size


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise unless q, k are (B, H, W, D) of one shape and v is (B, H, W, C)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError('q, k, v must be channels-last (B, H, W, D); got shapes '
                         f'{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}')
    if q.shape != k.shape:
        raise ValueError(f'q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}')
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f'v must share (B, H, W) with q, got {tuple(v.shape)} and {tuple(q.shape)}')


def requires_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records an op on these tensors (None entries are ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class WindowGeometry(NamedTuple):
    """Reach of the q x q window on an image: radius ``r`` and the offsets kept in the compact layout.

    ``py``/``px`` are the row/column reach (``Border.reach``): ``r``, except for border 'exclude' on an image
    smaller than the window, where keys further than h-1 rows (w-1 columns) away are never inside the image.
    """
    r: int
    py: int
    px: int
    border: Border

    @property
    def circular(self) -> bool:
        """The window wraps round the image (``border.wraps``): the flag a compiled kernel specialises on."""
        return self.border.wraps

    @property
    def kh(self) -> int:
        return 2 * self.py + 1

    @property
    def kw(self) -> int:
        return 2 * self.px + 1

    @property
    def p(self) -> int:
        """Entries per pixel of the compact logits layout (B, H, W, P)."""
        return self.kh * self.kw


def window_geometry(h: int, w: int, window_size: int, border: str) -> WindowGeometry:
    """The one place the window radius is clamped to the image (see ``WindowGeometry``)."""
    rule = border_rule(border)
    return WindowGeometry(window_size // 2, rule.reach(window_size, h), rule.reach(window_size, w), rule)


def window_mask(h: int, w: int, window_size: Optional[int], border: str = 'exclude',
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean (N, N) mask, N = h*w (row-major): True where key j is in the window of query i.

    Args:
        h, w (int): Image size.
        window_size (int | None): Odd window side q; None = global (every key).
        border (str): 'exclude' (plain distance, out-of-image keys do not exist) or 'circular'
            (wrap-around distance).
        device (torch.device, optional): Device of the mask.
    """
    return dense_window_mask(h, w, check_window_args(window_size, border, size=(h, w)), border, device)


def dense_window_mask(h: int, w: int, window_size: Optional[int], border: str,
                      device: Optional[torch.device]) -> torch.Tensor:
    """``window_mask`` on validated arguments (for the kernels)."""
    n = h * w
    if window_size is None:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    r, rule = window_size // 2, border_rule(border)

    def near(size):   # (size, size): pixels within the window's distance r of each other
        i = torch.arange(size, device=device)
        return rule.distance(i[:, None], i[None, :], size) <= r
    # Row and column conditions combined as an outer AND: no (N, N) integer temporaries.
    return (near(h)[:, None, :, None] & near(w)[None, :, None, :]).reshape(n, n)


def range_limited_softmax(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of logits ``x`` (-inf allowed), via ``buf`` of x's shape; see ``LOGIT_RANGE``."""
    floor = x.amax(-1, keepdim=True).sub_(LOGIT_RANGE)
    return torch.softmax(torch.maximum(x, floor, out=buf), dim=-1)


def normalize_attention(logits: torch.Tensor, normalization: str, invalid: Optional[torch.Tensor] = None,
                        count=None, *, inplace: bool = False,
                        softmax_buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention weights over the last dim of ``logits`` (NLRN eq. 3-4; paper Table 1 normalisations).

    'softmax': exp(L_ij) / sum_j exp(L_ij) over the keys in the neighbourhood. 'count': L_ij / N_i,
    N_i the number of keys in the neighbourhood (dot-product correlations, Wang et al.'s convention);
    it is linear, so the linear global kernel applies it to (q k^T) v directly.

    Args:
        logits (Tensor): (..., P) logits.
        normalization (str): 'softmax' or 'count'.
        invalid (Tensor, optional): Bool, broadcastable to ``logits``: True for keys outside the
            neighbourhood. Without it, -inf logits mark them ('count' then counts the finite ones).
        count (int | Tensor, optional): N_i when known (skips counting).
        inplace (bool): Write the softmax mask into ``logits``.
        softmax_buf (Tensor, optional): Buffer of ``logits``' shape: range-limited softmax (fp32
            inference, see ``LOGIT_RANGE``).

    Returns:
        Tensor: Weights of ``logits``' shape, in at least fp32 (see the precision rule above).
    """
    logits = to_accum(logits)
    if normalization == 'softmax':
        if invalid is not None:
            logits = logits.masked_fill_(invalid, float('-inf')) if inplace else \
                logits.masked_fill(invalid, float('-inf'))
        if softmax_buf is not None:
            return range_limited_softmax(logits, softmax_buf)
        return torch.softmax(logits, dim=-1)
    if invalid is None and count is None:
        invalid = ~torch.isfinite(logits)
    if invalid is not None:
        logits = logits.masked_fill(invalid, 0.)
        if count is None:
            count = (~invalid).sum(-1, keepdim=True)
    return logits / count


__all__ = ['NORMALIZATIONS', 'Border', 'BORDER_RULES', 'BORDERS', 'STREAM_BORDERS', 'border_rule', 'LOGIT_RANGE',
           'check_window_args', 'check_qkv', 'requires_grad', 'WindowGeometry', 'window_geometry', 'window_mask',
           'dense_window_mask', 'range_limited_softmax', 'normalize_attention']
