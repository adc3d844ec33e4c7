"""spandrel (chaiNNer's loader) recognises nl_plugin weight files once ``nl_plugin.spandrel_support.register()`` ran."""
import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

from nl_plugin import weights

spandrel = pytest.importorskip('spandrel')
pytest.importorskip('safetensors')

CASES = [
    ({'type': 'NLRN', 'num_feat': 8, 'num_embed': 4, 'num_steps': 2}, 'pth'),
    ({'type': 'N3Net', 'num_feat': 8, 'depth': 3, 'embed_feat': 8, 'k': 3}, 'safetensors'),
    ({'type': 'DnCNN', 'num_feat': 8, 'depth': 3}, 'pth'),     # spandrel's own Compact would claim it
    ({'type': 'DnCNN', 'num_feat': 8, 'depth': 4, 'num_in_ch': 3, 'num_out_ch': 3}, 'safetensors'),
]


@pytest.fixture(scope='module', autouse=True)
def registered():
    from nl_plugin.spandrel_support import register
    register()
    assert register() == []            # a second call adds nothing


def build(spec):
    net = ARCH_REGISTRY.get(spec['type'])(**{k: v for k, v in spec.items() if k != 'type'})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


@pytest.mark.parametrize('spec,fmt', CASES)
def test_load_from_file_runs_our_network(tmp_path, spec, fmt):
    net = build(spec)
    path = str(tmp_path / f'model.{fmt}')
    weights.save_weights(net.state_dict(), path, arch=spec)
    model = spandrel.ModelLoader().load_from_file(path)
    assert model.architecture.id == f'nl_plugin.{spec["type"]}' and type(model.model) is type(net)
    assert model.input_channels == spec.get('num_in_ch', 1) and model.scale == 1
    x = torch.rand(1, model.input_channels, 22, 19)
    with torch.no_grad():
        expected = net(x).clamp(0, 1)   # NLRN: from every pixel the 45x45 window spans this image
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_training_checkpoint_with_ema_uses_the_ema_weights(tmp_path):
    spec = CASES[2][0]
    raw, ema = build(spec), build(spec)
    path = str(tmp_path / 'ckpt.safetensors')
    weights.save_weights({'params': raw.state_dict(), 'params_ema': ema.state_dict()}, path, arch=spec)
    model = spandrel.ModelLoader().load_from_file(path)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), ema(x).clamp(0, 1), atol=1e-6)
