"""Converter from the official NLRN TF layout, checked against the official graph on 0..255 (no TF)."""
import numpy as np
import pytest
import torch

from nl_plugin.archs.nlrn_arch import NLRN
from nl_plugin.convert import nlrn_tf as conv

EPS = 1e-3


def _official_arrays(rng, steps=12, feat=128, emb=64):
    """Random variables with the names and HWIO shapes of the official checkpoint."""
    a = {}

    def convv(name, k, cin, cout, std):
        a[f'{name}/kernel'] = rng.normal(0, std, (k, k, cin, cout))
        a[f'{name}/bias'] = rng.normal(0, 0.05, cout)

    def bn(name, c, mean=0.0, var=1.0):
        a[f'{name}/gamma'] = rng.uniform(0.5, 1.5, c)
        a[f'{name}/beta'] = rng.normal(0, 0.1, c)
        a[f'{name}/moving_mean'] = mean + rng.normal(0, 0.1, c)
        a[f'{name}/moving_variance'] = var * rng.uniform(0.5, 1.5, c)

    bn('model/batch_normalization', 1, mean=110.0, var=3000.0)
    convv('model/conv1', 3, 1, feat, 0.3)
    convv('model/rnn/non_local_theta', 1, feat, emb, 0.02)
    convv('model/rnn/non_local_phi', 1, feat, emb, 0.02)
    convv('model/rnn/non_local_g', 1, feat, feat, 0.05)
    convv('model/rnn/RB1_a', 3, feat, feat, 0.02)
    convv('model/rnn/RB1_b', 3, feat, feat, 0.02)
    for n in range(3 * steps):
        bn('model/rnn/batch_normalization' + (f'_{n}' if n else ''), feat)
    bn('model/batch_normalization_1', feat)
    convv('model/conv_end', 3, feat, 1, 0.05)
    a['model/global_step'] = np.array(400000)   # extra variables are ignored
    return a


def _bn(x, a, name):
    return (a[f'{name}/gamma'] * (x - a[f'{name}/moving_mean']) / np.sqrt(a[f'{name}/moving_variance'] + EPS)
            + a[f'{name}/beta'])


def _conv_same(x, a, name):
    """TF 'SAME' convolution (cross-correlation), x (H, W, Cin), kernel HWIO, float64."""
    k = a[f'{name}/kernel']
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = x.shape[:2]
    out = np.zeros((h, w, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += xp[i:i + h, j:j + w] @ k[i, j]
    return out + a[f'{name}/bias']


def _official_forward(a, img, steps=12):
    """The reference pseudo-code of the official graph, NumPy float64, pixels on 0..255."""
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    x = img[..., None]
    s0 = _conv_same(_bn(x, a, 'model/batch_normalization'), a, 'model/conv1')
    s, logits = s0, None
    h, w = img.shape
    for t in range(steps):
        name = lambda j: 'model/rnn/batch_normalization' + (f'_{3 * t + j}' if 3 * t + j else '')  # noqa: E731
        z = relu(_bn(s, a, name(0)))
        zf = z.reshape(h * w, -1)
        theta = _conv_same(z, a, 'model/rnn/non_local_theta').reshape(h * w, -1)
        phi = _conv_same(z, a, 'model/rnn/non_local_phi').reshape(h * w, -1)
        g = _conv_same(z, a, 'model/rnn/non_local_g').reshape(h * w, -1)
        lt = theta @ phi.T
        logits = lt if logits is None else logits + lt
        e = np.exp(logits - logits.max(1, keepdims=True))
        z = (zf + (e / e.sum(1, keepdims=True)) @ g).reshape(h, w, -1)
        hh = _conv_same(_bn(z, a, name(1)), a, 'model/rnn/RB1_a')
        hh = _conv_same(relu(_bn(hh, a, name(2))), a, 'model/rnn/RB1_b')
        s = hh + s0
    res = _conv_same(relu(_bn(s, a, 'model/batch_normalization_1')), a, 'model/conv_end')
    return img + res[..., 0]


def test_converted_network_reproduces_official_graph():
    rng = np.random.default_rng(0)
    arrays = _official_arrays(rng)
    img = rng.uniform(0, 255, (6, 7))
    official = _official_forward(arrays, img)
    net = NLRN().double().eval()
    net.load_state_dict(conv.to_torch_state_dict(arrays, dtype=torch.float64), strict=True)
    with torch.no_grad():
        ours = net(torch.from_numpy(img / 255.0)[None, None])[0, 0].numpy()
    assert np.abs(official - img).max() > 1      # the test network actually changes the image
    # float32 storage of the converted weights bounds the agreement.
    np.testing.assert_allclose(ours * 255.0, official, rtol=0, atol=1e-4)


def test_name_map_shapes_and_layout():
    arrays = _official_arrays(np.random.default_rng(1))
    sd = conv.convert_arrays(arrays)
    net_sd = NLRN().state_dict()
    assert set(sd) == {k for k in net_sd if not k.endswith('num_batches_tracked')}
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(net_sd[k].shape), k
    k = arrays['model/rnn/RB1_a/kernel']
    np.testing.assert_allclose(sd['convs_a.0.weight'][5, 3], k[:, :, 3, 5].astype(np.float32))
    np.testing.assert_allclose(sd['bns.11.2.weight'],
                               arrays['model/rnn/batch_normalization_35/gamma'].astype(np.float32))
    np.testing.assert_allclose(sd['bns.0.0.weight'], arrays['model/rnn/batch_normalization/gamma'].astype(np.float32))


def test_weights_are_copied_without_rescaling():
    """NLRN() works at 0..255 inside: the scale-sensitive layers are copied as they are, marked 255."""
    arrays = _official_arrays(np.random.default_rng(4))
    sd = conv.convert_arrays(arrays)
    for name in ('moving_mean', 'moving_variance', 'gamma', 'beta'):
        tname = {'moving_mean': 'running_mean', 'moving_variance': 'running_var', 'gamma': 'weight',
                 'beta': 'bias'}[name]
        np.testing.assert_array_equal(sd[f'bn_first.{tname}'],
                                      arrays[f'model/batch_normalization/{name}'].astype(np.float32))
    np.testing.assert_array_equal(sd['conv_last.weight'],
                                  arrays['model/conv_end/kernel'].transpose(3, 2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(sd['conv_last.bias'], arrays['model/conv_end/bias'].astype(np.float32))
    assert float(sd['img_range_marker']) == 255.0


def _folded_layout(arrays, steps=12):
    """The layout without the range marker (NLRN on [0, 1] pixels): the official 0..255 scale folded
    into the input BN and conv_end, written out independently of the code under test."""
    sd = conv.to_torch_state_dict(arrays, steps, dtype=torch.float64)
    del sd['img_range_marker']
    var = sd['bn_first.running_var']
    sd['bn_first.weight'] = sd['bn_first.weight'] * 255.0 * torch.sqrt(var / 255.0**2 + EPS) / torch.sqrt(var + EPS)
    sd['bn_first.running_mean'] = sd['bn_first.running_mean'] / 255.0
    sd['bn_first.running_var'] = var / 255.0**2
    sd['conv_last.weight'] = sd['conv_last.weight'] / 255.0
    sd['conv_last.bias'] = sd['conv_last.bias'] / 255.0
    return sd


@pytest.fixture
def basicsr_log():
    """Messages of BasicSR's logger (it does not propagate to the root logger)."""
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger('basicsr')
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_unmarked_folded_state_dict_is_converted_on_load(basicsr_log):
    """A state dict without the marker is in the folded [0, 1] layout: loading converts it exactly."""
    rng = np.random.default_rng(5)
    arrays = _official_arrays(rng)
    img = rng.uniform(0, 255, (6, 7))
    official = _official_forward(arrays, img)
    net = NLRN().double().eval()
    net.load_state_dict(_folded_layout(arrays), strict=True)
    assert any('converted a state dict written for the layout without img_range_marker' in m for m in basicsr_log)
    with torch.no_grad():
        ours = net(torch.from_numpy(img / 255.0)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(ours * 255.0, official, rtol=0, atol=1e-4)
    assert float(net.state_dict()['img_range_marker']) == 255.0     # re-saved in the marked layout
    np.testing.assert_allclose(net.conv_last.weight.detach().numpy(), conv.convert_arrays(arrays)['conv_last.weight'],
                               rtol=1e-6)


@pytest.mark.parametrize('img_range', [1.0, 2.0])
def test_official_weights_load_into_another_img_range(img_range, basicsr_log):
    rng = np.random.default_rng(6)
    arrays = _official_arrays(rng)
    img = rng.uniform(0, 255, (6, 7))
    official = _official_forward(arrays, img)
    net = NLRN(img_range=img_range).double().eval()
    net.load_state_dict(conv.to_torch_state_dict(arrays, dtype=torch.float64), strict=True)
    assert any(f'written for img_range 255 to img_range {img_range:g}' in m for m in basicsr_log)
    with torch.no_grad():
        ours = net(torch.from_numpy(img / 255.0)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(ours * 255.0, official, rtol=0, atol=1e-4)


def test_same_range_loads_silently(basicsr_log):
    net = NLRN(num_feat=8, num_embed=4, num_steps=2)
    NLRN(num_feat=8, num_embed=4, num_steps=2).load_state_dict(net.state_dict(), strict=True)
    assert not [m for m in basicsr_log if 'NLRN' in m]


def test_basicsr_pretrain_path_converts_unmarked_checkpoint(tmp_path, basicsr_log):
    """``path: pretrain_network_g`` (BasicSR's strict load_network) on a checkpoint without the marker."""
    from basicsr.models import build_model
    rng = np.random.default_rng(7)
    arrays = _official_arrays(rng, steps=2, feat=8, emb=4)
    ckpt = tmp_path / 'old_net_g.pth'
    torch.save({'params': {k: v.float() for k, v in _folded_layout(arrays, steps=2).items()}}, ckpt)
    opt = {'name': 'load', 'model_type': 'RestorationModel', 'is_train': False, 'dist': False, 'num_gpu': 0,
           'rank': 0, 'world_size': 1, 'scale': 1,
           'network_g': {'type': 'NLRN', 'num_feat': 8, 'num_embed': 4, 'num_steps': 2},
           'path': {'pretrain_network_g': str(ckpt), 'strict_load_g': True}, 'val': {}}
    model = build_model(opt)
    assert any('converted a state dict' in m for m in basicsr_log)
    img = rng.uniform(0, 255, (6, 7))
    with torch.no_grad():
        ours = model.net_g.eval()(torch.from_numpy(img / 255.0).float()[None, None])[0, 0].double().numpy()
    np.testing.assert_allclose(ours * 255.0, _official_forward(arrays, img, steps=2), rtol=0, atol=2e-2)



def test_missing_variable_is_named():
    arrays = _official_arrays(np.random.default_rng(2))
    del arrays['model/rnn/non_local_g/kernel']
    with pytest.raises(KeyError, match='non_local_g/kernel'):
        conv.convert_arrays(arrays)


def test_cli_writes_loadable_params(tmp_path, monkeypatch):
    arrays = _official_arrays(np.random.default_rng(3))
    monkeypatch.setattr(conv, 'read_checkpoint', lambda prefix: arrays)
    out = tmp_path / 'net_g.pth'
    conv.main(['--checkpoint', 'model.ckpt-400000', '--output', str(out)])
    ckpt = torch.load(out, weights_only=True)
    NLRN().load_state_dict(ckpt['params'], strict=True)


def test_thin_cli_script_runs():
    import subprocess
    import sys

    from conftest import ROOT
    res = subprocess.run([sys.executable, f'{ROOT}/scripts/convert_nlrn_tf.py', '--help'], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and '--checkpoint' in res.stdout, res.stderr
