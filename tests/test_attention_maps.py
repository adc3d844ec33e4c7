"""Attention captured for chosen pixels / patches equals the dense reference and the blocks' own computation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nl_plugin.analysis.attention_maps import block_attention, capture_input, n3_neighbours, nlrn_attention
from nl_plugin.archs.n3block_arch import N3Block
from nl_plugin.archs.nlrn_arch import NLRN
from nl_plugin.archs.nonlocal_injection_arch import NonLocalInjection
from nl_plugin.ops import n3 as n3ops
from nl_plugin.ops.nlrn_attention import dense_attention_reference, window_mask


def _randomize(net, scale=0.05):
    """Weights and BN statistics away from the initialisation (g != 0, BN not the identity); small enough
    that attention stays soft (large weights make it one-hot, where comparisons say little)."""
    gen = torch.Generator().manual_seed(3)
    for p in net.parameters():
        p.data.add_(scale * torch.randn(p.shape, generator=gen))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return net.eval()


def _dense_weights(net, x, pixels, propagate=None):
    """Dense reference: full N x N attention of every step (window mask), rows of the chosen pixels."""
    propagate = net.propagate_correlation if propagate is None else propagate
    zs = {}
    hooks = [net.bns[t][0].register_forward_hook(lambda m, a, out, t=t: zs.__setitem__(t, F.relu(out)))
             for t in net.nl_steps]
    with torch.no_grad():
        net(x)
    for hd in hooks:
        hd.remove()
    h, w = x.shape[-2:]
    blk0 = net.nonlocal_blocks[0]
    mask = window_mask(h, w, blk0.window_size, blk0.border)
    logits, rows = None, []
    for i, t in enumerate(net.nl_steps):
        blk = net.nonlocal_blocks[0 if len(net.nonlocal_blocks) == 1 else i]
        q, k, v = blk.embed(zs[t].permute(0, 2, 3, 1))
        prev = logits if propagate else None
        _, logits = dense_attention_reference(q, k, v, blk.window_size, blk.border, blk.normalization, prev)
        if blk.normalization == 'softmax':
            attn = torch.softmax(logits.masked_fill(~mask, float('-inf')), -1)
        else:
            attn = logits.masked_fill(~mask, 0) / mask.sum(-1, keepdim=True)
        rows.append(torch.stack([attn[0, y * w + xx].view(h, w) for y, xx in pixels]))
    return torch.stack(rows, 1)      # (pixels, steps, H, W)


NLRN_CASES = {
    'window': dict(nl_scope='window', window_size=5),
    'window_no_propagation': dict(nl_scope='window', window_size=5, propagate_correlation=False),
    'window_circular_unshared': dict(nl_scope='window', window_size=7, border='circular', share_weights=False),
    'global_every_other': dict(nl_scope='global', nonlocal_every=2, num_steps=4),
    'window_euclidean': dict(nl_scope='window', window_size=5, correlation='euclidean'),
    'window_dot_product_count': dict(nl_scope='window', window_size=5, correlation='embedded_dot_product'),
}


@pytest.mark.parametrize('case', sorted(NLRN_CASES))
def test_nlrn_attention_equals_the_dense_reference(case, one_thread):
    # img_range 1: random weights on 0..255 pixels saturate every softmax to one-hot
    kw = dict(num_feat=8, num_embed=4, num_steps=3, img_range=1.0)
    kw.update(NLRN_CASES[case])
    net = _randomize(NLRN(**kw))
    # 14 >= 4 windows: eval inference would stream the window scope in row bands; capture runs whole maps
    x = torch.rand(1, 1, 14, 13)
    pixels = [(0, 0), (7, 6), (13, 12), (2, 11)]
    got = nlrn_attention(net, x, pixels)
    ref = _dense_weights(net, x, pixels)
    for i, pa in enumerate(got):
        full = pa.full_map('weights', (14, 13))
        assert pa.steps == net.nl_steps and full.shape == ref[i].shape
        assert torch.allclose(full, ref[i], atol=1e-6, rtol=1e-4)
        if net.nonlocal_blocks[0].normalization == 'softmax':
            assert torch.allclose(pa.weights.sum((1, 2)), torch.ones(len(pa.steps)), atol=1e-5)
        assert (pa.step_weights is None) == (not net.propagate_correlation)
    if net.propagate_correlation:     # each step's own correlation: attention without propagation
        alone = _dense_weights(net, x, pixels, propagate=False)
        for i, pa in enumerate(got):
            assert torch.allclose(pa.full_map('step_weights', (14, 13)), alone[i], atol=1e-6, rtol=1e-4)
            assert not torch.allclose(pa.weights[-1], pa.step_weights[-1], rtol=1e-2, atol=0)


def test_nlrn_window_keys_clip_at_the_border_and_the_output_is_unchanged():
    net = _randomize(NLRN(num_feat=8, num_embed=4, num_steps=2, nl_scope='window', window_size=5, img_range=1.0))
    x = torch.rand(1, 1, 24, 20)
    with torch.no_grad():
        before = net(x)
    (corner,) = nlrn_attention(net, x, [(0, 19)])
    assert corner.rows.tolist() == [0, 1, 2] and corner.cols.tolist() == [17, 18, 19]
    with torch.no_grad():
        assert torch.equal(net(x), before)
    assert net.stream_inference      # the whole-image switch is undone
    with pytest.raises(ValueError, match='outside'):
        nlrn_attention(net, x, [(24, 0)])


def test_inserted_block_attention_equals_the_dense_reference():
    net = NonLocalInjection({'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2,
                             'upscale': 2},
                            [{'after': 'body.0', 'type': 'WindowedNonLocalBlock', 'nl_scope': 'window',
                              'window_size': 3, 'num_embed': 4}])
    _randomize(net)
    block = net.blocks[0].block
    z, _ = capture_input(net, block, torch.rand(1, 3, 9, 10))
    got = block_attention(block, z, [(4, 4), (8, 0)])
    q, k, v = block.embed(z.permute(0, 2, 3, 1))
    _, logits = dense_attention_reference(q, k, v, 3, 'exclude', 'softmax')
    attn = torch.softmax(logits.masked_fill(~window_mask(9, 10, 3), float('-inf')), -1)
    for pa in got:
        y, xx = pa.pixel
        assert torch.allclose(pa.full_map('weights', (9, 10))[0], attn[0, y * 10 + xx].view(9, 10), atol=1e-6)


@pytest.mark.parametrize('selection', ['n3', 'knn'])
def test_n3_weights_rebuild_the_block_output(selection, one_thread):
    """Weights of every query patch, aggregated and folded as the paper does, give the block's own output."""
    block = _randomize(N3Block(num_in_ch=4, k=3, patch_size=4, stride=2, search_size=5, embed_feat=8,
                               selection=selection))
    x = torch.rand(1, 4, 13, 11)
    with torch.no_grad():
        out = block(x)
    pad = block._padding(13, 11)
    xp, _ = n3ops.pad_to_patch_grid(x, 4, 2, pad)
    grid = n3ops.patch_grid_shape(xp.shape[-2], xp.shape[-1], 4, 2)
    found = n3_neighbours(block, x, patches=range(grid[0] * grid[1]))
    weights = torch.stack([f.weights for f in found])[None]             # (1, L, k, M)
    index = torch.stack([f.candidates for f in found])
    z = n3ops.aggregate_patches(weights, n3ops.extract_patches(xp, 4, 2), index)
    z = torch.stack([n3ops.fold_patches(z[:, :, j], xp.shape[-2:], 4, 2) for j in range(3)], 1)
    z = z[..., pad[2]:pad[2] + 13, pad[0]:pad[0] + 11] - x.unsqueeze(1)
    assert torch.allclose(out.view(1, 4, 4, 13, 11)[:, 1:], z, atol=1e-5)
    for f in found:
        assert torch.allclose(f.weights.sum(-1), torch.ones(3), atol=1e-5)
        maps = f.weight_maps()
        assert maps.shape == (3,) + tuple(xp.shape[-2:])
        assert torch.allclose(maps.sum((1, 2)), torch.ones(3), atol=1e-5)
    assert (found[0].temperature is None) == (selection == 'knn')


def test_n3_query_patch_is_the_one_nearest_to_the_pixel():
    block = _randomize(N3Block(num_in_ch=2, k=2, patch_size=4, stride=2, search_size=3, embed_feat=4))
    x = torch.rand(1, 2, 10, 10)     # tiled exactly: no padding, patch centres at 1.5, 3.5, ...
    (a, b) = n3_neighbours(block, x, [(0, 0), (4, 9)])
    assert a.query == 0 and a.patch_box(a.query) == (0, 0)
    assert b.patch_box(b.query) == (2, 6)     # centres (3.5, 7.5): 0.5 and 1.5 px away
    assert b.temperature.shape == (4, 4) and (b.temperature > 0).all()
