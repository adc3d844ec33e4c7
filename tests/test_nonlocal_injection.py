"""NonLocalInjection: blocks inserted into BasicSR networks by YAML, identity at initialisation, any size/dtype."""
import copy

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from nl_plugin.archs.nonlocal_injection_arch import NonLocalInjection
from nl_plugin.weights import WeightsError

EDSR = {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 3, 'upscale': 2}
RRDB = {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'scale': 4, 'num_feat': 8, 'num_block': 2,
        'num_grow_ch': 4}
# Small N3 (patches 4 at stride 2, a 5x5-patch search region = 12 px) and window blocks (q = 5).
N3 = {'type': 'N3Block', 'k': 2, 'embed_feat': 8, 'patch_size': 4, 'stride': 2, 'search_size': 5}
WIN = {'type': 'WindowedNonLocalBlock', 'nl_scope': 'window', 'window_size': 5, 'num_embed': 4}
CASES = {'edsr_n3': (EDSR, [dict(N3, after='body.1')]),
         'rrdb_window': (RRDB, [dict(WIN, after='body.0'), dict(WIN, after='body.1')]),
         'edsr_both': (EDSR, [dict(N3, after='body.0'), dict(WIN, after='body.2')])}


def _base_checkpoint(tmp_path, base_opt, key='params'):
    opt = dict(base_opt)
    base = ARCH_REGISTRY.get(opt.pop('type'))(**opt)
    for p in base.parameters():         # not the default init: the loaded weights must be the ones used
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path / 'base.pth'
    torch.save({key: base.state_dict()}, path)
    return base, path


def _perturb(net, std=0.2):
    """Random weights in the inserted blocks so that they are no longer the identity."""
    for p in net.blocks.parameters():
        p.data.normal_(0, std)
    return net


@pytest.mark.parametrize('case', sorted(CASES))
def test_equal_to_the_loaded_base_at_init(case, tmp_path, one_thread):
    base_opt, blocks = CASES[case]
    base, path = _base_checkpoint(tmp_path, base_opt)
    net = NonLocalInjection(base_opt, blocks, base_pretrained=str(path))
    for mode in (True, False):
        net.train(mode)
        base.train(mode)
        for size in ((16, 20), (9, 7)):
            x = torch.rand(2, 3, *size)
            with torch.no_grad():
                assert (net(x) - base(x)).abs().max() <= 1e-6
    # ... and stops being the base once the blocks have weights of their own
    _perturb(net)
    assert (net(x) - base(x)).abs().max() > 1e-4


def test_a_transformer_base(tmp_path):
    swin = {'type': 'SwinIR', 'img_size': 16, 'embed_dim': 12, 'depths': [1, 1], 'num_heads': [2, 2],
            'window_size': 4, 'mlp_ratio': 2, 'upscale': 2, 'upsampler': 'pixelshuffle'}
    base, path = _base_checkpoint(tmp_path, swin)
    net = NonLocalInjection(swin, [dict(WIN, after='conv_after_body'), dict(N3, after='conv_first')],
                            base_pretrained=str(path)).eval()
    x = torch.rand(1, 3, 16, 12)      # BasicSR's SwinIR takes sides that are multiples of its window
    with torch.no_grad():
        assert (net(x) - base.eval()(x)).abs().max() <= 1e-6 and net.upscale == 2


def test_state_dict_keeps_base_names_and_loads_back(tmp_path):
    base_opt, blocks = CASES['edsr_both']
    net = _perturb(NonLocalInjection(base_opt, blocks))
    base_keys = {k for k in net.state_dict() if k.startswith('base.')}
    assert base_keys == {'base.' + k for k in net.base.state_dict()}
    assert {k.split('.')[2] for k in net.state_dict() if k.startswith('blocks.')} == {'block', 'adapter'}
    again = NonLocalInjection(base_opt, blocks)
    again.load_state_dict(net.state_dict(), strict=True)    # path:pretrain_network_g of the wrapped network
    x = torch.rand(1, 3, 11, 13)
    assert torch.equal(again(x), net(x))
    # a wrapped checkpoint given as base_pretrained, or a checkpoint of another base: one clear error each
    torch.save({'params': net.state_dict()}, tmp_path / 'wrapped.pth')
    with pytest.raises(WeightsError, match='pretrain_network_g'):
        NonLocalInjection(base_opt, blocks, base_pretrained=str(tmp_path / 'wrapped.pth'))
    _, other = _base_checkpoint(tmp_path, dict(base_opt, num_block=2))
    with pytest.raises(WeightsError, match=r'network_g:base_pretrained: .* does not fit EDSR: missing keys'):
        NonLocalInjection(base_opt, blocks, base_pretrained=str(other))


def test_base_param_key_selects_the_ema_weights(tmp_path):
    base, path = _base_checkpoint(tmp_path, EDSR, key='params_ema')
    net = NonLocalInjection(EDSR, [dict(WIN, after='body.0')], base_pretrained=str(path), base_param_key='params_ema')
    x = torch.rand(1, 3, 8, 8)
    assert (net(x) - base(x)).abs().max() <= 1e-6


def test_hooks_compute_the_written_out_composition():
    net = _perturb(NonLocalInjection(*CASES['edsr_both'])).eval()
    b = net.base
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        mean = b.mean.type_as(x)
        h = b.conv_first((x - mean) * b.img_range)
        r = net.blocks[0](b.body[0](h))              # after body.0
        r = net.blocks[1](b.body[2](b.body[1](r)))   # after body.2
        ref = b.conv_last(b.upsample(b.conv_after_body(r) + h)) / b.img_range + mean
        assert torch.allclose(net(x), ref, atol=1e-6, rtol=0)
        assert not torch.allclose(b(x), ref, atol=1e-4)    # net.base alone runs without the blocks


def test_channels_filled_in_and_adapter_only_where_needed():
    net = NonLocalInjection(*CASES['edsr_both'])
    n3, win = net.blocks[0], net.blocks[1]
    assert n3.block.num_in_ch == 8 and isinstance(n3.adapter, nn.Conv2d)
    assert (n3.adapter.in_channels, n3.adapter.out_channels) == (8 * 3, 8)
    assert win.block.num_feat == 8 and win.adapter is None
    assert net.upscale == 2
    with pytest.raises(ValueError, match="num_in_ch=4 but the output of 'body.0' has 8 channels"):
        NonLocalInjection(EDSR, [dict(N3, after='body.0', num_in_ch=4)])


def test_channels_from_modules_when_the_probe_cannot_run():
    # RRDBNet at scale 1 needs sides divisible by 4: a 30-pixel probe fails, the last conv gives the channels
    base = dict(RRDB, scale=1)
    net = NonLocalInjection(base, [dict(WIN, after='body.1')], probe_size=30)
    assert net.blocks[0].block.num_feat == 8
    x = torch.rand(1, 3, 12, 16)
    assert net(x).shape == (1, 3, 12, 16)


def test_bad_after_names_get_suggestions():
    with pytest.raises(KeyError) as err:
        NonLocalInjection(EDSR, [dict(N3, after='body.7')])
    msg = str(err.value)
    assert "blocks[0]" in msg and "no submodule 'body.7'" in msg and "body.0, body.1, body.2" in msg
    with pytest.raises(KeyError, match="Did you mean 'body.1'"):
        NonLocalInjection(EDSR, [dict(N3, after='bdy.1')])
    with pytest.raises(KeyError, match="did you mean 'k'"):
        NonLocalInjection(EDSR, [dict(N3, after='body.1', kk=3)])
    with pytest.raises(ValueError, match="'lrelu' runs .* times"):
        NonLocalInjection(RRDB, [dict(WIN, after='lrelu')])
    with pytest.raises(KeyError, match='"after"'):
        NonLocalInjection(EDSR, [{'type': 'N3Block'}])
    # a submodule whose output is not an image: SwinIR's patch embedding gives tokens (B, L, C)
    swin = {'type': 'SwinIR', 'img_size': 16, 'embed_dim': 12, 'depths': [1], 'num_heads': [2], 'window_size': 4,
            'mlp_ratio': 2}
    with pytest.raises(ValueError, match=r"output of 'patch_embed' has shape \(1, 1024, 12\), not \(B, C, H, W\)"):
        NonLocalInjection(swin, [dict(WIN, after='patch_embed')])


def test_deep_copy_runs_its_own_blocks():
    net = _perturb(NonLocalInjection(*CASES['edsr_both']))
    twin = copy.deepcopy(net)
    x = torch.rand(1, 3, 9, 9)
    assert torch.equal(twin(x), net(x))
    for p in twin.blocks.parameters():
        p.data.zero_()
    assert not torch.allclose(twin(x), net(x), atol=1e-4)


def test_warns_when_a_block_does_not_start_as_identity(caplog, monkeypatch):
    import logging

    from nl_plugin.archs.windowed_nonlocal_arch import WindowedNonLocalBlock
    logger = logging.getLogger('basicsr')  # BasicSR's logger does not propagate once it is set up
    monkeypatch.setattr(logger, 'handlers', logger.handlers + [caplog.handler])
    NonLocalInjection(EDSR, [dict(WIN, after='body.0')])
    assert 'identity' not in caplog.text
    reset = WindowedNonLocalBlock.reset_parameters

    def reset_without_zero_g(self):  # a block whose g is not zero-initialised
        reset(self)
        torch.nn.init.normal_(self.g.weight)
    monkeypatch.setattr(WindowedNonLocalBlock, 'reset_parameters', reset_without_zero_g)
    NonLocalInjection(EDSR, [dict(WIN, after='body.0')])
    assert 'do not start as the identity' in caplog.text


@pytest.mark.parametrize('case', sorted(CASES))
def test_any_size_training_and_inference(case, one_thread):
    """Window scope at the borders and N3 on images smaller than its 12-pixel search region."""
    net = _perturb(NonLocalInjection(*CASES[case]))
    scale = net.upscale
    for size in ((3, 2), (7, 5), (13, 9), (26, 31)):
        x = torch.rand(2, 3, *size)
        net.train()
        out = net(x)
        out.square().mean().backward()
        assert out.shape == (2, 3, size[0] * scale, size[1] * scale) and torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in net.blocks.parameters() if p.grad is not None)
        net.zero_grad()
        net.eval()
        with torch.no_grad():
            assert torch.isfinite(net(x)).all()


@pytest.mark.parametrize('case', sorted(CASES))
def test_dtype_and_bf16_autocast(case, one_thread):
    # small block weights: large ones make N3's selection nearly hard, and rounding then flips neighbours
    net = _perturb(NonLocalInjection(*CASES[case]), std=0.02).eval()
    x = torch.rand(1, 3, 17, 14)
    with torch.no_grad():
        ref = net(x)
        out64 = copy.deepcopy(net).double()(x.double())
        assert out64.dtype == torch.float64 and torch.allclose(out64.float(), ref, atol=1e-4)
        seen = []
        hook = net.blocks[0].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = net(x)
        hook.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)]     # the block works in the dtype autocast gives it
    assert (low.float() - ref).abs().max() <= 0.08 * ref.abs().max()
    net.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = net(x).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.blocks.parameters() if p.grad is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
@pytest.mark.parametrize('case', sorted(CASES))
def test_cuda_matches_cpu(case):
    net = _perturb(NonLocalInjection(*CASES[case])).eval()
    x = torch.rand(1, 3, 21, 18)
    with torch.no_grad():
        ref = net(x)
        gpu = copy.deepcopy(net).cuda()
        assert torch.allclose(gpu(x.cuda()).cpu(), ref, atol=1e-4)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            low = gpu(x.cuda())
    assert (low.float().cpu() - ref).abs().max() <= 0.08 * ref.abs().max()


def test_built_on_the_meta_device_for_option_checks():
    with torch.device('meta'):
        net = NonLocalInjection(*CASES['edsr_both'])
    assert next(net.parameters()).is_meta and net.upscale == 2 and net.blocks[0].adapter is not None
