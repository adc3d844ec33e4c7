"""nl_plugin.onnx_export (scripts/export_onnx.py): exported networks reproduce PyTorch in onnxruntime
(atol 1e-4 on [0, 1] images)."""

import numpy as np
import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

from nl_plugin import onnx_export as export_onnx
from nl_plugin import weights

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')


def write_model(tmp_path, spec):
    net = ARCH_REGISTRY.get(spec['type'])(**{k: v for k, v in spec.items() if k != 'type'})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / 'model.pth')
    weights.save_weights(net.state_dict(), path, arch=spec)
    return net.eval(), path


def run_onnx(path, x):
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return sess.run(None, {'image': x.numpy()})[0]


@pytest.mark.parametrize('spec', [
    {'type': 'DnCNN', 'num_feat': 8, 'depth': 3},
    {'type': 'NLRN', 'num_feat': 8, 'num_embed': 4, 'num_steps': 2},
    {'type': 'NLRN', 'num_feat': 8, 'num_embed': 4, 'num_steps': 2, 'nl_scope': 'window', 'window_size': 5},
])
def test_dynamic_size_export(tmp_path, capsys, spec):
    net, path = write_model(tmp_path, spec)
    out = str(tmp_path / 'model.onnx')
    assert export_onnx.main(['--model', path, '--output', out, '--height', '24', '--width', '20',
                             '--exporter', 'torchscript']) == 0
    assert 'dynamic N/H/W; onnxruntime matches PyTorch' in capsys.readouterr().out
    x = torch.rand(1, 1, 31, 27)           # a size the export never saw
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(run_onnx(out, x) - ref).max() < 1e-4
    assert export_onnx.main(['--model', path, '--output', out]) == 2      # no overwriting
    assert 'model.onnx exists' in capsys.readouterr().err


def test_n3net_exports_at_a_fixed_size(tmp_path):
    pytest.importorskip('onnxscript')
    net, _ = write_model(tmp_path, {'type': 'N3Net', 'num_feat': 4, 'depth': 2, 'embed_feat': 4, 'k': 2,
                                       'num_inter_ch': 2, 'num_stages': 2})
    out = str(tmp_path / 'n3.onnx')
    model = export_onnx.Pipeline(net, False).eval()
    info = export_onnx.export_onnx(model, out, 1, 30, 25, exporters=('dynamo', ), static=True)
    assert info['dynamic'] is False and info['max_error'] < 1e-4
    x = torch.rand(1, 1, 30, 25)
    with torch.no_grad():
        assert np.abs(run_onnx(out, x) - net(x).numpy()).max() < 1e-4
