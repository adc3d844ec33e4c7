"""Official N3Net checkpoint conversion: a synthetic checkpoint in the official layout round-trips."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nl_plugin.archs.n3net_arch import N3Net
from nl_plugin.convert import n3net_official
from nl_plugin.ops import n3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'convert_n3net_official.py')


pytestmark = pytest.mark.usefixtures('one_thread')


def official_state_dict(seed=0):
    """Random tensors under the official key names and shapes (140 tensors, no num_batches_tracked)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(key, cout, cin, bias):
        sd[key + '.weight'] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cout))
        if bias:
            sd[key + '.bias'] = torch.randn(cout, generator=g) * 0.01

    def bn(key, c):
        sd[key + '.weight'] = torch.rand(c, generator=g) + 0.5
        sd[key + '.bias'] = torch.randn(c, generator=g) * 0.1
        sd[key + '.running_mean'] = torch.randn(c, generator=g) * 0.1
        sd[key + '.running_var'] = torch.rand(c, generator=g) + 0.5

    for i, (cin, cout) in enumerate([(1, 8), (64, 8), (64, 1)]):
        conv(f'blocks.{i}.conv1', 64, cin, True)
        sd[f'blocks.{i}.bn1.weight'] = torch.rand(64, generator=g)  # dead module
        sd[f'blocks.{i}.bn1.bias'] = torch.zeros(64)
        sd[f'blocks.{i}.bn1.running_mean'] = torch.zeros(64)
        sd[f'blocks.{i}.bn1.running_var'] = torch.ones(64)
        for n in (0, 3, 6, 9):
            conv(f'blocks.{i}.layer1.{n}', 64, 64, False)
            bn(f'blocks.{i}.layer1.{n + 1}', 64)
        conv(f'blocks.{i}.conv2', cout, 64, True)
    for j in range(2):
        for name, out in (('embedcnn', 8), ('tempcnn', 1)):
            conv(f'nls.{j}.{name}.0', 64, 8, False)
            bn(f'nls.{j}.{name}.1', 64)
            conv(f'nls.{j}.{name}.3', 64, 64, False)
            bn(f'nls.{j}.{name}.4', 64)
            conv(f'nls.{j}.{name}.6', out, 64, True)
        bn(f'nls.{j}.n3aggregation.aggregation.nnn.bn', 1)
    return sd


def official_forward(sd, x):
    """The official denoiser computed directly from the official-layout dict (eval mode)."""
    def bnf(t, key, eps=1e-5):
        return F.batch_norm(t, sd[key + '.running_mean'], sd[key + '.running_var'], sd[key + '.weight'],
                            sd[key + '.bias'], False, 0.0, eps)

    def dncnn(i, t):
        h = F.relu(F.conv2d(t, sd[f'blocks.{i}.conv1.weight'], sd[f'blocks.{i}.conv1.bias'], padding=1))
        for n in (0, 3, 6, 9):
            h = F.relu(bnf(F.conv2d(h, sd[f'blocks.{i}.layer1.{n}.weight'], padding=1), f'blocks.{i}.layer1.{n + 1}'))
        h = F.conv2d(h, sd[f'blocks.{i}.conv2.weight'], sd[f'blocks.{i}.conv2.bias'], padding=1)
        m = min(t.shape[1], h.shape[1])
        return torch.cat([h[:, :m] + t[:, :m], h[:, m:]], 1)

    def cnn(prefix, t):
        h = F.relu(bnf(F.conv2d(t, sd[prefix + '.0.weight'], padding=1), prefix + '.1'))
        h = F.relu(bnf(F.conv2d(h, sd[prefix + '.3.weight'], padding=1), prefix + '.4'))
        return F.conv2d(h, sd[prefix + '.6.weight'], sd[prefix + '.6.bias'], padding=1)

    def n3block(j, t, k=7, p=10, s=5):
        b, c, h, w = t.shape
        pad = n3.patch_grid_padding(h, w, p, s)
        xp = F.pad(t, pad)
        nh, nw = n3.patch_grid_shape(*xp.shape[-2:], p, s)
        idx = n3.candidate_index(nh, nw, 15)
        vals = n3.extract_patches(xp, p, s)
        emb = n3.extract_patches(F.pad(cnn(f'nls.{j}.embedcnn', t), pad), p, s)
        lt = n3.extract_patches(F.pad(cnn(f'nls.{j}.tempcnn', t), pad), p, s).mean(-1)
        temp = torch.exp(lt + math.log(0.1))
        d = n3.patch_sqdist(emb, emb, idx)
        logits = bnf(-d.reshape(b, 1, -1), f'nls.{j}.n3aggregation.aggregation.nnn.bn').view_as(d) / temp[..., None]
        zs = [t]
        for _ in range(k):  # eqs. 8-11 with the official placement of the temperature
            logw = torch.log_softmax(logits, -1)
            z = torch.einsum('blm,blmd->bld', logw.exp(), vals[:, idx])
            z = n3.fold_patches(z, xp.shape[-2:], p, s)[..., pad[2]:pad[2] + h, pad[0]:pad[0] + w]
            zs.append(z - t)
            logits = logits + n3.log1mexp(logw)
        return torch.cat(zs, 1)

    out = dncnn(0, x)
    out = dncnn(1, n3block(0, out))
    return dncnn(2, n3block(1, out))


@pytest.fixture(scope='module')
def official_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / '051_ckpt.t7'
    sd = official_state_dict()
    torch.save({'net': sd, 'epoch': 51}, str(path))
    return path, sd


def test_official_layout_converts_to_exactly_n3net_state_dict(official_file):
    """The official layout's 140 tensors: the 12 of the never-applied ``bn1`` are dropped, the other 128 are
    renamed, and the BatchNorm counters are added: exactly ``N3Net()``'s keys and shapes, tensors unchanged."""
    sd = official_file[1]
    assert len(sd) == 140 and sum('.bn1.' in k for k in sd) == 12
    params = n3net_official.convert_state_dict(sd)
    expected = N3Net().state_dict()
    assert params.keys() == expected.keys()
    assert all(params[k].shape == expected[k].shape for k in expected)
    renamed = [k for k in params if not k.endswith('num_batches_tracked')]
    assert len(renamed) == 128
    official = [v for k, v in sd.items() if '.bn1.' not in k]
    assert all(any(torch.equal(params[k], t) for t in official) for k in renamed)


def test_convert_function_strict_load_and_outputs(official_file, tmp_path):
    path, sd = official_file
    out = tmp_path / 'net_g.pth'
    n3net_official.convert_file(str(path), str(out))
    params = torch.load(str(out), map_location='cpu', weights_only=True)['params']
    net = N3Net()
    net.load_state_dict(params, strict=True)
    net.eval().double()  # float64: random weights give sharp weights, so compare without fp32 noise
    x = torch.rand(1, 1, 43, 37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours = net(x)
        ref = official_forward({k: v.double() for k, v in sd.items()}, x)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-7), (ours - ref).abs().max()


def test_convert_cli(official_file, tmp_path):
    path, sd = official_file
    out = tmp_path / 'cli_net_g.pth'
    proc = subprocess.run([sys.executable, SCRIPT, '--checkpoint', str(path), '--output', str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr
    params = torch.load(str(out), map_location='cpu', weights_only=True)['params']
    net = N3Net()
    net.load_state_dict(params, strict=True)
    ref = n3net_official.convert_state_dict(sd)
    assert params.keys() == ref.keys() and all(torch.equal(params[k], ref[k]) for k in ref)


def test_convert_rejects_unknown_keys_and_files(tmp_path):
    with pytest.raises(KeyError, match='blocks.0.extra.weight'):
        n3net_official.convert_state_dict({'blocks.0.extra.weight': torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match='missing.t7'):
        n3net_official.load_official_checkpoint(str(tmp_path / 'missing.t7'))
