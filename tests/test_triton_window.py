"""The fused Triton window kernel against the dense oracle: forward, carried logits in place, gradients.

On the CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set per test by the ``triton_device``
fixture); with ``pytest -m cuda`` the same tests run compiled on the GPU. The interpreter is slow: images are tiny.
"""
import pytest
import torch

from nl_plugin.ops.nlrn_attention import dense_attention_reference
from nl_plugin.ops.nlrn_attention.common import window_geometry

triton_window = pytest.importorskip('nl_plugin.ops.nlrn_attention.triton_window')
if not triton_window.available():
    pytest.skip('triton is not importable', allow_module_level=True)
tw = triton_window.triton_window_attention


@pytest.fixture
def triton_device(device, monkeypatch):
    """The ``device`` fixture, with Triton's interpreter switched on for the CPU."""
    if device.type == 'cpu':
        monkeypatch.setenv('TRITON_INTERPRET', '1')
    return device


def _rand(*shape, device, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=torch.float64).to(device, dtype).requires_grad_(grad)


def _compact_of_dense(dense, h, w, geo):
    """Entries of dense (B, N, N) logits in the compact layout (B, H, W, P), and which of them are in the window."""
    dev = dense.device
    y = torch.arange(h, device=dev).view(h, 1, 1, 1)
    x = torch.arange(w, device=dev).view(1, w, 1, 1)
    dy = torch.arange(-geo.py, geo.py + 1, device=dev).view(1, 1, -1, 1)
    dx = torch.arange(-geo.px, geo.px + 1, device=dev).view(1, 1, 1, -1)
    ky, kx = y + dy, x + dx
    if geo.circular:
        ky, kx, ok = ky % h, kx % w, torch.ones(h, w, geo.kh, geo.kw, dtype=torch.bool, device=dev)
    else:
        ok = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
    key = (ky.clamp(0, h - 1) * w + kx.clamp(0, w - 1)).reshape(1, h * w, geo.p).expand(dense.shape[0], -1, -1)
    return dense.gather(2, key).view(-1, h, w, geo.p), ok.reshape(h, w, geo.p)


def _close(a, b, rel):
    """Norm-wise relative error ||a - b|| / ||b|| (in fp64) at most ``rel``."""
    a, b = a.detach().double(), b.detach().double()
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert err <= rel, f'relative error {err:.3g} > {rel:.1g}'


CASES = [  # h, w, window, border, normalization
    (7, 9, 3, 'exclude', 'softmax'),
    (9, 7, 5, 'circular', 'softmax'),
    (5, 4, 45, 'exclude', 'softmax'),       # image smaller than the window
    (10, 11, 5, 'exclude', 'count'),
    (12, 10, 5, 'circular', 'count'),
    (10, 19, 5, 'exclude', 'softmax'),      # several query tiles, partial tiles
    (9, 9, 9, 'circular', 'softmax'),       # window == image (wrapped halo wider than the image)
    (1, 20, 5, 'exclude', 'softmax'),       # one row
    (6, 5, 1, 'exclude', 'softmax'),        # q = 1: each pixel attends to itself
]


@pytest.mark.parametrize('h,w,ws,border,norm', CASES)
def test_steps_match_dense_and_carry_in_place(h, w, ws, border, norm, triton_device):
    """Three propagated steps, batch 2: outputs and carried logits as the dense oracle; the carry is one buffer."""
    dev, geo = triton_device, window_geometry(h, w, ws, border)
    v = _rand(2, h, w, 4, device=dev)
    logits = ref_logits = None
    for t in range(3):
        q, k = _rand(2, h, w, 3, device=dev), _rand(2, h, w, 3, device=dev)
        ref, ref_logits = dense_attention_reference(q.double(), k.double(), v.double(), ws, border, norm,
                                                    prev_logits=ref_logits)
        out, new = tw(q, k, v, geo, norm, prev_logits=logits, return_logits=True)
        assert out.dtype == torch.float32 and new.dtype == torch.float32 and new.shape == (2, h, w, geo.p)
        if logits is not None:
            assert new is logits            # updated in place
        logits = new
        _close(out, ref, 1e-5)
        dense_in_compact, ok = _compact_of_dense(ref_logits, h, w, geo)
        _close(logits[:, ok], dense_in_compact[:, ok], 1e-6)
    # The last step reads the carry without writing it.
    before = logits.clone()
    out = tw(q, k, v, geo, norm, prev_logits=logits)
    torch.testing.assert_close(logits, before, rtol=0, atol=0, equal_nan=True)    # unwritten slots: any bits


@pytest.mark.parametrize('h,w,ws,border,norm', [
    (6, 7, 3, 'exclude', 'softmax'),
    (7, 6, 5, 'circular', 'softmax'),
    (5, 4, 9, 'exclude', 'count'),
    (6, 6, 3, 'circular', 'count'),
])
def test_gradients_over_three_steps_match_dense(h, w, ws, border, norm, triton_device):
    """Backward through three steps (the first writes the carry, the second updates it, the last only reads it):
    gradients of q, k, v of every step and of a leaf carried in at the first step, as the dense oracle's autograd."""
    dev, geo = triton_device, window_geometry(h, w, ws, border)
    steps = [[_rand(2, h, w, n, device=dev, grad=True) for n in (3, 3, 4)] for _ in range(3)]
    prev0 = _rand(2, h, w, geo.p, device=dev, grad=True)
    weight = _rand(2, h, w, 4, device=dev)
    # The dense reference carries prev0 as dense logits: scattered to the window entries.
    ok = _compact_of_dense(torch.zeros(1, h * w, h * w, device=dev), h, w, geo)[1]
    loss_ref, lg = 0., None
    for i, (q, k, v) in enumerate(steps):
        carried = lg if i else _dense_of_compact(prev0.double(), h, w, geo)
        o, lg = dense_attention_reference(q.double(), k.double(), v.double(), ws, border, norm, prev_logits=carried)
        loss_ref = loss_ref + (o * weight.double()).sum()
    flat = [t for s in steps for t in s] + [prev0]
    g_ref = torch.autograd.grad(loss_ref, flat)
    loss, lg = 0., prev0
    for i, (q, k, v) in enumerate(steps):
        last = i == len(steps) - 1
        res = tw(q, k, v, geo, norm, prev_logits=lg, return_logits=not last)
        o, lg = (res, lg) if last else res
        loss = loss + (o * weight).sum()
    assert prev0.grad is None and not torch.equal(lg, prev0)     # the leaf was copied, not updated
    g = torch.autograd.grad(loss, flat)
    for a, b in zip(g[:-1], g_ref[:-1]):
        _close(a, b, 1e-5)
    _close(g[-1][:, ok], g_ref[-1][:, ok], 1e-5)


def _dense_of_compact(lc, h, w, geo):
    """Compact (B, H, W, P) logits scattered to dense (B, N, N) (entries outside the window 0)."""
    dev = lc.device
    zeros = torch.zeros(lc.shape[0], h * w, h * w, dtype=lc.dtype, device=dev)
    idx = torch.arange(h * w * h * w, device=dev, dtype=torch.float64).view(1, h * w, h * w)
    pos, ok = _compact_of_dense(idx, h, w, geo)
    flat = zeros.view(lc.shape[0], -1)
    src = torch.where(ok, lc, torch.zeros((), dtype=lc.dtype, device=dev)).reshape(lc.shape[0], -1)
    index = pos.long().reshape(1, -1).expand(lc.shape[0], -1)
    return flat.scatter_add(1, index, src).view_as(zeros)     # out-of-image slots add 0


def test_non_contiguous_inputs(triton_device):
    dev, geo = triton_device, window_geometry(9, 10, 5, 'exclude')
    q, k = (_rand(2, 3, 9, 10, device=dev).permute(0, 2, 3, 1) for _ in range(2))      # channels-first memory
    v = _rand(2, 10, 9, 4, device=dev).transpose(1, 2)
    prev = _rand(2, 9, 10, geo.p, device=dev)
    prev_nc = prev.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (q.is_contiguous() or v.is_contiguous() or prev_nc.is_contiguous())
    ref = tw(q.contiguous(), k.contiguous(), v.contiguous(), geo, 'softmax', prev_logits=prev.clone())
    out, logits = tw(q, k, v, geo, 'softmax', prev_logits=prev_nc, return_logits=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    q64, k64, v64 = q.double(), k.double(), v.double()
    full, _ = dense_attention_reference(q64, k64, v64, 5, prev_logits=_dense_of_compact(prev.double(), 9, 10, geo))
    _close(out, full, 1e-5)


def test_bf16_autocast_keeps_fp32_logits(triton_device):
    """Under autocast the kernel takes bf16 q, k, v, keeps the carried logits fp32 and matches the oracle under the
    same autocast (same precision rule) to bf16 accuracy."""
    from nl_plugin.ops.amp import to_compute
    dev, geo = triton_device, window_geometry(8, 9, 5, 'exclude')
    q, k, v = (_rand(1, 8, 9, n, device=dev) for n in (16, 16, 16))
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        qb, kb, vb = (to_compute(t) for t in (q, k, v))
        assert qb.dtype == torch.bfloat16
        out, logits = tw(qb, kb, vb, geo, 'softmax', return_logits=True)
        ref, _ = dense_attention_reference(q, k, v, 5)
    assert out.dtype == torch.bfloat16 and logits.dtype == torch.float32
    _close(out, ref, 1e-2)
    full, _ = dense_attention_reference(q.double(), k.double(), v.double(), 5)
    _close(out, full, 3e-2)


def test_bf16_autocast_gradients(triton_device):
    """Two steps under bf16 autocast, backward: the gradients as the oracle's under the same autocast."""
    from nl_plugin.ops.amp import to_compute
    dev, geo = triton_device, window_geometry(7, 8, 5, 'circular')
    steps = [[_rand(1, 7, 8, 16, device=dev, grad=True) for _ in range(3)] for _ in range(2)]
    grads = []
    for kernel in ('triton', 'reference'):
        loss, lg = 0., None
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            for i, (q, k, v) in enumerate(steps):
                if kernel == 'triton':
                    qb, kb, vb = (to_compute(t) for t in (q, k, v))
                    res = tw(qb, kb, vb, geo, 'softmax', prev_logits=lg, return_logits=i == 0)
                    o, lg = res if i == 0 else (res, lg)
                else:
                    o, lg = dense_attention_reference(q, k, v, 5, 'circular', prev_logits=lg)
                loss = loss + o.float().square().sum()
        grads.append(torch.autograd.grad(loss, [t for s in steps for t in s]))
    for a, b in zip(*grads):
        assert a.dtype == torch.float32
        _close(a, b, 3e-2)


def test_training_keeps_one_carry_buffer(triton_device):
    """With autograd the steps update one logit buffer in place and save no logit-sized tensor for the backward:
    the forward holds one carried-logit tensor whatever the number of steps (the backward adds its gradient)."""
    dev, geo = triton_device, window_geometry(7, 9, 5, 'exclude')
    v = _rand(2, 7, 9, 4, device=dev, grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    lg, buffers = None, set()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for t in range(4):
            q, k = _rand(2, 7, 9, 3, device=dev, grad=True), _rand(2, 7, 9, 3, device=dev, grad=True)
            out, lg = tw(q, k, v, geo, 'softmax', prev_logits=lg, return_logits=True)
            buffers.add(lg.data_ptr())
    assert len(buffers) == 1 and lg.numel() == 2 * 7 * 9 * geo.p
    assert saved and max(saved) < lg.numel() // 4
    out.sum().backward()
    assert v.grad is not None


def test_a_second_backward_is_refused(triton_device):
    """The backward rewinds the carried logits in place: a second pass over the same graph would read the wrong
    logits, so it raises instead."""
    dev, geo = triton_device, window_geometry(6, 7, 3, 'exclude')
    q, k, v = (_rand(1, 6, 7, n, device=dev, grad=True) for n in (3, 3, 4))
    o1, lg = tw(q, k, v, geo, 'softmax', return_logits=True)
    o2, lg = tw(q * 2, k, v, geo, 'softmax', prev_logits=lg, return_logits=True)
    loss = (o1.sum() + o2.sum()) * 1.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='second backward'):
        loss.backward()


def test_a_kernel_that_does_not_compile_falls_back_to_the_halo_kernels(triton_device, monkeypatch, caplog):
    """A GPU whose Triton cannot build the kernel for some widths (e.g. out of shared memory): one warning, then
    the halo kernels run those steps, same layout and result."""
    import logging

    from triton.runtime.errors import OutOfResources

    from nl_plugin.ops.nlrn_attention import propagated_attention
    calls = []

    def broken(fn, device):
        calls.append(fn.__name__)
        raise OutOfResources(300000, 232448, 'shared memory')
    monkeypatch.setattr(triton_window, '_compiled', broken)
    monkeypatch.setattr(triton_window, '_FAILED', set())
    monkeypatch.setattr(triton_window, 'FALLBACK_DEVICES', (triton_device.type, ))
    v = _rand(1, 9, 10, 4, device=triton_device)
    state = ref_logits = None
    with caplog.at_level(logging.WARNING, logger='nl_plugin'):
        for _ in range(3):
            q, k = _rand(1, 9, 10, 3, device=triton_device), _rand(1, 9, 10, 3, device=triton_device)
            out, state = propagated_attention(q, k, v, state, 5, attention_kernel='triton')
            ref, ref_logits = dense_attention_reference(q, k, v, 5, prev_logits=ref_logits)
            _close(out, ref, 1e-5)
    assert calls == ['_fwd_kernel'] and caplog.text.count('halo kernels run instead') == 1
    assert 'shared memory' in caplog.text


def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    q = torch.randn(1, 5, 5, 3)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        tw(q, q, q, window_geometry(5, 5, 3, 'exclude'), 'softmax')


# ---- attention_kernel and the router -------------------------------------------------------------------------

_CUDA = torch.device('cuda')


def test_attention_kernel_values_are_checked():
    from nl_plugin.archs.nlrn_arch import NLRN
    from nl_plugin.archs.windowed_nonlocal_arch import WindowedNonLocalBlock
    with pytest.raises(ValueError, match=r"one of \('auto', 'triton', 'flex', 'halo', 'dense'\), got 'trition' "
                                         r"\(did you mean 'triton'\?\)"):
        NLRN(num_feat=8, num_embed=4, num_steps=2, nl_scope='window', window_size=5, attention_kernel='trition')
    with pytest.raises(ValueError, match="'flex' is a window-scope kernel"):
        WindowedNonLocalBlock(8, 4, nl_scope='global', attention_kernel='flex')
    assert WindowedNonLocalBlock(8, 4, nl_scope='global', attention_kernel='dense').attention_kernel == 'dense'


def test_auto_takes_the_triton_step_on_cuda(monkeypatch, caplog):
    """On CUDA 'auto' runs the window scope on the Triton step (training and inference, both normalisations)
    while its carried logits fit (twice over in training); small training images keep their dense kernels,
    a carry of embeddings or too little memory goes to FlexAttention; the CPU's routes do not change."""
    import logging

    from nl_plugin.ops.nlrn_attention import Kernel, Layout, flex, router
    free = {'bytes': 64 * 2**30}
    monkeypatch.setattr(router, '_available_memory_bytes', lambda device: free['bytes'])
    monkeypatch.setattr(router, '_triton_applies', lambda device: device.type == 'cuda')
    monkeypatch.setattr(flex, 'available', lambda: True)
    args = dict(window_size=45, border='exclude', normalization='softmax', element_size=4, device=_CUDA,
                carried=None, propagate=True)
    cases = [
        (dict(grad=False, shape=(1, 768, 1024)), (Kernel.TRITON, Layout.IMAGE)),
        (dict(grad=True, shape=(16, 96, 96)), (Kernel.TRITON, Layout.IMAGE)),
        (dict(grad=False, shape=(1, 321, 481), normalization='count'), (Kernel.TRITON, Layout.IMAGE)),
        (dict(grad=False, shape=(1, 321, 481), carried=Layout.IMAGE), (Kernel.TRITON, Layout.IMAGE)),
        (dict(grad=False, shape=(1, 321, 481), carried=Layout.IMAGE, propagate=False), (Kernel.TRITON, None)),
        (dict(grad=True, shape=(16, 43, 43)), (Kernel.DENSE_LOGITS, Layout.DENSE)),
        (dict(grad=True, shape=(32, 43, 43)), (Kernel.MASKED_SDPA, Layout.EMBEDDINGS)),
        (dict(grad=False, shape=(1, 321, 481), carried=Layout.EMBEDDINGS), (Kernel.FLEX, Layout.TOKENS)),
        (dict(grad=False, shape=(1, 321, 481), device=torch.device('cpu')), (Kernel.STRIPS, Layout.BLOCKS)),
    ]
    with caplog.at_level(logging.DEBUG, logger='nl_plugin'):
        for kw, expected in cases:
            assert tuple(router.route_step(**dict(args, **kw))) == expected, kw
    assert 'step -> triton, carry image (attention_kernel auto' in caplog.text
    window = dict(grad=True, normalization='softmax', pixels=96 * 96, prev_logits=True, return_logits=True)
    assert router.route_window(**window, device=_CUDA) is Kernel.TRITON
    assert router.route_window(**window, device=torch.device('cpu')) is Kernel.HALO
    net = dict(grad=False, training=False, window_size=45, border='exclude', height=768, width=1024)
    assert router.route_network(**net, device=_CUDA) is None                    # 5.9 GiB of logits: whole image
    assert router.route_network(**net, device=_CUDA, logit_memory=5 * 2**30) is Kernel.BANDS
    assert router.route_network(**dict(net, height=2160, width=3840), device=_CUDA) is Kernel.BANDS    # 67 GB
    assert router.band_kernel('auto', _CUDA) is Kernel.TRITON and router.band_kernel('auto', torch.device('cpu')) \
        is Kernel.STRIPS
    free['bytes'] = 2 * 2**30       # 16 x 96 x 96 training: 2 x 1.2 GB of logits do not fit in 40% of 2 GB
    assert tuple(router.route_step(**dict(args, grad=True, shape=(16, 96, 96)))) == (Kernel.FLEX, Layout.TOKENS)
    assert router.route_network(**net, device=torch.device('cpu')) is Kernel.BANDS


def test_every_step_honours_the_logit_memory_the_network_streams_by(monkeypatch, caplog):
    """``logit_memory`` (NLRN's ``logit_memory_gb``) is the ceiling of the carried logits in the per-step route as in
    ``route_network``: above the default share, a whole-image run keeps the Triton step carrying logits; below it,
    steps carry embeddings. The NLRN passes its ceiling down to every step."""
    import logging

    from nl_plugin.archs.nlrn_arch import NLRN
    from nl_plugin.ops.nlrn_attention import Kernel, Layout, flex, router
    monkeypatch.setattr(router, '_available_memory_bytes', lambda device: 8 * 2**30)     # default ceiling 3.2 GiB
    monkeypatch.setattr(router, '_triton_applies', lambda device: device.type == 'cuda')
    monkeypatch.setattr(flex, 'available', lambda: True)
    net = dict(grad=False, training=False, window_size=45, border='exclude', height=768, width=1024, device=_CUDA)
    step = dict(window_size=45, border='exclude', normalization='softmax', grad=False, shape=(1, 768, 1024),
                element_size=4, device=_CUDA, carried=None, propagate=True)        # 5.9 GiB of window logits
    assert router.route_network(**net) is Kernel.BANDS
    assert tuple(router.route_step(**step)) == (Kernel.FLEX, Layout.TOKENS)
    ceiling = 7 * 2**30
    assert router.route_network(**net, logit_memory=ceiling) is None            # the whole image, so ...
    assert tuple(router.route_step(**step, logit_memory=ceiling)) == (Kernel.TRITON, Layout.IMAGE)
    training = dict(step, grad=True, shape=(16, 96, 96))                        # 2 x 1.2 GiB
    assert tuple(router.route_step(**training, logit_memory=2 * 2**30)) == (Kernel.FLEX, Layout.TOKENS)
    cpu = dict(step, device=torch.device('cpu'))
    assert tuple(router.route_step(**cpu, logit_memory=ceiling)) == (Kernel.STRIPS, Layout.BLOCKS)
    assert tuple(router.route_step(**cpu, logit_memory=2**30)) == (Kernel.STRIPS, Layout.EMBEDDINGS)
    assert tuple(router.route_step(**cpu, logit_memory=2**30, attention_kernel='halo')) == \
        (Kernel.STRIPS, Layout.EMBEDDINGS)
    model = NLRN(num_feat=8, num_embed=4, num_steps=2, nl_scope='window', window_size=5, logit_memory_gb=1e-9).eval()
    model.stream_inference = False
    with caplog.at_level(logging.DEBUG, logger='nl_plugin'), torch.no_grad():
        model(torch.rand(1, 1, 12, 13))
    assert 'step -> strips, carry embeddings' in caplog.text and 'carry blocks' not in caplog.text


def test_forced_kernels(monkeypatch):
    from nl_plugin.ops.nlrn_attention import Kernel, Layout, router
    monkeypatch.setattr(router, '_available_memory_bytes', lambda device: 64 * 2**30)
    args = dict(window_size=7, border='exclude', normalization='softmax', grad=False, shape=(1, 40, 50),
                element_size=4, device=torch.device('cpu'), carried=None, propagate=True)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(ValueError, match='only under Triton.s interpreter: set TRITON_INTERPRET=1'):
        router.route_step(**args, attention_kernel='triton')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert tuple(router.route_step(**args, attention_kernel='triton')) == (Kernel.TRITON, Layout.IMAGE)
    assert tuple(router.route_step(**args, attention_kernel='dense')) == (Kernel.DENSE_LOGITS, Layout.DENSE)
    assert tuple(router.route_step(**args, attention_kernel='halo')) == (Kernel.STRIPS, Layout.BLOCKS)
    assert tuple(router.route_step(**dict(args, grad=True), attention_kernel='halo')) == (Kernel.HALO, Layout.IMAGE)
    with pytest.raises(ValueError, match="'flex' needs .* softmax"):
        router.route_step(**dict(args, normalization='count'), attention_kernel='flex')
    with pytest.raises(ValueError, match="'triton' carries image-layout logits, got a tokens state"):
        router.route_step(**dict(args, carried=Layout.TOKENS), attention_kernel='triton')


@pytest.mark.parametrize('training', [False, True])
def test_nlrn_on_the_triton_step_matches_the_default_route(training, triton_device):
    """A small window-scope NLRN with attention_kernel='triton' == the same network on its default kernels:
    output and, in training, every parameter's gradient (the Triton backward through the rewound carry)."""
    from nl_plugin.archs.nlrn_arch import NLRN
    dev = triton_device
    torch.manual_seed(0)
    nets = [NLRN(num_feat=8, num_embed=4, num_steps=3, nl_scope='window', window_size=5,
                 attention_kernel=kernel).to(dev) for kernel in ('auto', 'triton')]
    nets[1].load_state_dict(nets[0].state_dict())
    for blk in (*nets[0].nonlocal_blocks, *nets[1].nonlocal_blocks):
        torch.manual_seed(1)
        torch.nn.init.normal_(blk.g.weight, std=0.3)
    x = torch.rand(2, 1, 11, 13, device=dev)
    outs, grads = [], []
    for net in nets:
        net.train(training)
        with torch.set_grad_enabled(training):
            out = net(x)
        outs.append(out)
        if training:
            out.square().mean().backward()
            # one vector: the biases of the convs before a BatchNorm have gradients of rounding size only
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    _close(outs[1], outs[0], 1e-5)
    if training:
        _close(grads[1], grads[0], 1e-5)


@pytest.mark.parametrize('norm', ['softmax', 'count'])
def test_bands_of_rows_match_the_whole_image(norm, triton_device):
    """``triton_window_rows`` on a band with its keys' reach == those rows of the whole-image step, carry included."""
    dev, h, w, ws = triton_device, 19, 9, 7
    geo = window_geometry(h, w, ws, 'exclude')
    qs, ks = [_rand(2, h, w, 3, device=dev) for _ in range(2)], [_rand(2, h, w, 3, device=dev) for _ in range(2)]
    v = _rand(2, h, w, 4, device=dev)
    full1, lg = tw(qs[0], ks[0], v, geo, norm, return_logits=True)
    full2 = tw(qs[1], ks[1], v, geo, norm, prev_logits=lg)
    for a, e in ((0, 5), (5, 13), (13, 19)):
        lo, hi = max(a - geo.py, 0), min(e + geo.py, h)
        o1, blg = triton_window.triton_window_rows(qs[0][:, a:e], ks[0][:, lo:hi], v[:, lo:hi], a - lo, geo, norm,
                                                   return_logits=True)
        o2 = triton_window.triton_window_rows(qs[1][:, a:e], ks[1][:, lo:hi], v[:, lo:hi], a - lo, geo, norm,
                                              prev_logits=blg)
        torch.testing.assert_close(o1, full1[:, a:e], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(o2, full2[:, a:e], rtol=1e-6, atol=1e-6)


def test_nlrn_streams_bands_through_the_triton_step(triton_device, monkeypatch):
    """Window-scope inference whose logits exceed ``logit_memory_gb`` streams bands of rows with the Triton step
    inside: the same output as every step on the whole image."""
    from nl_plugin.archs import nlrn_stream
    from nl_plugin.archs.nlrn_arch import NLRN
    from nl_plugin.ops.nlrn_attention import router
    dev = triton_device
    monkeypatch.setattr(nlrn_stream, '_TRITON_BAND', 16)        # three bands on 40 rows
    net = NLRN(num_feat=8, num_embed=4, num_steps=3, nl_scope='window', window_size=5, attention_kernel='triton',
               logit_memory_gb=1e-6).to(dev).eval()
    for blk in net.nonlocal_blocks:
        torch.nn.init.normal_(blk.g.weight, std=0.3)
    x = torch.rand(1, 1, 40, 13, device=dev)
    assert router.route_network(grad=False, training=False, window_size=5, border='exclude', height=40, width=13,
                                device=dev, attention_kernel='triton', logit_memory=1000) is router.Kernel.BANDS
    calls = []
    monkeypatch.setattr(nlrn_stream, 'triton_window_rows',
                        lambda *a, **kw: calls.append(a[3]) or triton_window.triton_window_rows(*a, **kw))
    with torch.no_grad():
        streamed = net(x)
        assert len(calls) == 3 * 3           # three bands at each of the three steps
        net.stream_inference = False
        whole = net(x)
    _close(streamed, whole, 1e-5)      # the banded convs round differently


def test_the_launch_configuration_sweep_runs_under_the_interpreter():
    """``scripts/triton_window_sweep.py --quick``: two configurations of the kernel, the same output."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'triton_window_sweep.py'), '--quick',
                        '--configs', '8x16x8', '4x8x4'], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert '8x16x8' in r.stdout and '4x8x4' in r.stdout and 'max rel diff' in r.stdout
