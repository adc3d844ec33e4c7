"""Every architecture and block under ``torch.autocast`` (bf16 on the CPU) against fp32, and the quantities the
precision rules keep in fp32 (NLRN carried logits, N3 distances / temperatures / log-weights, BN statistics).

Tolerances. bf16 keeps 8 significant bits: rounding a value changes it by at most u = 2^-8 (relative). A layer
under autocast rounds its inputs and its output once each, so it adds a relative error of about u; errors of
L layers are independent and add in quadrature, about u * sqrt(L). The forward tolerances below are
4 * u * sqrt(L) (L = layers whose products run in bf16), about 2x above the largest error measured over these
tests; gradients pass every layer twice (2L roundings) and get 4 * u * sqrt(2L).
"""
import copy
import math

import pytest
import torch
from torch import nn

from nl_plugin.archs import nlrn_stream
from nl_plugin.archs.dncnn_arch import DnCNN
from nl_plugin.archs.n3block_arch import N3Block, N3SetBlock
from nl_plugin.archs.n3net_arch import N3Net
from nl_plugin.archs.nlrn_arch import NLRN
from nl_plugin.archs.vdsr_arch import VDSR
from nl_plugin.archs.windowed_nonlocal_arch import CORRELATIONS, WindowedNonLocalBlock
from nl_plugin.ops import n3 as n3ops
from nl_plugin.ops import nlrn_attention as na

U = 2.0**-8
BF16 = torch.bfloat16

pytestmark = pytest.mark.usefixtures('one_thread')


def tol(layers, passes=1, u=U):
    return 4 * u * math.sqrt(layers * passes)


def rel_err(a, b, ref=None):
    ref = b if ref is None else ref
    return float((a.detach().float() - b.detach().float()).norm() / ref.detach().float().norm())


def autocast(dtype=BF16, device_type='cpu'):
    return torch.autocast(device_type, dtype=dtype)


def settle(net, x, steps=3):
    """Trained-like BN statistics: running averages over a few batches (eval mode then normalises)."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(steps):
            net(x + 0.05 * torch.randn_like(x))
    return net.eval()


def live_attention(net):
    """NLRN's g starts at zero (the non-local term is off at init): give it weights so that it counts."""
    for m in net.modules():
        if isinstance(m, WindowedNonLocalBlock):
            nn.init.normal_(m.g.weight, 0.0, 0.2)
    return net


def smooth_images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, h // 4 + 1, w // 4 + 1, generator=g)
    return nn.functional.interpolate(x, size=(h, w), mode='bilinear', align_corners=False)


def both(net, x, dtype=BF16):
    with torch.no_grad():
        y = net(x)
        with autocast(dtype, x.device.type):
            yb = net(x)
    return y, yb


def _train(net, clean, steps=40):
    """A few Adam steps of denoising (sigma 0.1), then settled BN statistics: a small trained network."""
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    net.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(clean + 0.1 * torch.randn_like(clean)) - clean)**2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.7 * losses[0], losses      # it learnt something
    return settle(net, clean)


# img_range 1: from NLRN's official start (0..255 inside, output = input) 40 steps of Adam at 2e-3 learn too
# little to call the network trained; bf16's rounding is relative, so the pixel scale does not change it
NLRN_SMALL = dict(num_feat=16, num_embed=8, num_steps=3, img_range=1.0)
# name -> (builder, test image (h, w), layers whose products run in bf16)
NETWORKS = {
    'dncnn17': (lambda: DnCNN(num_feat=32, depth=17, bn_momentum=0.1), (64, 72), 17),
    'vdsr20': (lambda: VDSR(num_feat=32, depth=20), (64, 72), 20),
    'n3net': (lambda: N3Net(num_feat=16, depth=4, k=3, embed_feat=8, bn_momentum=0.1), (64, 72), 3 * 4 + 2 * 5),
    'nlrn_global': (lambda: NLRN(**NLRN_SMALL), (30, 34), 3 * 7 + 2),
    # whole-image window steps (image under 4 windows), and the streamed bands of rows (image over 4 windows)
    'nlrn_window': (lambda: NLRN(**NLRN_SMALL, nl_scope='window', window_size=9), (30, 34), 3 * 7 + 2),
    'nlrn_window_stream': (lambda: NLRN(**NLRN_SMALL, nl_scope='window', window_size=9), (64, 72), 3 * 7 + 2),
}
_TRAINED = {}


def trained(name):
    if name not in _TRAINED:
        torch.manual_seed(0)
        _TRAINED[name] = _train(NETWORKS[name][0](), smooth_images(4, 24, 24))
    return copy.deepcopy(_TRAINED[name])


@pytest.mark.parametrize('dtype', [BF16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('name', list(NETWORKS))
def test_trained_network_under_autocast_matches_fp32(name, dtype, device, monkeypatch):
    """bf16 and fp16 inference of a small trained network (trained on the CPU), on each device, within the
    tolerance of its layer count; fp16 rounds to 11 bits (u = 2^-11). On CUDA the window scope runs
    FlexAttention on the whole image instead of bands. The PSNR cost on the demo photos:
    scripts/precision_report.py."""
    net = trained(name).to(device)
    _, (h, w), layers = NETWORKS[name]
    clean = smooth_images(1, h, w, seed=1).to(device)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2)).to(device)
    seen = []
    banded = name.endswith('stream') and device.type == 'cpu'
    if banded:     # bands of rows: the row convs are functional, watch the banded attention
        inner = nlrn_stream.window_attention_rows

        def spy(q, *args, **kw):
            res = inner(q, *args, **kw)
            seen.append((q.dtype, res[1].dtype if isinstance(res, tuple) else None))
            return res
        monkeypatch.setattr(nlrn_stream, 'window_attention_rows', spy)
    else:
        first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        first.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    y, yb = both(net, noisy, dtype)
    if banded:     # low-precision embeddings, fp32 carried logits
        assert seen and (dtype, torch.float32) in seen and all(s[0] == dtype for s in seen[len(seen) // 2:])
    else:
        assert seen == [torch.float32, dtype]    # autocast really ran the convs in the low precision
    assert yb.dtype == torch.float32         # the residual output adds the fp32 input
    assert rel_err(yb, y, y - noisy) < tol(layers, u=U if dtype == BF16 else 2.0**-11)


@pytest.mark.parametrize('correlation', sorted(CORRELATIONS))
@pytest.mark.parametrize('scope', ['global', 'window'])
def test_windowed_nonlocal_block_under_autocast(correlation, scope):
    blk = live_attention(WindowedNonLocalBlock(16, 8, correlation=correlation, nl_scope=scope, window_size=7))
    x = torch.relu(torch.randn(2, 16, 20, 22))
    state = state_low = None
    for _ in range(3):      # propagated correlation: three steps, each precision carrying its own state
        with torch.no_grad():
            y, state = blk(x, state, return_state=True)
            with autocast():
                yb, state_low = blk(x, state_low, return_state=True)
        assert rel_err(yb, y, y - x) < tol(4 * 3)
        if state_low.logits is not None:
            assert state_low.logits.dtype == torch.float32


@pytest.mark.parametrize('selection', ['n3', 'concrete'])
@pytest.mark.parametrize('impl', ['auto', 'reference'])
@pytest.mark.parametrize('train', [False, True])
def test_n3block_under_autocast(selection, impl, train, monkeypatch):
    torch.manual_seed(0)
    blk = N3Block(num_in_ch=4, k=3, embed_feat=8, selection=selection, impl=impl)
    x = torch.randn(2, 4, 36, 40)
    blk = settle(blk, x).train(train)
    seen = []
    inner = n3ops.neighbour_weights

    def spy(logits, temperature=None, noise=None, **kw):
        w = inner(logits, temperature, noise, **kw)
        seen.append((logits.dtype, w.dtype))
        return w
    monkeypatch.setattr(n3ops, 'neighbour_weights', spy)
    with torch.no_grad():
        torch.manual_seed(1)
        y = blk(x)
        with autocast():
            torch.manual_seed(1)       # same Concrete noise
            yb = blk(x)
    assert yb.dtype == torch.float32
    # embedding CNN (3 convs), distance and aggregation products
    assert rel_err(yb[:, 4:], y[:, 4:]) < tol(5)
    assert torch.equal(yb[:, :4], x)
    assert seen and all(dt == (torch.float32, torch.float32) for dt in seen)   # logits and log-weights fp32


def test_n3block_hard_knn_under_autocast_picks_near_nearest_neighbours():
    """Hard k-NN is discontinuous: bf16 distance products may swap candidates whose distances differ by less
    than their rounding (2u |q||u| per product). The chosen neighbours' true distances must stay within that."""
    torch.manual_seed(0)
    emb = torch.randn(1, 11 * 12, 20)
    plan = n3ops.make_tile_plan(11, 12, 5)
    d32 = n3ops.tiled_patch_sqdist(emb, plan)
    with autocast():
        d16 = n3ops.tiled_patch_sqdist(emb, plan)
    assert d16.dtype == torch.float32
    sq = emb.pow(2).sum(-1)
    bound = 4 * U * (sq.max() + sq.max())
    assert (d16 - d32).abs().max() <= bound
    k = 4
    pick = torch.topk(d16, k, largest=False).indices
    true_kth = torch.topk(d32, k, largest=False).values[..., -1:]
    assert (d32.gather(-1, pick) <= true_kth + 2 * bound).all()
    blk = N3Block(num_in_ch=2, k=3, selection='knn').eval()
    xx = torch.randn(1, 2, 30, 33)
    with torch.no_grad(), autocast():
        out = blk(xx)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_n3_precision_kept_quantities_are_fp32():
    """Distances, temperatures and the k-NN relaxation are fp32 under autocast whatever the inputs' dtype."""
    emb = torch.randn(1, 9 * 10, 12).to(BF16)
    plan = n3ops.make_tile_plan(9, 10, 5)
    index = n3ops.candidate_index(9, 10, 5)
    with autocast():
        d = n3ops.tiled_patch_sqdist(emb, plan)
        d_ref = n3ops.patch_sqdist(emb, emb, index)
        temp = n3ops.patch_temperature(torch.randn(1, 1, 50, 55).to(BF16), 10, 5)
        w = n3ops.continuous_knn(-d.to(BF16), 3)
    assert d.dtype == d_ref.dtype == temp.dtype == w.dtype == torch.float32
    # both are distances of the bf16 embedding, in fp32
    sq = emb.float().pow(2).sum(-1)
    assert (d - d_ref).abs().max() <= 4 * U * sq.max()
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_n3_distance_products_run_in_fp32_under_autocast():
    """The products q.u that decide the neighbours run in fp32 on the embedding as given: under bf16 autocast the
    distances equal the fp32 ones to fp32 rounding (bf16 products were 2^-8 of |q||u| off and cost the released
    N3Net weights up to 0.056 dB per image)."""
    torch.manual_seed(0)
    emb = (3 + torch.randn(1, 10 * 11, 800)).to(BF16).float()  # large norms, close pairs: d << |q|^2
    plan = n3ops.make_tile_plan(10, 11, 7)
    d32 = n3ops.tiled_patch_sqdist(emb, plan)
    with autocast():
        d = n3ops.tiled_patch_sqdist(emb, plan)
        d_ref = n3ops.patch_sqdist(emb, emb, n3ops.candidate_index(10, 11, 7))
    sq = emb.pow(2).sum(-1).max()
    assert (d - d32).abs().max() <= 64 * 2.0**-24 * sq  # fp32 rounding of |q|^2 + |u|^2 - 2 q.u
    assert (d_ref - d32).abs().max() <= 64 * 2.0**-24 * sq
    assert (d - d32).abs().max() < 2.0**-8 * sq / 16  # far below one bf16 rounding of q.u


def test_n3_distances_under_fp16_do_not_overflow():
    """fp16 ends at 65504: the distance products run in fp32 under autocast, so large embeddings do not overflow."""
    emb = 300 * torch.randn(1, 8 * 9, 40)        # |q|^2 ~ 4e6
    plan = n3ops.make_tile_plan(8, 9, 5)
    d32 = n3ops.tiled_patch_sqdist(emb, plan)
    with torch.autocast('cpu', dtype=torch.float16):
        d16 = n3ops.tiled_patch_sqdist(emb, plan)
    assert torch.isfinite(d16).all() and d16.dtype == torch.float32
    assert rel_err(d16, d32) < 4 * 2.0**-11 * math.sqrt(40)


def test_n3set_block_under_autocast():
    blk = N3SetBlock(6, k=3).eval()
    x = torch.randn(2, 30, 6)
    y, yb = both(blk, x)
    assert yb.dtype == torch.float32 and rel_err(yb[..., 6:], y[..., 6:]) < tol(5)


@pytest.mark.parametrize('window_size', [None, 7])
@pytest.mark.parametrize('grad', [False, True])
def test_nlrn_carried_logits_stay_fp32(window_size, grad):
    """The running sum of the correlation logits is fp32 in every carried layout; the embeddings and the
    output are in the autocast dtype; three propagated steps match fp32."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, 13, c, requires_grad=grad) for c in (8, 8, 16))
    outs = {}
    for low in (False, True):
        with torch.set_grad_enabled(grad), torch.autocast('cpu', dtype=BF16, enabled=low):
            state, res = None, []
            for t in range(3):
                out, state = na.propagated_attention(q * (1 + 0.2 * t), k, v, state, window_size=window_size)
                res.append(out)
                if low and state.logits is not None:
                    assert state.logits.dtype == torch.float32
                if low and state.q is not None:
                    assert state.q.dtype == BF16
            outs[low] = res
        if low:
            assert all(o.dtype == BF16 for o in res)
    for a, b in zip(outs[True], outs[False]):
        assert rel_err(a, b) < tol(2 * 3)
    with torch.no_grad(), autocast():
        _, logits = na.window_attention(q, k, v, 5, return_logits=True)
        _, ref_logits = na.dense_attention_reference(q, k, v, 5)
    assert logits.dtype == ref_logits.dtype == torch.float32


@pytest.mark.parametrize('name', ['nlrn_window', 'n3net'])
def test_training_step_under_autocast_matches_fp32(name, device):
    """Gradients of one training step (fp32 loss on the fp32 output) and the BN statistics it updates, in
    bf16 on each device."""
    net = trained(name).to(device).train()
    layers = NETWORKS[name][2]
    x = smooth_images(4, 40, 40, seed=3).to(device)
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(device)
    grads, bn = {}, {}
    state = copy.deepcopy(net.state_dict())
    for low in (False, True):
        net.load_state_dict(state)
        net.zero_grad()
        with torch.autocast(device.type, dtype=BF16, enabled=low):
            out = net(noisy)
        ((out.float() - x)**2).mean().backward()
        grads[low] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        bn[low] = [m.running_var.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert grads[True].dtype == torch.float32
    assert rel_err(grads[True], grads[False]) < tol(layers, passes=2)
    for a, b in zip(bn[True], bn[False]):     # BN statistics: fp32 buffers, batch statistics of bf16 inputs
        assert a.dtype == torch.float32 and rel_err(a, b) < tol(layers)


@pytest.mark.parametrize('name', list(NETWORKS))
def test_output_layer_runs_in_fp32_under_autocast(name, monkeypatch):
    """The conv that writes the output (the residual added to the input) runs in fp32 under autocast
    (``ops.amp.full_precision``), the other convs in the autocast dtype."""
    net = NETWORKS[name][0]().eval()
    x = smooth_images(1, *NETWORKS[name][1])
    seen = []
    if name.endswith('stream'):          # the row convs of the bands call F.conv2d with weights cast once
        conv2d = nlrn_stream.F.conv2d

        def spy(t, w, *args, **kw):
            seen.append((w.shape[0] == 1, w.dtype))      # conv_last is the one conv with 1 output channel
            return conv2d(t, w, *args, **kw)
        monkeypatch.setattr(nlrn_stream.F, 'conv2d', spy)
    else:
        # N3Net: every stage is a residual DnCNN, whose last conv writes the stage's output
        last = [st.conv_last for st in net.stages] if name == 'n3net' else [net.conv_last]
        for m in net.modules():
            if isinstance(m, nn.Conv2d):      # autocast makes a conv's output its dtype; fp32 only without it
                m.register_forward_hook(lambda m, i, o: seen.append((any(m is c for c in last), o.dtype)))
    with torch.no_grad(), autocast():
        net(x)
    assert any(is_last for is_last, _ in seen)
    assert all(dtype == (torch.float32 if is_last else BF16) for is_last, dtype in seen), seen
