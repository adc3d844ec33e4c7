"""NLRN's window border rule (``common.Border``) and every attention kernel against it, for every border.

The oracle below builds each query's window from ``Border.key`` alone (key positions i + o, |o| <= r,
mapped to pixels or dropped), independently of the kernels' index forms. ``KERNELS`` is the table: one
row per kernel, each run for two propagated steps (L_2 = q_1.k_1 + q_2.k_2, which the oracle sees as the
concatenated embeddings). A new kernel is one more row; a new border mode is one more ``BORDER_RULES``
entry, which every row then runs.
"""
from typing import Callable, NamedTuple

import pytest
import torch

from nl_plugin.ops.nlrn_attention import (
    dense_attention_reference,
    flex,
    propagated_attention,
    triton_window,
    window_attention,
    window_attention_rows,
    window_mask,
)
from nl_plugin.ops.nlrn_attention.common import BORDER_RULES, BORDERS, STREAM_BORDERS, border_rule, window_geometry
from nl_plugin.ops.nlrn_attention.dense import dense_logits_step, masked_window_sdpa
from nl_plugin.ops.nlrn_attention.halo import halo_attention
from nl_plugin.ops.nlrn_attention.halo_inference import strips_attention

pytestmark = pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')


def border_oracle(q, k, v, window_size, border, normalization):
    """One window-attention step whose window is built from ``Border.key`` only: (B, H, W, C), float64."""
    rule = border_rule(border)
    _, h, w, _ = q.shape
    offsets = torch.arange(-(window_size // 2), window_size // 2 + 1)
    iy, vy = rule.key(torch.arange(h)[:, None] + offsets, h)                    # (H, q)
    ix, vx = rule.key(torch.arange(w)[:, None] + offsets, w)                    # (W, q)
    keys = k[:, iy[:, None, :, None], ix[None, :, None, :]]                     # (B, H, W, q, q, D)
    values = v[:, iy[:, None, :, None], ix[None, :, None, :]]
    logits = torch.einsum('bhwd,bhwijd->bhwij', q, keys).flatten(3)
    valid = (vy[:, None, :, None] & vx[None, :, None, :]).flatten(2)           # (H, W, q*q)
    if normalization == 'softmax':
        attn = torch.softmax(logits.masked_fill(~valid, float('-inf')), -1)
    else:
        attn = logits.masked_fill(~valid, 0.) / valid.sum(-1, keepdim=True)
    return torch.einsum('bhwn,bhwnc->bhwc', attn, values.flatten(3, 4))


def _two_steps_logits(step):
    """Two steps of a kernel that carries window logits: ``step(q, k, v, prev) -> (out, logits)``."""
    def run(qs, ks, v, ws, border, norm):
        _, logits = step(qs[0], ks[0], v, ws, border, norm, None)
        return step(qs[1], ks[1], v, ws, border, norm, logits)[0]
    return run


def _concatenated(attend):
    """Two steps of a kernel without carried logits, given the concatenated embeddings (as the router does)."""
    def run(qs, ks, v, ws, border, norm):
        return attend(torch.cat(qs, -1), torch.cat(ks, -1), v, ws, border, norm)
    return run


def _halo(q, k, v, ws, border, norm, prev):
    geo = window_geometry(q.shape[1], q.shape[2], ws, border)
    return halo_attention(q, k, v, geo, norm, prev, return_logits=True, block_size=3)


def _strips(block_layout):
    def step(q, k, v, ws, border, norm, prev):
        geo = window_geometry(q.shape[1], q.shape[2], ws, border)
        return strips_attention(q, k, v, geo, norm, prev, return_logits=True, block_layout=block_layout)
    return step


def _dense_logits(q, k, v, ws, border, norm, prev):
    return dense_logits_step(q, k, v, prev, ws, border, norm)


def _reference(q, k, v, ws, border, norm, prev):
    return dense_attention_reference(q, k, v, ws, border, norm, prev_logits=prev)


def _bands(qs, ks, v, ws, border, norm):
    """Bands of 8 query rows, each with only the key rows its windows reach (``window_attention_rows``)."""
    h = v.shape[1]
    py = window_geometry(h, v.shape[2], ws, border).py
    outs = []
    for a in range(0, h, 8):
        e = min(a + 8, h)
        lo, hi = max(a - py, 0), min(e + py, h)
        logits = None
        for q, k in zip(qs, ks):
            out, logits = window_attention_rows(q[:, a:e], k[:, lo:hi], v[:, lo:hi], a - lo, ws, norm, logits,
                                                return_logits=True, image_height=h, border=border)
        outs.append(out)
    return torch.cat(outs, 1)


def _triton(q, k, v, ws, border, norm, prev):
    geo = window_geometry(q.shape[1], q.shape[2], ws, border)
    return triton_window.triton_window_attention(q, k, v, geo, norm, prev, return_logits=True)


def _triton_bands(qs, ks, v, ws, border, norm):
    """Bands of 8 query rows on the fused kernel (``triton_window_rows``), logits carried per band."""
    h = v.shape[1]
    geo = window_geometry(h, v.shape[2], ws, border)
    outs = []
    for a in range(0, h, 8):
        e = min(a + 8, h)
        lo, hi = max(a - geo.py, 0), min(e + geo.py, h)
        logits = None
        for q, k in zip(qs, ks):
            out, logits = triton_window.triton_window_rows(q[:, a:e], k[:, lo:hi], v[:, lo:hi], a - lo, geo, norm,
                                                           logits, return_logits=True)
        outs.append(out)
    return torch.cat(outs, 1)


def _flex(qs, ks, v, ws, border, norm):
    state = None
    for q, k in zip(qs, ks):
        out, state = flex.flex_step(q, k, v, state, ws, border, propagate=True)
    return out


def _routed(qs, ks, v, ws, border, norm):
    """``propagated_attention`` as a network calls it (the router's choice for these sizes, no autograd)."""
    state = None
    for q, k in zip(qs, ks):
        out, state = propagated_attention(q, k, v, state, ws, border, norm)
    return out


class KernelRow(NamedTuple):
    run: Callable      # (qs, ks, v, window_size, border, normalization) -> (B, H, W, C) after the last step
    softmax_only: bool = False
    streaming: bool = False            # bands of rows: only the borders in ``STREAM_BORDERS``
    available: Callable = lambda: True
    triton: bool = False               # a Triton kernel: on the CPU it runs under Triton's interpreter


KERNELS = {
    'reference': KernelRow(_two_steps_logits(_reference)),
    'dense_logits': KernelRow(_two_steps_logits(_dense_logits)),
    'masked_sdpa': KernelRow(_concatenated(lambda q, k, v, ws, border, norm: masked_window_sdpa(q, k, v, ws, border)),
                             softmax_only=True),
    'halo': KernelRow(_two_steps_logits(_halo)),
    'strips': KernelRow(_two_steps_logits(_strips(block_layout=False))),
    'strips_blocks': KernelRow(_two_steps_logits(_strips(block_layout=True))),
    'bands': KernelRow(_bands, streaming=True),
    'flex': KernelRow(_flex, softmax_only=True, available=flex.available),
    'routed': KernelRow(_routed),
    'triton': KernelRow(_two_steps_logits(_triton), available=triton_window.available, triton=True),
    'triton_bands': KernelRow(_triton_bands, streaming=True, available=triton_window.available, triton=True),
}

SIZES = [  # h, w, window: interior and border pixels, odd partial blocks, an image smaller than the window
    (11, 13, 5),
    (17, 10, 7),
    (5, 4, 9),
]


def _applicable_cases():
    """Every (kernel, border, normalisation, size) the kernel is meant to compute; the combinations it refuses
    by design (a normalisation it lacks, bands of a wrapping border, a wrapping window larger than the image:
    ``test_a_wrapping_window_must_fit``) are left out rather than skipped."""
    for kernel, row in KERNELS.items():
        for border in BORDERS:
            for norm in ('softmax', 'count'):
                for h, w, ws in SIZES:
                    if (row.softmax_only and norm != 'softmax') or (row.streaming and border not in STREAM_BORDERS) \
                            or (border_rule(border).wraps and ws > min(h, w)):
                        continue
                    yield pytest.param(kernel, border, norm, h, w, ws, id=f'{kernel}-{border}-{norm}-{h}x{w}-q{ws}')


@pytest.mark.parametrize('kernel,border,norm,h,w,ws', list(_applicable_cases()))
def test_every_kernel_follows_the_border_rule(kernel, border, norm, h, w, ws, monkeypatch):
    row = KERNELS[kernel]
    if not row.available():
        pytest.skip(f'{kernel} is not available here')
    if row.triton:
        monkeypatch.setenv('TRITON_INTERPRET', '1')
    g = torch.Generator().manual_seed(h * w * ws)
    qs = [torch.randn(2, h, w, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    ks = [torch.randn(2, h, w, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    v = torch.randn(2, h, w, 4, generator=g, dtype=torch.float64)
    expected = border_oracle(torch.cat(qs, -1), torch.cat(ks, -1), v, ws, border, norm)
    torch.testing.assert_close(row.run(qs, ks, v, ws, border, norm), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize('border', BORDERS)
@pytest.mark.parametrize('n,window_size', [(9, 3), (9, 9), (6, 5), (4, 9), (1, 3)])
def test_the_pair_predicate_and_the_window_mask_agree_with_the_key_rule(border, n, window_size):
    """``Border.distance`` (the pair form: dense mask, FlexAttention's block mask) selects exactly the keys
    that ``Border.key`` maps the window's offsets to, and ``reach`` bounds their offsets."""
    rule = BORDER_RULES[border]
    if rule.wraps and window_size > n:
        return
    r = window_size // 2
    pos = torch.arange(n)
    idx, valid = rule.key(pos[:, None] + torch.arange(-r, r + 1), n)
    from_keys = torch.zeros(n, n, dtype=torch.bool)
    from_keys[pos[:, None].expand_as(idx)[valid], idx[valid]] = True
    assert torch.equal(rule.distance(pos[:, None], pos[None, :], n) <= r, from_keys)
    square = (from_keys[:, None, :, None] & from_keys[None, :, None, :]).reshape(n * n, n * n)
    assert torch.equal(window_mask(n, n, window_size, border), square)
    offsets = torch.arange(-r, r + 1).expand(n, -1)[valid].abs()
    assert offsets.max().item() <= rule.reach(window_size, n)


@pytest.mark.parametrize('border', [b for b in BORDERS if BORDER_RULES[b].wraps])
def test_a_wrapping_window_must_fit(border):
    """Every public entry point refuses a wrapping window larger than the image, with or without autograd
    (the fused and dense kernels take no geometry of their own, so they rely on this check)."""
    q, k, v = (torch.randn(1, 4, 6, 3, dtype=torch.float64) for _ in range(3))
    for grad in (False, True):
        qq = q.clone().requires_grad_(grad)
        for call in (lambda: window_attention(qq, k, v, 5, border),
                     lambda: propagated_attention(qq, k, v, None, 5, border),
                     lambda: dense_attention_reference(qq, k, v, 5, border)):
            with pytest.raises(ValueError, match='needs window_size <= image size'):
                call()
    with pytest.raises(ValueError, match='needs window_size <= image size'):
        window_mask(4, 6, 5, border)


def test_bands_refuse_a_wrapping_border():
    q, k, v = (torch.randn(1, 10, 6, 3) for _ in range(3))
    for border in BORDERS:
        if not BORDER_RULES[border].streams:
            with pytest.raises(ValueError, match='needs a border in'):
                window_attention_rows(q[:, :4], k, v, 0, 3, border=border)
