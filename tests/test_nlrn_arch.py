"""NLRN architecture: parameter count, scopes, ablation options, YAML build, a few training steps."""
import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from nl_plugin.archs.nlrn_arch import NLRN
from nl_plugin.archs.windowed_nonlocal_arch import CORRELATIONS, WindowedNonLocalBlock
from nl_plugin.ops.tiling import tiled_forward


def _counts(net):
    bn = sum(p.numel() for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    total = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return total - bn, total


def _tiny(device='cpu', **kw):
    # img_range 1: the references below work on the interface's scale (scaling: test_training_fidelity.py)
    args = dict(num_feat=8, num_embed=4, num_steps=3, img_range=1.0)
    args.update(kw)
    net = NLRN(**args).double()
    for blk in net.nonlocal_blocks:   # non-zero g so the non-local path matters
        nn.init.normal_(blk.g.weight, std=0.3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval().to(device)


def test_default_parameter_count_and_init():
    net = NLRN()
    assert _counts(net) == (330625, 340099)
    blk = net.nonlocal_blocks[0]
    assert blk.g.weight.abs().sum() == 0 and blk.g.bias.abs().sum() == 0
    assert net.conv_first.bias.abs().sum() == 0 and net.convs_a[0].weight.abs().sum() > 0
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 38 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    # With g == 0 the non-local module is the identity.
    x = torch.rand(1, 128, 5, 6)
    assert torch.equal(blk(x), x)


def test_built_from_yaml_kwargs():
    net = ARCH_REGISTRY.get('NLRN')(**{'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 16, 'num_embed': 8,
                                       'num_steps': 2, 'nl_scope': 'window', 'window_size': 7})
    assert net(torch.rand(1, 1, 9, 10)).shape == (1, 1, 9, 10)
    blk = ARCH_REGISTRY.get('WindowedNonLocalBlock')(num_feat=8, num_embed=4, nl_scope='window', window_size=3)
    assert blk(torch.rand(2, 8, 5, 5)).shape == (2, 8, 5, 5)


def _official_step_reference(net, x):
    """Direct transcription of the reference pseudo-code with dense global attention."""
    blk = net.nonlocal_blocks[0]
    s0 = net.conv_first(net.bn_first(x))
    s, logits = s0, None
    for t in range(net.num_steps):
        bn1, bn2, bn3 = net.bns[t]
        z = torch.relu(bn1(s))
        b, c, h, w = z.shape
        zf = z.flatten(2).transpose(1, 2)
        th = zf @ blk.theta.weight.flatten(1).T + blk.theta.bias
        ph = zf @ blk.phi.weight.flatten(1).T + blk.phi.bias
        g = zf @ blk.g.weight.flatten(1).T + blk.g.bias
        lt = th @ ph.transpose(1, 2)
        logits = lt if logits is None else logits + lt
        z = z + (torch.softmax(logits, -1) @ g).transpose(1, 2).reshape(b, c, h, w)
        hh = net.convs_b[0](torch.relu(bn3(net.convs_a[0](bn2(z)))))
        s = hh + s0
    return x + net.conv_last(torch.relu(net.bn_last(s)))


def test_global_scope_matches_pseudocode(device):
    net = _tiny(device)
    x = torch.rand(2, 1, 6, 7, dtype=torch.float64).to(device)
    torch.testing.assert_close(net(x), _official_step_reference(net, x))


def test_global_weights_run_in_window_scope(device):
    net = _tiny(device)
    x = torch.rand(1, 1, 9, 8, dtype=torch.float64).to(device)
    ref = net(x)
    win = _tiny(device, nl_scope='window', window_size=17)   # >= 2x image: equals the global scope
    win.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(win(x), ref)
    torch.testing.assert_close(win(x), ref)          # autograd path too
    small = _tiny(device, nl_scope='window', window_size=3)
    small.load_state_dict(net.state_dict())
    assert not torch.allclose(small(x), ref)          # a real window differs
    circ = _tiny(device, nl_scope='window', window_size=3, border='circular')
    circ.load_state_dict(net.state_dict())
    assert circ(x).shape == x.shape


def _dense_window_reference(net, x, window_size):
    """The pseudo-code with an explicit window mask on dense logits (eq. 5-6), embedded Gaussian."""
    from nl_plugin.ops.nlrn_attention import window_mask
    mask = window_mask(x.shape[2], x.shape[3], window_size, device=x.device)
    blk = net.nonlocal_blocks[0]
    s0 = net.conv_first(net.bn_first(x))
    s, logits = s0, None
    for t in range(net.num_steps):
        bn1, bn2, bn3 = net.bns[t]
        z = torch.relu(bn1(s))
        zf = z.flatten(2).transpose(1, 2)
        th, ph, g = (zf @ m.weight.flatten(1).T + m.bias for m in (blk.theta, blk.phi, blk.g))
        lt = th @ ph.transpose(1, 2)
        logits = lt if logits is None else logits + lt
        z = z + (torch.softmax(logits.masked_fill(~mask, float('-inf')), -1) @ g).transpose(1, 2).reshape(z.shape)
        s = net.convs_b[0](torch.relu(bn3(net.convs_a[0](bn2(z))))) + s0
    return x + net.conv_last(torch.relu(net.bn_last(s)))


def test_window_scope_single_pass_matches_dense_window_reference(device):
    """Window scope == the pseudo-code with an explicit window mask on dense logits (eq. 5-6)."""
    net = _tiny(device, nl_scope='window', window_size=5)
    x = torch.rand(1, 1, 8, 9, dtype=torch.float64).to(device)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _dense_window_reference(net, x, 5))


def _count_band_calls(monkeypatch):
    """Wrap the banded attention op NLRN streams with; returns the live calls / live logits record."""
    import weakref

    from nl_plugin.archs import nlrn_stream
    orig = nlrn_stream.window_attention_rows
    rec = {'calls': 0, 'live': weakref.WeakValueDictionary(), 'max_live': 0}

    def wrapped(*args, **kw):
        res = orig(*args, **kw)
        rec['calls'] += 1
        if kw.get('return_logits'):
            rec['live'][rec['calls']] = res[1]
            rec['max_live'] = max(rec['max_live'], len({id(t) for t in rec['live'].values()}))   # updated in place
        return res
    monkeypatch.setattr(nlrn_stream, 'window_attention_rows', wrapped)
    return rec


@pytest.mark.parametrize('h,w', [(9, 26), (27, 8), (21, 21)])
def test_streamed_window_inference_matches_dense_reference(h, w, monkeypatch):
    """Inference streams bands of rows along the long side through all steps; same result."""
    rec = _count_band_calls(monkeypatch)
    net = _tiny(nl_scope='window', window_size=5)
    x = torch.rand(2, 1, h, w, dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
    assert rec['calls'] == net.num_steps * -(-max(h, w) // 8)
    torch.testing.assert_close(out, _dense_window_reference(net, x, 5))


@pytest.mark.parametrize('kw', [dict(nonlocal_every=2), dict(share_weights=False), dict(propagate_correlation=False),
                                dict(correlation='symmetric_embedded_gaussian'), dict(correlation='euclidean'),
                                dict(correlation='embedded_dot_product'), dict(num_steps=1)])
def test_streamed_window_inference_matches_whole_image_path(kw, monkeypatch):
    rec = _count_band_calls(monkeypatch)
    net = _tiny(nl_scope='window', window_size=5, **kw)
    x = torch.rand(1, 1, 23, 12, dtype=torch.float64)
    with torch.no_grad():
        streamed = net(x)
    assert rec['calls'] > 0
    calls = rec['calls']
    whole = net(x.clone().requires_grad_())        # autograd on: the whole-image path
    assert rec['calls'] == calls
    torch.testing.assert_close(streamed, whole.detach())


def test_streamed_carried_logits_stay_bounded(monkeypatch):
    """Carried logits live only between the first and the last step's front, not for the whole image."""
    rec = _count_band_calls(monkeypatch)
    net = _tiny(nl_scope='window', window_size=5, num_steps=4)
    with torch.no_grad():
        net(torch.rand(1, 1, 240, 10, dtype=torch.float64))
    bands = 240 // 8
    assert rec['calls'] == 4 * bands
    # Step t+1 of a band needs step t to be r + 2 = 4 rows further: one band ahead per step.
    assert rec['max_live'] <= 2 * (net.num_steps - 1) + 1 < bands



def test_stream_frees_its_buffers_without_garbage_collection():
    """The streamed forward's stages reference each other through closures; it must break those
    cycles itself, or every image's row buffers stay alive until a full collection."""
    import gc

    from nl_plugin.archs import nlrn_stream
    net = _tiny(nl_scope='window', window_size=5)
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad():
            net(torch.rand(1, 1, 40, 12, dtype=torch.float64))
        assert not [o for o in gc.get_objects() if issubclass(type(o), (nlrn_stream._Stage, nlrn_stream._Context))]
    finally:
        gc.enable()

def test_stream_only_where_it_applies(monkeypatch):
    rec = _count_band_calls(monkeypatch)
    x = torch.rand(1, 1, 30, 9, dtype=torch.float64)
    with torch.no_grad():
        for net in (_tiny(nl_scope='window', window_size=5, border='circular'), _tiny(nl_scope='global'),
                    _tiny(nl_scope='window', window_size=9).train()):
            net(x)
        _tiny(nl_scope='window', window_size=5)(x[:, :, :19])     # long side < 4 windows
    assert rec['calls'] == 0


@pytest.mark.parametrize('correlation', sorted(CORRELATIONS))
@pytest.mark.parametrize('scope', ['global', 'window'])
def test_correlations_build_and_run(correlation, scope, device):
    net = _tiny(device, correlation=correlation, nl_scope=scope, window_size=5)
    x = torch.rand(1, 1, 6, 7, dtype=torch.float64).to(device)
    y = net(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    whole = _tiny(device, correlation=correlation, nl_scope='window', window_size=13)
    whole.load_state_dict(net.state_dict())
    global_net = _tiny(device, correlation=correlation)
    global_net.load_state_dict(net.state_dict())
    torch.testing.assert_close(whole(x), global_net(x))   # a window covering the whole image = global scope


def test_ablation_options():
    unshared = NLRN(num_feat=8, num_embed=4, num_steps=4, share_weights=False)
    assert len(unshared.convs_a) == 4 and len(unshared.nonlocal_blocks) == 4
    every2 = NLRN(num_feat=8, num_embed=4, num_steps=5, share_weights=False, nonlocal_every=2)
    assert every2.nl_steps == [0, 2, 4] and len(every2.nonlocal_blocks) == 3
    x = torch.rand(1, 1, 6, 6)
    for net in (unshared, every2, NLRN(num_feat=8, num_embed=4, num_steps=3, propagate_correlation=False)):
        assert net(x).shape == x.shape
    # No propagation == independent softmax per step.
    a = _tiny(propagate_correlation=False)
    b = _tiny()
    b.load_state_dict(a.state_dict())
    xd = x.double()
    assert not torch.allclose(a(xd), b(xd))


def test_bad_arguments():
    with pytest.raises(ValueError, match='num_out_ch'):
        NLRN(num_in_ch=1, num_out_ch=3)
    with pytest.raises(ValueError, match='nl_scope'):
        NLRN(nl_scope='tile')
    with pytest.raises(ValueError, match='correlation'):
        NLRN(correlation='cosine')
    with pytest.raises(ValueError, match='odd'):
        NLRN(nl_scope='window', window_size=44)
    with pytest.raises(ValueError, match='shape'):
        NLRN(num_feat=8, num_embed=4, num_steps=1)(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match='WindowedNonLocalBlock'):
        WindowedNonLocalBlock(num_feat=8, num_embed=4)(torch.rand(1, 4, 3, 3))


@pytest.mark.parametrize('cls', [NLRN, WindowedNonLocalBlock])
def test_renamed_scope_options_are_refused(cls):
    """One spelling for global attention: nl_scope 'global' (not 'patch', not window_size None or 0)."""
    with pytest.raises(ValueError, match="nl_scope 'patch' is now called 'global'"):
        cls(nl_scope='patch')
    for size in (None, 0):
        with pytest.raises(ValueError, match='nl_scope: global'):
            cls(nl_scope='window', window_size=size)


def test_scope_defaults():
    assert NLRN(num_feat=8, num_embed=4, num_steps=1).nonlocal_blocks[0].nl_scope == 'global'   # official
    blk = WindowedNonLocalBlock(num_feat=8, num_embed=4)
    assert blk.nl_scope == 'window' and blk.window_size == 45
    assert blk.g.weight.abs().sum() == 0 and blk.theta.weight.abs().sum() > 0   # the block's own init
    with pytest.raises(TypeError, match='zero_init_g'):    # g always starts at zero (official)
        WindowedNonLocalBlock(zero_init_g=False)


def test_official_tiled_protocol_runs():
    net = NLRN(num_feat=8, num_embed=4, num_steps=2).eval()
    x = torch.rand(1, 1, 20, 23)
    y = tiled_forward(net, x, 9, stride=7, tile_batch=100)
    assert y.shape == x.shape


def test_few_adam_steps_lower_denoising_loss():
    torch.manual_seed(0)
    net = NLRN(num_feat=16, num_embed=8, num_steps=2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    clean = torch.rand(2, 1, 10, 10) * 0.2 + 0.4
    noisy = clean + 0.1 * torch.randn_like(clean)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = torch.mean((net(noisy) - clean) ** 2)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # The residual starts near 0 (official scale inside), so the loss starts at the noise variance 0.01.
    assert losses[0] < 0.012 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.97 * losses[0], losses
