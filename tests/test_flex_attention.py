"""The FlexAttention window kernel (ops/nlrn_attention/flex.py) against the dense oracle.

On the CPU FlexAttention runs eagerly (its scores materialised): enough to check the block mask, the
token order, the mask and the carried embeddings on small images. Its public function refuses
autograd on the CPU; the gradient tests there call the higher-order op underneath it, which has a
dense backward. On CUDA the same tests run the compiled kernel.
"""
import logging

import pytest
import torch

from nl_plugin.ops.nlrn_attention import Kernel, Layout, dense_attention_reference, flex, propagated_attention, router

pytestmark = [pytest.mark.skipif(not flex.available(), reason='this torch has no FlexAttention'),
              pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')]

CASES = [  # h, w, window, border: odd sizes, partial tiles, an image smaller than the window
    (7, 9, 3, 'exclude'),
    (9, 7, 5, 'circular'),
    (5, 4, 45, 'exclude'),
    (19, 37, 7, 'exclude'),
    (17, 20, 9, 'circular'),
]


def _rand(*shape, device='cpu', grad=False, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(device, dtype).requires_grad_(grad)


def _hop_attend(q, k, v, block_mask):
    """``flex._attend`` through the higher-order op, whose dense backward also runs on the CPU."""
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as hop
        from torch.nn.attention.flex_attention import _apply_kernel_options, _identity
    except ImportError:  # pragma: no cover
        pytest.skip('this torch has no flex_attention higher-order op')
    options = _apply_kernel_options(q, k, v, False, None, None)
    return hop(q, k, v, _identity, block_mask.as_tuple(), 1.0, options)[0]


@pytest.fixture
def autograd_kernel(monkeypatch, device):
    if device.type == 'cpu':
        monkeypatch.setattr(flex, '_attend', _hop_attend)


def _dense_blocks(num, idx, n):
    dense = torch.zeros(num.shape[-1], n, dtype=torch.bool)
    for i, c in enumerate(num[0, 0].tolist()):
        dense[i, idx[0, 0, i, :c].long()] = True
    return dense


@pytest.mark.parametrize('h,w,ws,border', CASES + [(33, 50, 45, 'exclude'), (50, 70, 15, 'circular')])
def test_block_mask_lists_the_blocks_of_the_window(h, w, ws, border, device):
    """Partial and full tile pairs built from the geometry == those torch finds by evaluating mask_mod."""
    from torch.nn.attention.flex_attention import create_block_mask
    grid = flex.token_grid(h, w)
    mine = flex.window_block_mask(h, w, ws, border, device)
    ref = create_block_mask(flex.window_mask_mod(grid, ws, border, device), None, None, grid.tokens, grid.tokens,
                            device=device)
    n = grid.nty * grid.ntx
    for a, b in (((mine.kv_num_blocks, mine.kv_indices), (ref.kv_num_blocks, ref.kv_indices)),
                 ((mine.full_kv_num_blocks, mine.full_kv_indices), (ref.full_kv_num_blocks, ref.full_kv_indices))):
        assert torch.equal(_dense_blocks(*(t.cpu() for t in a), n), _dense_blocks(*(t.cpu() for t in b), n))
    assert mine.q_indices is mine.kv_indices     # the window is symmetric
    if (h, w, ws) == (33, 50, 45):
        assert mine.full_kv_num_blocks.sum() > 0


def test_tokens_round_trip_and_widths():
    x = torch.randn(2, 11, 19, 3)
    grid = flex.token_grid(11, 19)
    t = flex.to_tokens(x, grid)
    assert t.shape == (2, 1, 2 * 2 * 128, 3)
    assert torch.equal(t[0, 0, 16], x[0, 1, 0])              # second row of the first 8x16 tile
    assert torch.equal(t[0, 0, 128], x[0, 0, 16])            # first pixel of the second tile
    assert torch.equal(flex.from_tokens(t, grid), x)
    assert [flex.kernel_width(n) for n in (3, 16, 64, 65, 192, 768)] == [16, 16, 64, 128, 256, 1024]
    assert flex.kernel_width(576, cap=768) == 768


@pytest.mark.parametrize('h,w,ws,border', CASES)
def test_window_attention_matches_dense(h, w, ws, border, device):
    q, k, v = (_rand(2, h, w, n, device=device) for n in (3, 3, 4))
    out = flex.flex_window_attention(q, k, v, ws, border)
    torch.testing.assert_close(out, dense_attention_reference(q, k, v, ws, border)[0], rtol=0, atol=1e-12)


def test_fp32_with_wide_embeddings_matches_float64_reference(device):
    """Realistic widths: 24-wide embeddings (the kernel reads 32) and 20 values, fp32 against float64."""
    q, k, v = (_rand(1, 21, 30, n, device=device) for n in (24, 24, 20))
    out = flex.flex_window_attention(q.float(), k.float(), v.float(), 9, 'exclude')
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dense_attention_reference(q, k, v, 9)[0], rtol=0, atol=2e-5)


@pytest.mark.parametrize('h,w,ws,border', CASES)
def test_propagation_over_three_steps(h, w, ws, border, device):
    """Carried embeddings reproduce the running logit sum (eq. 6); without autograd they fill one buffer."""
    v = _rand(2, h, w, 4, device=device)
    state, logits, buffer = None, None, None
    for t in range(1, 4):
        q, k = _rand(2, h, w, 3, device=device), _rand(2, h, w, 3, device=device)
        out, state = flex.flex_step(q, k, v, state, ws, border, propagate=True)
        ref, logits = dense_attention_reference(q, k, v, ws, border, prev_logits=logits)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        assert state.layout is Layout.TOKENS and state.q.shape[-1] == 3 * t
        buffer = buffer if buffer is not None else state.q._base
        assert state.q._base is buffer and buffer.shape[-1] >= 3 * flex.CARRY_STEPS


def test_a_state_extended_twice_keeps_both_branches(device):
    v = _rand(1, 9, 10, 4, device=device)
    q1, k1, q2, k2, q3, k3 = (_rand(1, 9, 10, 3, device=device) for _ in range(6))
    _, s1 = flex.flex_step(q1, k1, v, None, 5, 'exclude', True)
    _, a = flex.flex_step(q2, k2, v, s1, 5, 'exclude', True)
    _, b = flex.flex_step(q3, k3, v, s1, 5, 'exclude', True)      # must not overwrite branch a
    l1 = dense_attention_reference(q1, k1, v, 5)[1]
    for (q, k), s in (((q2, k2), a), ((q3, k3), b)):
        ref = dense_attention_reference(q, k, v, 5, prev_logits=l1)[1]
        qs, ks = (flex.from_tokens(t, flex.token_grid(9, 10)).reshape(1, 90, 6) for t in (s.q, s.k))
        torch.testing.assert_close(qs @ ks.transpose(1, 2), ref)


@pytest.mark.parametrize('h,w,ws,border', CASES[:2] + [(11, 18, 5, 'exclude')])
def test_gradients_over_three_steps_match_dense(h, w, ws, border, device, autograd_kernel):
    steps = [[_rand(2, h, w, n, device=device, grad=True) for n in (3, 3, 4)] for _ in range(3)]
    state, logits, outs, refs = None, None, [], []
    for q, k, v in steps:
        out, state = flex.flex_step(q, k, v, state, ws, border, propagate=True)
        ref, logits = dense_attention_reference(q, k, v, ws, border, prev_logits=logits)
        outs.append(out)
        refs.append(ref)
    torch.testing.assert_close(torch.stack(outs), torch.stack(refs), rtol=0, atol=1e-12)
    leaves = [t for s in steps for t in s]
    g_flex = torch.autograd.grad(torch.stack(outs).square().sum(), leaves)
    g_ref = torch.autograd.grad(torch.stack(refs).square().sum(), leaves)
    for a, b in zip(g_flex, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_gradcheck(device, autograd_kernel):
    q, k, v = (_rand(1, 5, 6, n, device=device, grad=True) for n in (2, 2, 3))
    for border in ('exclude', 'circular'):
        assert torch.autograd.gradcheck(lambda *a: flex.flex_window_attention(*a, 3, border), (q, k, v),
                                        fast_mode=True)


def test_a_kernel_that_fails_falls_back_to_the_halo_kernel(monkeypatch, caplog):
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError('out of resource: shared memory')
    monkeypatch.setattr(flex, '_attend', broken)
    monkeypatch.setattr(flex, '_FAILED', set())
    q, k, v = (_rand(1, 12, 13, n) for n in (3, 3, 4))
    with caplog.at_level(logging.WARNING, logger='nl_plugin'):
        for _ in range(2):
            out = flex.flex_window_attention(q, k, v, 5, 'circular')
            torch.testing.assert_close(out, dense_attention_reference(q, k, v, 5, 'circular')[0])
    assert len(calls) == 1 and 'halo kernel runs instead' in caplog.text and 'shared memory' in caplog.text


@pytest.fixture
def flex_route(monkeypatch):
    """The router as on CUDA (FlexAttention for softmax window attention), on this device."""
    monkeypatch.setattr(router, '_flex_applies', lambda device, normalization: normalization == 'softmax')


def test_routed_steps_run_flex_and_match_dense(flex_route, caplog):
    v = _rand(1, 13, 11, 4)
    state, logits = None, None
    with caplog.at_level(logging.DEBUG, logger='nl_plugin'):
        for _ in range(3):
            q, k = _rand(1, 13, 11, 3), _rand(1, 13, 11, 3)
            out, state = propagated_attention(q, k, v, state, 7)
            ref, logits = dense_attention_reference(q, k, v, 7, prev_logits=logits)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert 'step -> flex, carry tokens' in caplog.text and state.layout is Layout.TOKENS
    with torch.no_grad():     # 'count' is not FlexAttention's: the halo kernels keep it
        assert propagated_attention(q, k, v, None, 7, normalization='count')[1].layout is Layout.BLOCKS


def test_nlrn_window_scope_through_flex_matches_the_streamed_network(monkeypatch):
    """The whole network with every step on FlexAttention == the CPU's band-streamed inference."""
    from nl_plugin.archs.nlrn_arch import NLRN
    net = NLRN(num_feat=8, num_embed=4, num_steps=3, nl_scope='window', window_size=7).double().eval()
    for blk in net.nonlocal_blocks:
        torch.nn.init.normal_(blk.g.weight, std=0.3)
    x = torch.rand(1, 1, 30, 29, dtype=torch.float64)
    with torch.no_grad():
        streamed = net(x)
        monkeypatch.setattr(router, '_flex_applies', lambda device, normalization: True)
        assert router.route_network(grad=False, training=False, window_size=7, border='exclude', height=30,
                                    width=29, device=x.device) is None
        torch.testing.assert_close(net(x), streamed, rtol=0, atol=1e-10)


_CUDA = torch.device('cuda')


def test_router_on_cuda(monkeypatch):
    """On CUDA: FlexAttention for softmax window steps, whatever the size, except small-image training
    (dense logits / masked SDPA as on the CPU); tokens stay with it; no bands; 'count' and the global
    scope keep their kernels. (A torch without Triton: with it, the Triton step comes first, test_triton_window.)"""
    monkeypatch.setattr(router, '_available_memory_bytes', lambda device: 64 * 2**30)
    monkeypatch.setattr(router, '_triton_applies', lambda device: False)
    monkeypatch.setattr(flex, 'available', lambda: True)
    args = dict(border='exclude', normalization='softmax', element_size=4, device=_CUDA, carried=None, propagate=True)
    cases = [
        (dict(window_size=45, grad=False, shape=(1, 768, 1024)), (Kernel.FLEX, Layout.TOKENS)),
        (dict(window_size=45, grad=True, shape=(1, 200, 200)), (Kernel.FLEX, Layout.TOKENS)),
        (dict(window_size=45, grad=False, shape=(1, 321, 481), carried=Layout.TOKENS), (Kernel.FLEX, Layout.TOKENS)),
        (dict(window_size=45, grad=False, shape=(1, 321, 481), carried=Layout.EMBEDDINGS),
         (Kernel.FLEX, Layout.TOKENS)),
        (dict(window_size=45, grad=False, shape=(1, 321, 481), propagate=False), (Kernel.FLEX, None)),
        (dict(window_size=45, grad=True, shape=(16, 43, 43)), (Kernel.DENSE_LOGITS, Layout.DENSE)),
        (dict(window_size=45, grad=True, shape=(32, 43, 43)), (Kernel.MASKED_SDPA, Layout.EMBEDDINGS)),
        (dict(window_size=None, grad=False, shape=(100, 45, 45)), (Kernel.SDPA, Layout.EMBEDDINGS)),
        (dict(window_size=45, grad=False, shape=(1, 321, 481), normalization='count'),
         (Kernel.STRIPS, Layout.BLOCKS)),
    ]
    for kw, expected in cases:
        assert tuple(router.route_step(**dict(args, **kw))) == expected, kw
    window = dict(grad=False, normalization='softmax', pixels=10**6, prev_logits=False, return_logits=False,
                  device=_CUDA)
    assert router.route_window(**window) is Kernel.FLEX
    assert router.route_window(**dict(window, return_logits=True)) is Kernel.STRIPS
    net = dict(grad=False, training=False, window_size=45, border='exclude', height=768, width=1024)
    assert router.route_network(**net, device=_CUDA) is None
    assert router.route_network(**net, device=torch.device('cpu')) is Kernel.BANDS
    with pytest.raises(ValueError, match='FlexAttention tokens'):
        router.route_step(**dict(args, window_size=None, grad=False, shape=(1, 9, 9), carried=Layout.TOKENS))
    monkeypatch.setattr(flex, 'available', lambda: False)    # a torch without FlexAttention
    assert tuple(router.route_step(**dict(args, window_size=45, grad=False, shape=(1, 321, 481)))) == \
        (Kernel.STRIPS, Layout.BLOCKS)
    assert router.route_network(**net, device=_CUDA) is Kernel.BANDS


def test_compiled_network_runs_the_flex_path(monkeypatch):
    """torch.compile traces the FlexAttention path of a network (the block mask is built outside the graph,
    the carry is a plain concatenation there); aot_eager: dynamo and autograd tracing without a C++ compiler."""
    from nl_plugin.archs.nlrn_arch import NLRN
    monkeypatch.setattr(router, '_flex_applies', lambda device, normalization: normalization == 'softmax')
    net = NLRN(num_feat=8, num_embed=4, num_steps=3, nl_scope='window', window_size=7).eval()
    for blk in net.nonlocal_blocks:
        torch.nn.init.normal_(blk.g.weight, std=0.3)
    compiled = torch.compile(net, backend='aot_eager')
    with torch.no_grad():
        for size in ((30, 29), (33, 40)):
            x = torch.rand(1, 1, *size)
            torch.testing.assert_close(compiled(x), net(x), rtol=0, atol=1e-6)
