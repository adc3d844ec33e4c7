"""NLRN attention ops (window / global, correlation propagation): every kernel vs the dense oracle, and the router."""
import logging

import pytest
import torch

from nl_plugin.ops.nlrn_attention import (
    CorrelationState,
    Kernel,
    Layout,
    dense_attention_reference,
    euclidean_embeddings,
    global_attention,
    halo_inference,
    propagated_attention,
    router,
    window_attention,
    window_attention_rows,
    window_mask,
)
from nl_plugin.ops.nlrn_attention.common import requires_grad, window_geometry
from nl_plugin.ops.nlrn_attention.halo import halo_attention
from nl_plugin.ops.nlrn_attention.halo_inference import strips_attention


def _qkv(b, h, w, d=3, c=4, grad=False, device='cpu'):
    t = [torch.randn(b, h, w, n, dtype=torch.float64).to(device).requires_grad_(grad) for n in (d, d, c)]
    return t


def _window(q, k, v, ws, border='exclude', norm='softmax', prev_logits=None, return_logits=False, block=None,
            block_layout=False):
    """``window_attention``, or with a block size the kernel it routes to (halo with autograd, else strips)."""
    if block is None and not block_layout:
        return window_attention(q, k, v, ws, border, norm, prev_logits=prev_logits, return_logits=return_logits)
    geo = window_geometry(q.shape[1], q.shape[2], ws, border)
    if requires_grad(q, k, v, prev_logits):
        return halo_attention(q, k, v, geo, norm, prev_logits, return_logits, block_size=block)
    return strips_attention(q, k, v, geo, norm, prev_logits, return_logits, block_size=block or 8,
                            block_layout=block_layout)


CASES = [  # h, w, window, border, normalization
    (7, 9, 3, 'exclude', 'softmax'),
    (9, 7, 5, 'circular', 'softmax'),
    (5, 4, 45, 'exclude', 'softmax'),      # image smaller than the window
    (10, 11, 5, 'exclude', 'count'),
    (13, 17, 7, 'exclude', 'softmax'),     # several blocks, partial blocks at the border
    (12, 10, 5, 'circular', 'count'),
]


@pytest.mark.parametrize('h,w,ws,border,norm', CASES)
@pytest.mark.parametrize('block', [None, 3])
def test_window_matches_dense_two_steps(h, w, ws, border, norm, block, device):
    q, k, v = _qkv(2, h, w, device=device)
    ref, dense_logits = dense_attention_reference(q, k, v, ws, border, norm)
    q2, k2, _ = _qkv(2, h, w, device=device)
    ref2, _ = dense_attention_reference(q2, k2, v, ws, border, norm, prev_logits=dense_logits)
    for grad in (False, True):   # inference path and autograd path
        qq = q.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out, logits = _window(qq, k, v, ws, border, norm, return_logits=True, block=block)
            out2 = _window(q2, k2, v, ws, border, norm, prev_logits=logits.clone(), block=block)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(out2, ref2, rtol=0, atol=1e-12)



@pytest.mark.parametrize('border,norm', [('exclude', 'softmax'), ('circular', 'softmax'), ('exclude', 'count')])
def test_inference_groups_reuse_buffers(border, norm, monkeypatch, device):
    """One block column per group: the key/value strip and weight buffers are reused across the
    left edge, interior columns and the right edge, and must not leak values between groups."""
    monkeypatch.setattr(halo_inference, '_GROUP_BYTES', 1)
    q, k, v = _qkv(2, 11, 37, device=device)
    ref, dense_logits = dense_attention_reference(q, k, v, 5, border, norm)
    q2, k2, _ = _qkv(2, 11, 37, device=device)
    ref2, _ = dense_attention_reference(q2, k2, v, 5, border, norm, prev_logits=dense_logits)
    with torch.no_grad():
        out, logits = _window(q, k, v, 5, border, norm, return_logits=True, block=3, block_layout=True)
        out2 = _window(q2, k2, v, 5, border, norm, prev_logits=logits, block=3, block_layout=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out2, ref2, rtol=0, atol=1e-12)


@pytest.mark.parametrize('spread', [0.1, 30.0])
def test_fp32_inference_with_widely_spread_logits(spread, device):
    """fp32 inference raises logits more than 30 below their row's maximum before the softmax (torch's
    fast exp path): same result as the float64 dense reference to fp32 precision, borders included."""
    q, k, v = _qkv(1, 19, 23, d=8, device=device)
    q = q * spread
    ref, ref_logits = dense_attention_reference(q, k, v, 7)
    ref2, _ = dense_attention_reference(q, k, v, 7, prev_logits=ref_logits)
    with torch.no_grad():
        out, logits = _window(q.float(), k.float(), v.float(), 7, return_logits=True, block_layout=True)
        out2 = _window(q.float(), k.float(), v.float(), 7, prev_logits=logits, block_layout=True)
    # fp32 rounding of logits of magnitude ~100 alone gives errors up to ~4e-5 here; a floor only
    # 10 below the maximum would err by ~1e-2.
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-4)
    torch.testing.assert_close(out2.double(), ref2, rtol=0, atol=2e-4)

def test_window_border_excludes_outside_neighbours():
    # A constant-logit query at the corner averages exactly the in-image part of its window.
    q = torch.zeros(1, 6, 6, 2, dtype=torch.float64)
    v = torch.arange(36, dtype=torch.float64).view(1, 6, 6, 1)
    out = window_attention(q, q, v, 5)
    assert out[0, 0, 0, 0].item() == pytest.approx(v[0, :3, :3].mean().item())
    out_c = window_attention(q, q, v, 5, border='circular')
    idx = torch.tensor([4, 5, 0, 1, 2])
    assert out_c[0, 0, 0, 0].item() == pytest.approx(v[0][idx][:, idx].mean().item())


def test_large_window_equals_global(device):
    q, k, v = _qkv(2, 6, 5, device=device)
    g = global_attention(q, k, v)
    ref, _ = dense_attention_reference(q, k, v, None)
    torch.testing.assert_close(g, ref)
    for ws in (11, 13, 45):   # >= 2x the image: every pixel sees the whole image
        torch.testing.assert_close(window_attention(q, k, v, ws), g)
    gc = global_attention(q, k, v, 'count')
    torch.testing.assert_close(gc, dense_attention_reference(q, k, v, None, normalization='count')[0])
    torch.testing.assert_close(window_attention(q, k, v, 13, normalization='count'), gc)


def test_global_attention_padding_paths(device):
    for d, c in ((3, 4), (6, 4), (4, 4)):   # q/k narrower, wider, equal to v
        q, k, v = _qkv(1, 4, 5, d, c, device=device)
        torch.testing.assert_close(global_attention(q, k, v), dense_attention_reference(q, k, v)[0])


@pytest.mark.parametrize('border,norm', [('exclude', 'softmax'), ('circular', 'softmax'), ('exclude', 'count')])
def test_window_gradcheck_with_carried_logits(border, norm, device):
    q, k, v = _qkv(1, 3, 4, 2, 2, grad=True, device=device)
    prev = torch.randn(1, 3, 4, 9, dtype=torch.float64).to(device).requires_grad_()

    def fn(q, k, v, prev):
        out, logits = _window(q, k, v, 3, border, norm, prev_logits=prev, return_logits=True, block=2)
        return out, logits.masked_fill(~torch.isfinite(logits), 0)

    assert torch.autograd.gradcheck(fn, (q, k, v, prev), fast_mode=True)


def test_window_gradcheck_small_image_and_global(device):
    q, k, v = _qkv(1, 3, 4, 2, 2, grad=True, device=device)
    assert torch.autograd.gradcheck(lambda *a: window_attention(*a, 7), (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: global_attention(*a), (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: global_attention(*a, 'count'), (q, k, v))


def test_window_gradients_match_dense(device):
    q, k, v = _qkv(2, 9, 8, 3, 4, grad=True, device=device)
    w = torch.randn(2, 9, 8, 4, dtype=torch.float64).to(device)
    grads = []
    for fn in (lambda: _window(q, k, v, 5, block=4),
               lambda: dense_attention_reference(q, k, v, 5)[0]):
        (fn() * w).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('ws', [None, 5])
@pytest.mark.parametrize('store', [True, False])
def test_propagated_attention_three_steps(ws, store, monkeypatch, device):
    """Carried logits and concatenated embeddings both reproduce the running logit sum (eq. 6).
    Window logits are carried while they fit in the available memory, else the embeddings; on CUDA
    the window scope runs FlexAttention, which carries the embeddings in its token order."""
    if not store:
        monkeypatch.setattr(router, '_available_memory_bytes', lambda device: 0)
    v = torch.randn(1, 7, 8, 4, dtype=torch.float64).to(device)
    state, dense = None, None
    for _ in range(3):
        q, k, _ = _qkv(1, 7, 8, device=device)
        out, state = propagated_attention(q, k, v, state, ws)
        ref, dense = dense_attention_reference(q, k, v, ws, prev_logits=dense)
        torch.testing.assert_close(out, ref)
    assert isinstance(state, CorrelationState)
    if device.type == 'cuda' and ws is not None:
        assert state.layout is Layout.TOKENS
    else:
        assert (state.logits is not None) == (store and ws is not None)
        assert state.layout is (Layout.BLOCKS if store and ws is not None else Layout.EMBEDDINGS)
    out, none = propagated_attention(q, k, v, None, ws, propagate=False)
    assert none is None


def test_euclidean_embeddings_give_distance_softmax(device):
    x = torch.randn(1, 4, 5, 3, dtype=torch.float64).to(device)
    q, k = euclidean_embeddings(x)
    v = torch.randn(1, 4, 5, 2, dtype=torch.float64).to(device)
    xf = x.reshape(20, 3)
    attn = torch.softmax(-torch.cdist(xf, xf) ** 2, -1)
    torch.testing.assert_close(global_attention(q, k, v).reshape(20, 2), attn @ v.reshape(20, 2))


def test_mask_and_errors():
    m = window_mask(4, 4, 3)
    assert m.sum().item() == 4 * 4 + 8 * 6 + 4 * 9   # corners 4, edges 6, interior 9
    q, k, v = _qkv(1, 4, 4)
    with pytest.raises(ValueError, match='odd'):
        window_attention(q, k, v, 4)
    with pytest.raises(ValueError, match='circular'):
        window_attention(q, k, v, 5, border='circular')
    with pytest.raises(ValueError, match='border'):
        window_attention(q, k, v, 3, border='reflect')
    with pytest.raises(ValueError, match='prev_logits'):
        window_attention(q, k, v, 3, prev_logits=torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match='same shape'):
        window_attention(q, k[..., :2], v, 3)


@pytest.mark.parametrize('h,w,ws,norm', [(21, 9, 5, 'softmax'), (17, 12, 7, 'count'), (19, 6, 9, 'softmax'),
                                         (6, 11, 45, 'softmax'), (26, 41, 5, 'softmax'), (26, 30, 5, 'count')])
@pytest.mark.parametrize('blocks_per_matmul', [None, 2])
def test_window_rows_in_bands_match_dense_two_steps(h, w, ws, norm, blocks_per_matmul, monkeypatch, device):
    """Bands of 8 query rows with only the key rows their windows reach == the whole image, carried logits too.
    A band's blocks are batched into matmuls (all of them, or 2 at a time: edge and interior batches)."""
    if blocks_per_matmul:   # halo logits of one 8x8 query block: 64 x (8 + 2r)^2 float64
        monkeypatch.setattr(halo_inference, '_GROUP_BYTES', blocks_per_matmul * 64 * (8 + ws - 1)**2 * 8)
    q, k, v = _qkv(2, h, w, device=device)
    q2, k2, _ = _qkv(2, h, w, device=device)
    ref, dense_logits = dense_attention_reference(q, k, v, ws, 'exclude', norm)
    ref2, _ = dense_attention_reference(q2, k2, v, ws, 'exclude', norm, prev_logits=dense_logits)
    py = min(ws // 2, h - 1)
    outs, outs2 = [], []
    for a in range(0, h, 8):
        e = min(a + 8, h)
        lo, hi = max(a - py, 0), min(e + py, h)
        out, logits = window_attention_rows(q[:, a:e], k[:, lo:hi], v[:, lo:hi], a - lo, ws, norm, return_logits=True,
                                            image_height=h)
        outs.append(out)
        outs2.append(window_attention_rows(q2[:, a:e], k2[:, lo:hi], v[:, lo:hi], a - lo, ws, norm, prev_logits=logits,
                                           image_height=h))
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(outs2, 1), ref2, rtol=0, atol=1e-12)


def test_window_rows_rejects_bad_calls():
    q, k, v = _qkv(1, 10, 6)
    with pytest.raises(ValueError, match='not rows of k'):
        window_attention_rows(q[:, :4], k, v, 8, 3)
    with pytest.raises(ValueError, match='inference-only'):
        window_attention_rows(q[:, :4].requires_grad_(), k, v, 0, 3)
    with pytest.raises(ValueError, match='odd'):
        window_attention_rows(q[:, :4], k, v, 0, 4)


@pytest.mark.parametrize('window_size', [7, None])
def test_small_image_training_carries_dense_logits(window_size, monkeypatch, device):
    """With autograd on a small image, propagated steps carry dense (B, N, N) logits (no fused
    kernel, whose embeddings would grow every step) and equal the dense reference in value and
    gradient; without propagation each window step is one fused masked attention."""
    import torch.nn.functional as F

    calls = []
    orig = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(k) or orig(*a, **k))
    steps = [_qkv(2, 9, 11, grad=True, device=device) for _ in range(3)]
    state, logits, outs, refs = None, None, [], []
    for q, k, v in steps:
        out, state = propagated_attention(q, k, v, state, window_size=window_size)
        ref, logits = dense_attention_reference(q, k, v, window_size, prev_logits=logits)
        outs.append(out)
        refs.append(ref)
        assert state.q is None and state.logits.shape == (2, 99, 99) and state.layout is Layout.DENSE
    assert not calls
    torch.testing.assert_close(torch.stack(outs), torch.stack(refs), rtol=0, atol=1e-12)
    leaves = [t for s in steps for t in s]
    g_fast = torch.autograd.grad(torch.stack(outs).square().sum(), leaves)
    g_ref = torch.autograd.grad(torch.stack(refs).square().sum(), leaves)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    if window_size:
        q, k, v = steps[0]
        out, state = propagated_attention(q, k, v, None, window_size=window_size, propagate=False)
        ref = dense_attention_reference(q, k, v, window_size)[0]
        assert len(calls) == 1 and calls[0]['attn_mask'] is not None and state is None
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        g_fast = torch.autograd.grad(out.square().sum(), (q, k, v))
        g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(g_fast, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # Larger images and inference keep the blocked algorithm.
    big = [t.detach().requires_grad_() for t in _qkv(1, 70, 70, d=2, c=2)]
    assert _route_window(*big) is Kernel.HALO
    with torch.no_grad():
        assert _route_window(*_qkv(1, 9, 11, grad=True)) is Kernel.STRIPS


def _route_window(q, k, v, normalization='softmax', prev_logits=None, return_logits=False):
    return router.route_window(grad=requires_grad(q, k, v, prev_logits), normalization=normalization,
                               pixels=q.shape[1] * q.shape[2], prev_logits=prev_logits is not None,
                               return_logits=return_logits, device=q.device)


_CPU = torch.device('cpu')


@pytest.mark.parametrize('kw,expected', [
    # autograd on small images (NLRN's 43x43 training patches): dense logits carried, any scope
    (dict(window_size=45, grad=True, shape=(16, 43, 43)), (Kernel.DENSE_LOGITS, Layout.DENSE)),
    (dict(window_size=None, grad=True, shape=(16, 43, 43)), (Kernel.DENSE_LOGITS, Layout.DENSE)),
    (dict(window_size=None, grad=False, shape=(16, 43, 43), carried=Layout.DENSE), (Kernel.DENSE_LOGITS, Layout.DENSE)),
    # dense logits too large (batch 32): fused kernels carrying embeddings
    (dict(window_size=45, grad=True, shape=(32, 43, 43)), (Kernel.MASKED_SDPA, Layout.EMBEDDINGS)),
    (dict(window_size=None, grad=True, shape=(32, 43, 43)), (Kernel.SDPA, Layout.EMBEDDINGS)),
    (dict(window_size=None, grad=True, shape=(32, 43, 43), normalization='count'), (Kernel.LINEAR, Layout.EMBEDDINGS)),
    (dict(window_size=45, grad=True, shape=(16, 43, 43), propagate=False), (Kernel.MASKED_SDPA, None)),
    (dict(window_size=None, grad=False, shape=(1, 45, 45)), (Kernel.SDPA, Layout.EMBEDDINGS)),
    (dict(window_size=45, grad=True, shape=(16, 43, 43), carried=Layout.EMBEDDINGS),
     (Kernel.MASKED_SDPA, Layout.EMBEDDINGS)),
    # large images: halo kernels carrying window logits (image layout with autograd, blocks without)
    (dict(window_size=45, grad=True, shape=(1, 200, 200)), (Kernel.HALO, Layout.IMAGE)),
    (dict(window_size=45, grad=False, shape=(1, 321, 481)), (Kernel.STRIPS, Layout.BLOCKS)),
    (dict(window_size=45, grad=False, shape=(16, 43, 43)), (Kernel.STRIPS, Layout.BLOCKS)),
    (dict(window_size=45, grad=False, shape=(1, 321, 481), carried=Layout.BLOCKS), (Kernel.STRIPS, Layout.BLOCKS)),
    (dict(window_size=45, grad=False, shape=(1, 321, 481), carried=Layout.IMAGE), (Kernel.STRIPS, Layout.IMAGE)),
    (dict(window_size=45, grad=True, shape=(1, 200, 200), carried=Layout.IMAGE), (Kernel.HALO, Layout.IMAGE)),
    (dict(window_size=45, grad=False, shape=(1, 321, 481), propagate=False), (Kernel.STRIPS, None)),
    (dict(window_size=45, grad=False, shape=(1, 321, 481), carried=Layout.EMBEDDINGS),
     (Kernel.STRIPS, Layout.EMBEDDINGS)),
    # window logits that do not fit in memory: embeddings
    (dict(window_size=45, grad=False, shape=(1, 321, 481), memory=0), (Kernel.STRIPS, Layout.EMBEDDINGS)),
    (dict(window_size=45, grad=True, shape=(1, 200, 200), memory=0), (Kernel.HALO, Layout.EMBEDDINGS)),
])
def test_router_picks_the_kernel_of_each_regime(kw, expected, monkeypatch):
    memory = kw.pop('memory', 64 * 2**30)
    monkeypatch.setattr(router, '_available_memory_bytes', lambda device: memory)
    args = dict(border='exclude', normalization='softmax', element_size=4, device=_CPU, carried=None, propagate=True)
    args.update(kw)
    assert tuple(router.route_step(**args)) == expected


def test_router_window_and_network_choices():
    small = dict(normalization='softmax', pixels=43 * 43, prev_logits=False, return_logits=False, device=_CPU)
    assert router.route_window(grad=True, **small) is Kernel.MASKED_SDPA
    assert router.route_window(grad=False, **small) is Kernel.STRIPS
    assert router.route_window(grad=True, **dict(small, normalization='count')) is Kernel.HALO
    assert router.route_window(grad=True, **dict(small, return_logits=True)) is Kernel.HALO
    assert router.route_window(grad=True, **dict(small, pixels=65 * 64)) is Kernel.HALO
    net = dict(grad=False, training=False, window_size=45, border='exclude', height=321, width=180, device=_CPU)
    assert router.route_network(**net) is Kernel.BANDS
    assert router.route_network(**dict(net, height=60, width=180)) is Kernel.BANDS    # long side counts
    for change in (dict(grad=True), dict(training=True), dict(window_size=None), dict(border='circular'),
                   dict(height=179, width=179)):
        assert router.route_network(**dict(net, **change)) is None, change
    with pytest.raises(ValueError, match='window logits'):
        router.route_step(window_size=None, border='exclude', normalization='softmax', grad=False, shape=(1, 9, 9),
                          element_size=8, device=_CPU, carried=Layout.BLOCKS, propagate=True)
    with pytest.raises(ValueError, match='inference-only'):
        router.route_step(window_size=5, border='exclude', normalization='softmax', grad=True, shape=(1, 9, 9),
                          element_size=8, device=_CPU, carried=Layout.BLOCKS, propagate=True)


def test_propagated_attention_logs_and_runs_the_routed_kernel(caplog):
    """The debug log names the kernel that ran; its state has the routed layout."""
    q, k, v = _qkv(1, 19, 23)
    with caplog.at_level(logging.DEBUG, logger='nl_plugin'), torch.no_grad():
        out, state = propagated_attention(q, k, v, None, 5)
    assert 'step -> strips, carry blocks' in caplog.text
    assert state.layout is Layout.BLOCKS and state.logits.shape == (1, 3, 3, 64, 25)
    torch.testing.assert_close(out, dense_attention_reference(q, k, v, 5)[0], rtol=0, atol=1e-12)


def test_window_size_zero_is_not_global():
    q, k, v = _qkv(1, 4, 4)
    for fn in (lambda: propagated_attention(q, k, v, None, 0), lambda: dense_attention_reference(q, k, v, 0),
               lambda: window_mask(4, 4, 0), lambda: window_attention(q, k, v, None)):
        with pytest.raises(ValueError, match='window_size'):
            fn()
