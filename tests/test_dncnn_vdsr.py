"""DnCNN and VDSR baselines: layout, parameter counts, residual rule, registration."""
import pytest
import torch
import torch.nn.functional as F

from nl_plugin.archs.arch_util import add_first_channels, bicubic_upsample
from nl_plugin.archs.dncnn_arch import DnCNN
from nl_plugin.archs.vdsr_arch import VDSR

pytestmark = pytest.mark.usefixtures('one_thread')


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_dncnn17_and_n3net_stage_parameter_counts():
    assert count(DnCNN(depth=17)) == 556097  # DnCNN-S, ~556k
    # N3Net's stages (official per-block counts minus the dead 128-parameter bn1)
    assert count(DnCNN(1, 8, 64, 6)) == 153352 - 128
    assert count(DnCNN(64, 8, 64, 6)) == 189640 - 128
    assert count(DnCNN(64, 1, 64, 6)) == 185601 - 128


def test_dncnn_layout_and_residual_rule():
    net = DnCNN(3, 2, num_feat=5, depth=4).eval()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.bias is not None for c in convs] == [True, False, False, True]
    assert isinstance(net.body[1], torch.nn.BatchNorm2d) and net.body[1].eps == 1e-5
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        h = F.relu(net.conv_first(x))
        h = net.conv_last(net.body(h))
        out = net(x)
    # first min(in, out) = 2 input channels added to the 2 output channels
    assert torch.allclose(out, h + x[:, :2], atol=1e-6)
    up = DnCNN(1, 3, num_feat=4, depth=3).eval()
    with torch.no_grad():
        y = up(x[:, :1])
        raw = up.conv_last(up.body(F.relu(up.conv_first(x[:, :1]))))
    assert torch.allclose(y[:, :1], raw[:, :1] + x[:, :1], atol=1e-6) and torch.allclose(y[:, 1:], raw[:, 1:])
    assert DnCNN(2, 2, 4, 3, residual=False)(x[:, :2]).shape == (2, 2, 9, 7)


def test_add_first_channels_and_bicubic_upsample():
    x = torch.randn(2, 3, 5, 4)
    wide = torch.randn(2, 5, 5, 4)
    out = add_first_channels(wide, x)  # more outputs than inputs: only the first 3 get the residual
    assert torch.equal(out[:, :3], wide[:, :3] + x) and torch.equal(out[:, 3:], wide[:, 3:])
    narrow = torch.randn(2, 2, 5, 4)
    assert torch.equal(add_first_channels(narrow, x), narrow + x[:, :2])
    assert bicubic_upsample(x, 1) is x
    assert torch.equal(bicubic_upsample(x, 3), F.interpolate(x, scale_factor=3, mode='bicubic', align_corners=False))


def test_dncnn_inference_folds_bn_exactly(device):
    net = DnCNN(2, 2, num_feat=6, depth=4)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_(0, 0.3)
    net.eval().to(device)
    x = torch.randn(1, 2, 11, 9).to(device)
    ref = net(x)  # autograd on: plain conv -> BN
    with torch.no_grad():
        assert torch.allclose(net(x), ref, atol=1e-5)  # BN folded into the conv


def test_dncnn_official_init_and_options():
    net = DnCNN(depth=5, bn_momentum=0.001)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(b.momentum == 0.001 for b in bns)
    assert all((b.weight >= 0.025).all() for b in bns) and all((b.bias == 0).all() for b in bns)
    std = net.body[0].weight.std().item()
    assert abs(std - (2 / (9 * 64)) ** 0.5) < 0.01
    assert count(DnCNN(depth=5, bn=False)) == 640 + 3 * (36864 + 64) + 577
    with pytest.raises(ValueError, match='depth'):
        DnCNN(depth=1)
    with pytest.raises(ValueError, match=r'\(N, 1, H, W\)'):
        DnCNN()(torch.zeros(1, 3, 8, 8))


def test_vdsr_counts_upsampling_and_residual():
    assert count(VDSR()) == 665921  # VDSR: 20 layers, 64 features
    net = VDSR(depth=3, num_feat=4, upscale=2).eval()
    x = torch.rand(1, 1, 6, 5)
    with torch.no_grad():
        y = net(x)
        up = F.interpolate(x, scale_factor=2, mode='bicubic', align_corners=False)
        ref = net.conv_last(net.body(F.relu(net.conv_first(up)))) + up
    assert y.shape == (1, 1, 12, 10) and torch.allclose(y, ref, atol=1e-6)
    assert net(up, upscale=1).shape == (1, 1, 12, 10)  # per-call override (multi-scale models)
    with pytest.raises(ValueError, match='upscale'):
        VDSR(upscale=0)


def test_registered_in_basicsr_and_mmengine():
    from basicsr.utils.registry import ARCH_REGISTRY
    from mmengine.registry import MODELS

    import nl_plugin  # noqa: F401
    for name in ('DnCNN', 'VDSR', 'N3Net', 'N3Block', 'N3SetBlock'):
        assert ARCH_REGISTRY.get(name) is not None
    net = MODELS.build(dict(type='DnCNN', num_in_ch=1, num_out_ch=1, num_feat=8, depth=3))
    assert isinstance(net, DnCNN)
    assert isinstance(MODELS.build(dict(type='VDSR', depth=3, num_feat=4)), VDSR)
