"""Weight files from anywhere: what their ``arch`` entry may ask for, shapes compared before memory, NaN/Inf
refused, and ``convert_weights`` without safetensors. Each refusal is one line naming the file; ``basicsr infer``
runs through its console script where the process itself is what is checked (code, memory)."""
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import zipfile

import cv2
import numpy as np
import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

from conftest import basicsr_cmd
from nl_plugin import cli, weights
from nl_plugin.convert import formats

DNCNN = {'type': 'DnCNN', 'num_feat': 8, 'depth': 3}


def small_file(path, arch, tensors=None):
    """A weight file of a few KB whose ``arch`` entry says anything (as a hostile file would)."""
    tensors = tensors if tensors is not None else {'conv_first.weight': torch.zeros(4, 1, 3, 3)}
    weights.save_weights(tensors, str(path), arch=arch)
    return str(path)


def infer(tmp_path, model, *extra):
    img = tmp_path / 'in.png'
    if not img.exists():
        cv2.imwrite(str(img), np.full((12, 12), 128, np.uint8))
    return cli.main(['infer', '--model', str(model), '--input', str(img), '--output', str(tmp_path / 'out'), *extra])


class _RunsCode:
    """Unpickling this creates a folder: what SpyNet(load_path=...) would torch.load without weights_only."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_a_path_in_the_arch_entry_is_never_loaded(tmp_path):
    """SpyNet(load_path=payload) under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: refused, through the real CLI."""
    marker = tmp_path / 'code_ran'
    payload = tmp_path / 'payload.pth'
    torch.save({'params': _RunsCode(str(marker))}, payload)
    model = small_file(tmp_path / 'spynet.pth', {'type': 'SpyNet', 'load_path': str(payload)})
    cv2.imwrite(str(tmp_path / 'in.png'), np.zeros((8, 8), np.uint8))
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1', OMP_NUM_THREADS='1')
    r = subprocess.run([basicsr_cmd(), 'infer', '--model', model, '--input', str(tmp_path / 'in.png'), '--output',
                        str(tmp_path / 'out')], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and not marker.exists() and not (tmp_path / 'out').exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    assert f'{model}: the file asks for architecture \'SpyNet\', which a weight file may not name' in lines[0]
    assert '--arch TYPE' in lines[0]


@pytest.mark.parametrize('arch, message', [
    ({'type': 'VGGFeatureExtractor', 'layer_name_list': ['conv1_1']}, "architecture 'VGGFeatureExtractor'"),
    ({'type': 'DFDNet', 'num_feat': 8, 'dict_path': '/etc/passwd'}, "architecture 'DFDNet'"),
    ({'type': 'DnCNN', 'init': '/etc/passwd'}, "init='/etc/passwd' looks like a path"),
    ({'type': 'DnCNN', 'init': 'https://example.com/w'}, 'looks like a path, URL or file'),
    ({'type': 'DnCNN', 'num_feat': '8'}, "num_feat='8' is text but the constructor expects int"),
    ({'type': 'DnCNN', 'bn': 1}, 'bn=1 is a number but the constructor expects bool'),
    ({'type': 'DnCNN', 'bn_eps': float('nan')}, 'bn_eps=nan is not a finite number'),
    ({'type': 'DnCNN', 'load_from': 'x'}, "'load_from' is not an argument of DnCNN"),
    ({'type': 'DnCNN', 'num_feat': 20000, 'depth': 100000}, r'num_feat=20000 is outside the range .*\(1\.\.1024\)'),
    ({'type': 'NonLocalInjection', 'base': {'type': 'SpyNet'}}, "base: type 'SpyNet' may not be named"),
    ({'type': 'NonLocalInjection', 'base': {'type': 'BasicVSR', 'spynet_path': None}}, "type 'BasicVSR' may not"),
    ({'type': 'NonLocalInjection', 'base': {'type': 'EDSR', 'num_in_ch': 1, 'num_out_ch': 1},
      'base_pretrained': '/etc/passwd'}, r'base_pretrained=.* names a path, URL or file.*base_pretrained=null'),
    ({'type': 'NonLocalInjection', 'base': {'type': 'EDSR', 'num_in_ch': 1, 'num_out_ch': 1},
      'blocks': [{'after': 'body.0', 'type': 'DFDNet', 'dict_path': 'x'}]}, r"blocks\[0\]: type 'DFDNet' may not"),
    ({'type': 'NonLocalInjection', 'base': {'type': 'EDSR', 'num_in_ch': 1, 'num_out_ch': 1, 'num_block': 99999}},
     'num_block=99999 is outside the range'),
    ({'type': 'NonLocalInjection', 'base': {'type': 'EDSR', 'num_in_ch': 1, 'num_out_ch': 1, 'upscale': 16},
      'probe_size': 512}, r'probe_size=512 is outside the range a weight file may give \(1\.\.128\)'),
    ({'type': 'NonLocalInjection', 'base': {'type': 'EDSR'}, 'blocks': 5}, 'blocks=5 is not a list of at most 16'),
    ({'type': 'NonLocalInjection', 'base': {'type': 'EDSR'}, 'blocks': {'after': 'body.0', 'type': 'N3Block'}},
     r"blocks=\{'after': 'body.0', 'type': 'N3Block'\} is not a list"),
    ({'type': 'NonLocalInjection', 'base': [{'type': 'EDSR'}]}, r"base=\[\{'type': 'EDSR'\}\] is not a mapping"),
])
def test_arch_entries_outside_the_allow_list_are_refused_in_one_line(tmp_path, capsys, arch, message):
    model = small_file(tmp_path / 'hostile.pth', arch)
    assert infer(tmp_path, model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and model in err[0] and '--arch TYPE' in err[0], err
    assert __import__('re').search(message, err[0]), err[0]
    assert not (tmp_path / 'out').exists()


def test_the_user_names_anything_else_with_arch(tmp_path):
    """--arch builds a type the file may not name; the file's own arguments are still checked."""
    net = ARCH_REGISTRY.get('MSRResNet')(num_in_ch=1, num_out_ch=1, num_feat=4, num_block=1, upscale=2).eval()
    model = small_file(tmp_path / 'srresnet.pth', {'type': 'MSRResNet', 'num_in_ch': 1, 'num_out_ch': 1,
                                                   'num_feat': 4, 'num_block': 1, 'upscale': 2}, net.state_dict())
    with pytest.raises(weights.WeightsError, match="architecture 'MSRResNet'"):
        weights.load_network(model)
    loaded, spec, _ = weights.load_network(model, arch_type='MSRResNet')
    assert spec['num_feat'] == 4 and all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
    spy = small_file(tmp_path / 'spy.pth', {'type': 'SpyNet', 'load_path': '/etc/passwd'})
    with pytest.raises(weights.WeightsError, match='load_path=.* names a path'):
        weights.load_network(spy, arch_type='SpyNet')


def test_an_injection_network_trained_from_a_base_file_rebuilds_without_it(tmp_path):
    """base_pretrained is where training started, not part of the network: not stored, so the file loads."""
    base = {'type': 'DnCNN', 'num_feat': 4, 'depth': 3}
    weights.save_weights(ARCH_REGISTRY.get('DnCNN')(num_feat=4, depth=3).state_dict(), str(tmp_path / 'base.pth'))
    opt = {'type': 'NonLocalInjection', 'base': base, 'base_pretrained': str(tmp_path / 'base.pth'),
           'blocks': [{'after': 'conv_first', 'type': 'WindowedNonLocalBlock', 'window_size': 5, 'num_embed': 2}]}
    net = ARCH_REGISTRY.get('NonLocalInjection')(**{k: v for k, v in opt.items() if k != 'type'})
    arch = weights.arch_from_opt(opt)
    assert 'base_pretrained' not in arch
    path = small_file(tmp_path / 'injected.safetensors' if _has_safetensors() else tmp_path / 'injected.pth', arch,
                      net.state_dict())
    loaded, spec, _ = weights.load_network(path)
    assert spec == arch and all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


def _has_safetensors():
    try:
        import safetensors  # noqa: F401
    except ImportError:
        return False
    return True


def test_allow_lists_hold_this_projects_archs_and_no_path_taking_base():
    for base in ({'type': 'EDSR', 'num_in_ch': 1, 'num_out_ch': 1, 'res_scale': 0.1, 'rgb_mean': [0.5]},
                 {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'scale': 2, 'num_feat': 64, 'num_block': 23},
                 {'type': 'NLRN', 'num_feat': 64, 'nl_scope': 'window', 'window_size': 15, 'img_range': 1.0}):
        weights.check_file_arch({'type': 'NonLocalInjection', 'base': base, 'blocks': [
            {'after': 'conv_first', 'type': 'N3Block', 'k': 7, 'temp_offset': -2.5}]}, 'f.pth')   # allowed
    with pytest.raises(weights.WeightsError, match='depth=3.5 is a float but must be an integer'):
        weights.check_file_arch({'type': 'DnCNN', 'depth': 3.5}, 'f.pth')
    own = sorted(n for n, c in ARCH_REGISTRY._obj_map.items() if c.__module__.startswith('nl_plugin.'))
    assert own == sorted(weights.FILE_ARCHS)
    for name in weights.INJECTION_BASES + weights.INJECTION_BLOCKS:
        params = inspect.signature(ARCH_REGISTRY.get(name)).parameters
        assert not [p for p in params if weights._PATH_NAME.search(p)], name
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), name


def _peak_rss_kb(args):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss, proc.returncode, err


def test_a_file_that_does_not_fit_is_refused_before_memory(tmp_path):
    """A small file naming DnCNN(num_feat=1024, depth=256) (about 9.6 GB of weights) with the keys of that
    network at num_feat=1: compared on the meta device and refused with a peak RSS within 200 MB of refusing
    a text file given as --model."""
    keys = ARCH_REGISTRY.get('DnCNN')(num_feat=1, depth=256).state_dict()
    model = small_file(tmp_path / 'big.pth', {'type': 'DnCNN', 'num_feat': 1024, 'depth': 256}, keys)
    assert os.path.getsize(model) < 2**20
    text = tmp_path / 'notes.pth'
    text.write_text('not weights\n')
    cv2.imwrite(str(tmp_path / 'in.png'), np.zeros((8, 8), np.uint8))
    common = ['--input', str(tmp_path / 'in.png'), '--output', str(tmp_path / 'out')]
    base_kb, rc, err = _peak_rss_kb([basicsr_cmd(), 'infer', '--model', str(text), *common])
    assert rc == 2 and 'cannot be read as a PyTorch weight file' in err, err
    big_kb, rc, err = _peak_rss_kb([basicsr_cmd(), 'infer', '--model', model, *common])
    assert rc == 2 and 'does not fit DnCNN(num_feat=1024, depth=256): shape mismatch' in err, err
    assert len(err.strip().splitlines()) == 1
    assert big_kb - base_kb < 200 * 1024, (big_kb, base_kb)


def test_building_stops_once_the_network_outgrows_the_file(tmp_path):
    """A depth the user asks for (not range-checked) is still built only as far as the file's tensors allow."""
    net = ARCH_REGISTRY.get('DnCNN')(num_feat=4, depth=3)
    model = small_file(tmp_path / 'dncnn.pth', dict(DNCNN, num_feat=4), net.state_dict())
    with pytest.raises(weights.WeightsError, match=r'does not fit DnCNN\(num_feat=4, depth=1000000\): it has more '
                                                   r'than \d+ modules, parameters and buffers'):
        weights.load_network(model, arch_opt={'depth': 1_000_000})


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    net = ARCH_REGISTRY.get('DnCNN')(num_feat=8, depth=3)
    sd = net.state_dict()
    sd['body.0.weight'] = sd['body.0.weight'].clone()
    sd['body.0.weight'][0, 0, 0, 0] = float('inf')
    model = small_file(tmp_path / 'inf.pth', DNCNN, sd)
    assert infer(tmp_path, model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"basicsr infer: error: {model}: tensor 'body.0.weight' holds NaN or Inf values; the file is "
                   'refused (a diverged or damaged training run?)']
    assert not (tmp_path / 'out').exists()
    assert formats.main([model, str(tmp_path / 'copy.pth')]) == 2
    assert "tensor 'body.0.weight' holds NaN or Inf" in capsys.readouterr().err
    assert not (tmp_path / 'copy.pth').exists()


def test_convert_to_safetensors_without_the_package_names_the_extra(tmp_path, monkeypatch, capsys):
    net = ARCH_REGISTRY.get('DnCNN')(num_feat=8, depth=3)
    src = small_file(tmp_path / 'dncnn.pth', DNCNN, net.state_dict())
    for name in [m for m in sys.modules if m == 'safetensors' or m.startswith('safetensors.')] + ['safetensors']:
        monkeypatch.setitem(sys.modules, name, None)     # import safetensors now raises ImportError
    dst = tmp_path / 'dncnn.safetensors'
    assert formats.main([src, str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'convert_weights: error: {dst}: writing .safetensors needs the safetensors package: '
                   'pip install nl_plugin[safetensors]']
    assert not dst.exists()


def test_rss_helper_sees_the_child():
    kb, rc, _ = _peak_rss_kb([sys.executable, '-c', 'b = bytearray(300 * 2**20); b[::4096] = b"x" * len(b[::4096])'])
    assert rc == 0 and kb > 300 * 1024 and resource.getpagesize() > 0


def test_every_shipped_option_file_writes_weights_that_load_by_their_arch_entry():
    """The allow-list and ranges are not tighter than the project's own networks (options/*.yml)."""
    import glob

    import yaml

    from conftest import ROOT
    files = sorted(glob.glob(os.path.join(ROOT, 'options', '*.yml')))
    assert files
    for path in files:
        with open(path) as f:
            opt = yaml.safe_load(f)
        for key, net_opt in opt.items():
            if key.startswith('network_'):
                weights.check_file_arch(weights.arch_from_opt(net_opt), f'{path}:{key}')


# ---------------------------------------------------------------------------------------------- review findings
def _dncnn_tensors(num_feat, depth, make):
    """DnCNN's keys and shapes, each float tensor made by ``make(shape)`` (the others as they are)."""
    with torch.device('meta'):
        net = ARCH_REGISTRY.get('DnCNN')(num_feat=num_feat, depth=depth).state_dict()
    return {k: make(v.shape) if v.is_floating_point() else torch.zeros((), dtype=v.dtype) for k, v in net.items()}


def test_tensors_the_files_bytes_do_not_hold_are_refused(tmp_path):
    """Stride-0 tensors (28 KB for DnCNN(num_feat=1024, depth=17), 566 MB of weights), many tensors viewing one
    storage, and a deflated zip claim memory the file does not hold: refused in the reader, naming the file,
    before any network is built."""
    strided = tmp_path / 'strided.pth'
    torch.save({'params': _dncnn_tensors(1024, 17, lambda s: torch.zeros(()).expand(s)),
                'arch': {'type': 'DnCNN', 'num_feat': 1024, 'depth': 17}}, strided)
    assert os.path.getsize(strided) < 32 * 1024
    arch = {'type': 'DnCNN', 'num_feat': 64, 'depth': 3}
    shared_storage = torch.zeros(64 * 64 * 9)
    shared = tmp_path / 'shared.pth'
    torch.save({'params': _dncnn_tensors(64, 3, lambda s: shared_storage[:math.prod(s)].view(s)), 'arch': arch},
               shared)
    for path in (strided, shared):
        with pytest.raises(weights.WeightsError, match=rf'^{path}: its tensors claim \d+ bytes but the file holds '
                                                       r'\d+ of them'):
            weights.load_network(path)
    one = torch.zeros(64, 64, 3, 3)     # one view under every name of that shape: the network would not tie them
    tied = tmp_path / 'tied.pth'
    torch.save({'params': _dncnn_tensors(64, 4, lambda s: one if s == one.shape else torch.zeros(s)),
                'arch': dict(arch, depth=4)}, tied)
    with pytest.raises(weights.WeightsError, match=rf'^{tied}: DnCNN\(num_feat=64, depth=4\) has \d+ distinct '
                                                   r'weights but the file holds \d+'):
        weights.load_network(tied)
    good = tmp_path / 'good.pth'
    net = ARCH_REGISTRY.get('DnCNN')(num_feat=8, depth=3)
    weights.save_weights(net.state_dict(), str(good), arch=DNCNN)
    deflated = tmp_path / 'deflated.pth'
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(deflated, 'w', zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(weights.WeightsError, match=rf'^{deflated}: .*compressed'):
        weights.read_all(deflated)
    loaded, _, _ = weights.load_network(good)       # a plain file still loads, bit for bit
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_the_injection_probe_computes_shapes_only():
    """NonLocalInjection reads its insertion shapes from a forward of the base on ``meta``: EDSR at upscale 16
    with probe_size 64 (a 1024x1024 output) runs no real forward of the base; the identity check of the block
    runs on the block alone, at its insertion point's channels on at most 16x16 pixels."""
    from torch.nn.modules import module as nn_module
    seen = []

    def record(module, args):
        seen.extend((type(module).__name__, a.numel()) for a in args if torch.is_tensor(a) and not a.is_meta)
    handle = nn_module.register_module_forward_pre_hook(record)
    try:
        net = ARCH_REGISTRY.get('NonLocalInjection')(
            {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 16, 'num_block': 1, 'upscale': 16},
            [{'after': 'body.0', 'type': 'WindowedNonLocalBlock', 'nl_scope': 'window', 'window_size': 5,
              'num_embed': 4}], probe_size=64)
    finally:
        handle.remove()
    assert net.upscale == 16 and next(net.parameters()).device.type == 'cpu'
    assert seen and {name for name, _ in seen} <= {'InsertedBlock', 'WindowedNonLocalBlock', 'Conv2d'}, seen
    assert max(n for _, n in seen) == 16 * 16 * 16


def _safetensors_file(path, metadata):
    safetensors_torch = pytest.importorskip('safetensors.torch')
    tensors = ARCH_REGISTRY.get('DnCNN')(num_feat=8, depth=3).state_dict()
    safetensors_torch.save_file(tensors, str(path), metadata={'format': 'pt', **metadata})
    return str(path)


DEEP = '[' * 100_000 + ']' * 100_000


def test_pth_keys_that_are_no_text_are_refused_in_one_line(tmp_path):
    for obj, message in (({5: {'w': torch.zeros(1)}, 'x': 1}, r"no state dict found \(top-level keys: \['5', 'x'\]\)"),
                         ({'params': {5: torch.zeros(1)}}, "entry 'params' is not a state dict of tensors named")):
        torch.save(obj, tmp_path / 'odd.pth')
        with pytest.raises(weights.WeightsError, match=message):
            weights.read_all(tmp_path / 'odd.pth')


@pytest.mark.parametrize('metadata, message', [
    ({'param_keys': '5'}, r"param_keys=5 is not a list of parameter keys"),
    ({'param_keys': '["params", 5]'}, r"param_keys=\['params', 5\] is not a list of parameter keys"),
    ({'param_keys': '["weights"]'}, r"param_keys=\['weights'\] is not a list of parameter keys"),
    ({'arch': DEEP}, r'bad JSON in the safetensors header \(arch: nested too deep\)'),
    ({'pipeline': DEEP}, r'bad JSON in the safetensors header \(pipeline: nested too deep\)'),
    ({'arch': '[' * 950 + ']' * 950}, r'bad "arch" entry \[\[\[\.\.\.\]\]\]'),
    ({'arch': json.dumps({'type': 'DnCNN', 'num_feat': json.loads('[' * 950 + ']' * 950)})},
     r'num_feat=\[\[\[\.\.\.\]\]\] nests containers'),
    ({'arch': json.dumps({'type': 'DnCNN', 'init': 'x' * 5_000_000})}, r"init='xxx.*' looks like a path"),
    ({'arch': json.dumps({'type': 'x' * 5_000_000})}, r"architecture 'xxx.*', which a weight file may not name"),
    ({'arch': json.dumps({'type': 'NonLocalInjection', 'base': {'type': 'EDSR'}, 'blocks': [
        {'after': 'y' * 5_000_000, 'type': 'N3Block'}]})}, r"after='yyy.*' is not a submodule name"),
])
def test_malformed_headers_and_hostile_values_give_one_short_line(tmp_path, metadata, message):
    """A safetensors header is JSON from anywhere: any nesting, any length, any type; refused in one line of
    at most a few hundred characters that names the file."""
    path = _safetensors_file(tmp_path / 'hostile.safetensors', metadata)
    with pytest.raises(weights.WeightsError) as err:
        weights.load_network(path)
    msg = str(err.value)
    assert msg.startswith(f'{path}:') and '\n' not in msg and len(msg) < 400, msg[:1000]
    assert __import__('re').search(message, msg), msg


def test_run_time_kernel_choices_are_no_part_of_the_model(tmp_path, capsys):
    """attention_kernel and logit_memory_gb describe a machine: not written to files or training states, ignored
    where an older file gives them (an NLRN saved with attention_kernel='triton' still runs on the CPU), and a
    resume after switching them is the same network."""
    from nl_plugin import checkpoint
    runtime = {'attention_kernel': 'triton', 'logit_memory_gb': 1e6}
    nlrn = {'type': 'NLRN', 'num_feat': 4, 'num_embed': 2, 'num_steps': 1, 'nl_scope': 'window', 'window_size': 3}
    assert ARCH_REGISTRY.get('NLRN').RUNTIME_ARGS == ('attention_kernel', 'logit_memory_gb')
    assert weights.arch_from_opt(dict(nlrn, **runtime)) == nlrn
    injected = {'type': 'NonLocalInjection', 'base': dict(nlrn, **runtime), 'blocks': [
        {'after': 'conv_first', 'type': 'WindowedNonLocalBlock', 'window_size': 3, 'attention_kernel': 'dense'}]}
    assert weights.arch_from_opt(injected) == {'type': 'NonLocalInjection', 'base': nlrn, 'blocks': [
        {'after': 'conv_first', 'type': 'WindowedNonLocalBlock', 'window_size': 3}]}
    net = ARCH_REGISTRY.get('NLRN')(**{k: v for k, v in nlrn.items() if k != 'type'})
    model = small_file(tmp_path / 'nlrn.pth', dict(nlrn, **runtime), net.state_dict())   # as older files hold them
    assert infer(tmp_path, model, '--device', 'cpu') == 0, capsys.readouterr().err
    assert len(os.listdir(tmp_path / 'out')) == 1
    _, spec, _ = weights.load_network(model, arch_opt={'attention_kernel': 'dense'})
    assert spec == dict(nlrn, attention_kernel='dense')
    opt = {'name': 'run', 'network_g': dict(nlrn, attention_kernel='flex'),
           'path': {'models': str(tmp_path), 'training_states': str(tmp_path)}}
    (tmp_path / 'net_g_3.pth').write_bytes(b'')
    old_state = {'iter': 3, 'experiment': 'run', 'networks': {'network_g': dict(nlrn, **runtime)}}
    checkpoint.check_resume_state(old_state, opt, 'x/3.state')
    checkpoint.check_resume_state({'iter': 3, **checkpoint.run_identity(dict(opt, network_g=nlrn))}, opt, 'x/3.state')


def test_the_basicsr_suffix_names_only_the_allowed_class(monkeypatch):
    """BasicSR's registry also finds 'NAME_basicsr': a file may use that spelling only where it is the same class
    as the allowed NAME."""
    srvgg = {'type': 'SRVGGNetCompact_basicsr', 'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 4, 'num_conv': 1}
    weights.check_file_arch({'type': 'NonLocalInjection', 'base': srvgg}, 'f.pth')      # the same class: allowed
    with pytest.raises(weights.WeightsError, match="architecture 'UNetDiscriminatorSN_basicsr', which a weight file"):
        weights.check_file_arch({'type': 'UNetDiscriminatorSN_basicsr', 'num_in_ch': 1}, 'f.pth')
    monkeypatch.setitem(ARCH_REGISTRY._obj_map, 'EDSR_basicsr', ARCH_REGISTRY.get('UNetDiscriminatorSN'))
    monkeypatch.setitem(ARCH_REGISTRY._obj_map, 'DnCNN_basicsr', ARCH_REGISTRY.get('UNetDiscriminatorSN'))
    with pytest.raises(weights.WeightsError, match="base: type 'EDSR_basicsr' may not be named by a weight file"):
        weights.check_file_arch({'type': 'NonLocalInjection', 'base': {'type': 'EDSR_basicsr', 'num_in_ch': 1}},
                                'f.pth')
    with pytest.raises(weights.WeightsError, match="architecture 'DnCNN_basicsr', which a weight file may not name"):
        weights.check_file_arch({'type': 'DnCNN_basicsr', 'num_in_ch': 1}, 'f.pth')
