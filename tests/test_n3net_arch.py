"""N3Block (tiled vs reference, baselines, set version) and N3Net (counts, variants, options)."""
import inspect

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

from nl_plugin.archs.n3block_arch import N3Block, N3SetBlock
from nl_plugin.archs.n3net_arch import N3Net, _flush_denormal_enabled
from nl_plugin.ops import n3

D64 = torch.float64


pytestmark = pytest.mark.usefixtures('one_thread')


def count(m):
    return sum(p.numel() for p in m.parameters())


def twin(device='cpu', **kw):
    a = N3Block(**kw).double()
    b = N3Block(impl='reference', **kw).double()
    b.load_state_dict(a.state_dict())
    return a.to(device), b.to(device)


@pytest.mark.parametrize('size', [(80, 80), (33, 47), (7, 9), (96, 101)])
@pytest.mark.parametrize('train', [True, False])
def test_n3block_tiled_equals_reference(size, train, device):
    """Sizes: exactly one search region, smaller than it, not multiples of the stride, tiny."""
    a, b = twin(device, num_in_ch=2, k=3, embed_feat=8)
    a.train(train)
    b.train(train)
    x = torch.randn(2, 2, *size, dtype=D64).to(device).requires_grad_()
    ya, yb = a(x), b(x)
    assert ya.shape == (2, 8, *size)
    assert torch.allclose(ya, yb, atol=1e-10)
    if not train:
        with torch.no_grad():  # the inference path writes into a preallocated output
            assert torch.allclose(a(x), yb, atol=1e-10)
    if train:
        g = torch.randn_like(ya)
        ga = torch.autograd.grad((ya * g).sum(), [x] + list(a.parameters()))
        gb = torch.autograd.grad((yb * g).sum(), [x] + list(b.parameters()))
        assert all(torch.allclose(u, v, atol=1e-8) for u, v in zip(ga, gb))
        assert torch.allclose(a.dist_bn.running_mean, b.dist_bn.running_mean)


def test_n3block_output_layout_and_errors():
    blk = N3Block(num_in_ch=3, k=2, embed_feat=8).eval()
    x = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        y = blk(x)
        blk.diff = False
        z = blk(x)
    assert y.shape == (1, 9, 30, 30) and blk.num_out_ch == 9
    assert torch.equal(y[:, :3], x)  # neighbour-major: [x, z_1 - x, z_2 - x]
    assert torch.allclose(y[:, 3:], z[:, 3:] - x.repeat(1, 2, 1, 1), atol=1e-6)
    assert count(N3Block()) == 88651  # official per-block count
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        blk(torch.randn(1, 4, 30, 30))
    with pytest.raises(ValueError, match='selection'):
        N3Block(selection='soft')
    with pytest.raises(ValueError, match='temp_mode'):
        N3Block(temp_mode='median')


def test_renamed_options_are_refused_with_the_new_name():
    with pytest.raises(TypeError, match="N3Block: option 'window_size' is now called 'search_size'"):
        N3Block(window_size=15)
    with pytest.raises(TypeError, match="N3Net: option 'window_size' is now called 'search_size'"):
        N3Net(window_size=15)
    with pytest.raises(TypeError, match="N3Net: option 'block_type' is now called 'selection'"):
        N3Net(block_type='knn')
    for old, new in (('continuous', 'n3'), ('hard', 'knn')):
        with pytest.raises(ValueError, match=f"N3Block: selection '{old}' is now called '{new}'"):
            N3Block(selection=old)
        with pytest.raises(ValueError, match=f"N3SetBlock: selection '{old}' is now called '{new}'"):
            N3SetBlock(4, selection=old)
        with pytest.raises(ValueError, match=f"selection '{old}' is now called '{new}'"):
            N3Net(selection=old)
    with pytest.raises(ValueError, match="did you mean 'knn'"):
        N3Block(selection='knnn')
    for cls in (N3Block, N3Net):  # the real signature stays visible (option-key checks read it)
        assert 'search_size' in inspect.signature(cls).parameters
        assert 'window_size' not in inspect.signature(cls).parameters
    params = inspect.signature(N3Net).parameters
    assert 'selection' in params and 'block_type' not in params
    for name in ('KNNBlock', 'ConcreteN3Block'):  # one name for one ablation: N3Block(selection=...)
        with pytest.raises(KeyError):
            ARCH_REGISTRY.get(name)


def test_n3net_passes_its_block_options_on():
    net = N3Net(selection='concrete', search_size=9, knn_update='paper', temp_mode='center')
    assert all(b.selection == 'concrete' and b.search_size == 9 and b.knn_update == 'paper' and b.temp_mode == 'center'
               for b in net.n3_blocks)
    with pytest.raises(ValueError, match='knn_update'):  # checked by the block
        N3Net(knn_update='official_v2')


def test_small_search_on_a_grid_wider_than_a_candidate_tile():
    """search_size 2 on an 11x12 patch grid: tiles of up to 12 patches are weighed against the grid."""
    a, b = twin(num_in_ch=1, k=2, patch_size=1, stride=1, search_size=2, embed_feat=4)
    x = torch.randn(1, 1, 11, 12, dtype=D64)
    assert torch.allclose(a(x), b(x), atol=1e-10)


def test_temperature_modes_differ_and_paper_update():
    a, _ = twin(num_in_ch=2, k=2, embed_feat=8)
    a.eval()
    x = torch.randn(1, 2, 40, 40, dtype=D64)
    with torch.no_grad():
        mean = a(x)
        a.temp_mode = 'center'
        centre = a(x)
        a.knn_update = 'paper'
        paper = a(x)
    assert not torch.allclose(mean, centre) and not torch.allclose(centre, paper)
    b = N3Block(num_in_ch=2, k=2, embed_feat=8, knn_update='paper', temp_mode='center', impl='reference').double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.allclose(b.eval()(x), paper, atol=1e-10)


def test_hard_knn_block_on_fixed_features_matches_brute_force():
    """1x1 patches: z_j is the value of the j-th nearest pixel (in the match image) in the window."""
    torch.manual_seed(1)
    h, w, win, k = 6, 7, 3, 2
    x = torch.randn(1, 2, h, w, dtype=D64)
    feat = torch.randn(1, 1, h, w, dtype=D64)
    blk = N3Block(num_in_ch=2, k=k, patch_size=1, stride=1, search_size=win, selection='knn')
    assert count(blk) == 0
    y = blk(x, match=feat)
    idx = n3.candidate_index(h, w, win)
    f = feat.view(-1)
    for q in range(h * w):
        cand = idx[q]
        order = cand[torch.argsort((f[cand] - f[q]) ** 2, stable=True)][:k]
        for j in range(k):
            r, c = divmod(order[j].item(), w)
            assert torch.allclose(y[0, 2 * (j + 1):2 * (j + 2), q // w, q % w], x[0, :, r, c] - x[0, :, q // w, q % w])
    ref = N3Block(num_in_ch=2, k=k, patch_size=1, stride=1, search_size=win, selection='knn', impl='reference')
    assert torch.allclose(ref(x, match=feat), y)


def test_concrete_block_samples_in_training_only():
    blk = N3Block(num_in_ch=2, k=2, embed_feat=8, selection='concrete')
    x = torch.randn(1, 2, 25, 25)
    assert not torch.allclose(blk(x), blk(x))  # stochastic while training
    det = N3Block(num_in_ch=2, k=2, embed_feat=8)
    det.load_state_dict(blk.state_dict())
    blk.eval()
    det.eval()
    with torch.no_grad():
        assert torch.allclose(blk(x), det(x))  # deterministic relaxation in eval


def test_set_block_matches_naive_and_index():
    torch.manual_seed(0)
    blk = N3SetBlock(4, k=2, embed_feat=8).double().eval()
    x = torch.randn(2, 6, 4, dtype=D64)
    with torch.no_grad():
        y = blk(x)
        e = blk.embed(x)
        d = torch.cdist(e, e).pow(2)
        mask = torch.eye(6, dtype=torch.bool)
        logits = blk.dist_bn(-d[:, ~mask].reshape(2, 1, -1)).view(2, 6, 5) / torch.exp(blk.temp(x))
        wts = n3.continuous_knn(logits, 2)  # (B, N, k, 5) over the other items
        others = torch.stack([x[:, [j for j in range(6) if j != i]] for i in range(6)], 1)  # (B, N, 5, C)
        z = torch.einsum('bnkm,bnmc->bnkc', wts, others) - x[:, :, None]
    assert y.shape == (2, 6, 12)
    assert torch.allclose(y, torch.cat([x[:, :, None], z], 2).reshape(2, 6, 12), atol=1e-10)
    idx = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2], [0, 1, 2]])
    assert blk(x, index=idx).shape == (2, 6, 12)
    with pytest.raises(ValueError, match='index'):
        blk(x, index=idx[:4])
    with pytest.raises(ValueError, match=r'\(B, N, 4\)'):
        blk(torch.randn(2, 6, 5))
    blk.train()(x.requires_grad_(True)).sum().backward()


def test_n3net_counts_and_variants():
    assert count(N3Net()) == 705511  # official denoiser
    light = N3Net(num_stages=2)
    assert count(light) == 427348 and len(light.n3_blocks) == 1
    sr = N3Net(stage_type='vdsr', depth=7, upscale=3)
    assert sr(torch.rand(1, 1, 20, 22)).shape == (1, 1, 60, 66)
    real = N3Net(num_feat=128, depth=9, num_inter_ch=32, k=3, num_noise_ch=2)
    assert real.stages[0].conv_first.in_channels == 3 and real.n3_blocks[0].num_out_ch == 128
    assert real(torch.rand(1, 3, 24, 24)).shape == (1, 1, 24, 24)
    with pytest.raises(ValueError, match='2 noise-map channels'):
        real(torch.rand(1, 1, 24, 24))
    knn = N3Net(selection='knn', knn_feature='input')
    assert count(knn) == 705511 - 2 * 88651
    assert knn(torch.rand(2, 1, 30, 30)).shape == (2, 1, 30, 30)
    for bad in (dict(selection='x'), dict(stage_type='unet'), dict(knn_update='y'), dict(num_stages=0)):
        with pytest.raises(ValueError):
            N3Net(**bad)


def test_n3net_official_defaults_and_denormal_flag():
    net = N3Net()
    assert [s.body[1].momentum for s in net.stages] == [0.001] * 3
    assert all(b.k == 7 and b.patch_size == 10 and b.stride == 5 and b.search_size == 15 for b in net.n3_blocks)
    assert net.n3_blocks[0].dist_bn.eps == 1e-5 and net.stages[0].body[1].eps == 1e-5
    net.eval()
    before = _flush_denormal_enabled()
    with torch.no_grad():
        y = net(torch.rand(1, 1, 21, 90))
    assert y.shape == (1, 1, 21, 90) and torch.isfinite(y).all()
    assert _flush_denormal_enabled() == before  # restored


def test_n3net_builds_from_mmengine():
    from mmengine.registry import MODELS

    import nl_plugin  # noqa: F401
    net = MODELS.build(dict(type='N3Net', num_stages=2, k=3))
    assert isinstance(net, N3Net) and len(net.n3_blocks) == 1 and net.n3_blocks[0].k == 3
    assert net.stages[1].conv_first.in_channels == 8 * (3 + 1)
