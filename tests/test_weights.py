"""Weight files that rebuild their network: formats, metadata, safe loading, mismatch reports, detection,
scripts/convert_weights.py, and checkpoints of a real ``basicsr train`` run (safetensors, EMA, resume)."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

from conftest import basicsr_cmd
from nl_plugin import weights
from nl_plugin.arch_detect import detect_arch
from nl_plugin.convert import formats as convert

NLRN_SPEC = {'type': 'NLRN', 'num_feat': 8, 'num_embed': 4, 'num_steps': 2}


def build(spec):
    net = ARCH_REGISTRY.get(spec['type'])(**{k: v for k, v in spec.items() if k != 'type'})
    with torch.no_grad():
        for p in net.parameters():       # non-trivial weights (NLRN's g starts at zero)
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def test_safetensors_round_trip_keeps_arch_in_header(tmp_path):
    pytest.importorskip('safetensors')
    from safetensors import safe_open
    net = build(NLRN_SPEC)
    written = {}

    def write(path, data):                # the caller decides how bytes reach the disk
        written[path] = len(data)
        with open(path, 'wb') as f:
            f.write(data)
    path = str(tmp_path / 'nlrn.safetensors')
    weights.save_weights(net.state_dict(), path, arch=NLRN_SPEC, pipeline={'residual_learning': True}, write=write)
    assert written == {path: os.path.getsize(path)}
    with safe_open(path, framework='pt') as f:
        meta = f.metadata()
    assert json.loads(meta['arch']) == NLRN_SPEC and json.loads(meta['pipeline']) == {'residual_learning': True}
    loaded, spec, w = weights.load_network(path)
    assert spec == NLRN_SPEC and w.pipeline == {'residual_learning': True}
    x = torch.rand(1, 1, 12, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_pth_keeps_basicsr_layout_and_ema_is_preferred(tmp_path):
    a, b = build(NLRN_SPEC), build(NLRN_SPEC)
    path = str(tmp_path / 'ckpt.pth')
    weights.save_weights({'params': a.state_dict(), 'params_ema': b.state_dict()}, path, arch=NLRN_SPEC)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {'params', 'params_ema', 'arch'}
    ARCH_REGISTRY.get('NLRN')(num_feat=8, num_embed=4, num_steps=2).load_state_dict(raw['params'], strict=True)
    assert weights.read_weights(path).param_key == 'params_ema'
    chosen = weights.read_weights(path, 'params').state_dict
    assert torch.equal(chosen['conv_first.weight'], a.state_dict()['conv_first.weight'])


def test_safetensors_with_two_state_dicts(tmp_path):
    pytest.importorskip('safetensors')
    a, b = build(NLRN_SPEC), build(NLRN_SPEC)
    path = str(tmp_path / 'ckpt.safetensors')
    weights.save_weights({'params': a.state_dict(), 'params_ema': b.state_dict()}, path, arch=NLRN_SPEC)
    dicts, arch, _ = weights.read_all(path)
    assert sorted(dicts) == ['params', 'params_ema'] and arch == NLRN_SPEC
    for key, net in (('params', a), ('params_ema', b)):
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in dicts[key].items())


class Payload:
    """Any class: a pickle that would construct it is refused by the safe loader."""


def test_pickled_objects_are_refused(tmp_path):
    path = str(tmp_path / 'unsafe.pth')
    torch.save({'params': build(NLRN_SPEC).state_dict(), 'extra': Payload()}, path)
    with pytest.raises(weights.WeightsError, match=r"unsafe\.pth' is not a plain weights file and is refused"):
        weights.read_weights(path)


def test_mismatched_weights_list_the_keys(tmp_path):
    path = str(tmp_path / 'dncnn.pth')
    weights.save_weights(build({'type': 'DnCNN', 'num_feat': 8, 'depth': 3}).state_dict(), path,
                         arch={'type': 'DnCNN', 'num_feat': 8, 'depth': 3})
    with pytest.raises(weights.WeightsError) as err:
        weights.load_network(path, arch_opt={'depth': 4})
    msg = str(err.value)
    assert '\n' not in msg and path in msg and 'missing keys (6): body.3.weight, body.4.weight' in msg
    assert 'unexpected' not in msg and 'shape mismatch' not in msg
    with pytest.raises(weights.WeightsError, match=r'shape mismatch \(\d+\): conv_first.weight: file \(8, 1, 3, 3\) '
                                                   r'vs network \(4, 1, 3, 3\)'):
        weights.load_network(path, arch_opt={'num_feat': 4})


@pytest.mark.parametrize('spec', [
    NLRN_SPEC,
    dict(NLRN_SPEC, share_weights=False, nonlocal_every=2, num_steps=3),
    {'type': 'NLRN', 'num_feat': 8, 'num_steps': 2, 'correlation': 'symmetric_embedded_gaussian', 'num_embed': 4},
    {'type': 'DnCNN', 'num_feat': 8, 'depth': 4, 'num_in_ch': 3, 'num_out_ch': 3},
    {'type': 'DnCNN', 'num_feat': 8, 'depth': 3, 'bn': False},
    {'type': 'N3Net', 'num_feat': 8, 'depth': 3, 'embed_feat': 8, 'k': 3, 'num_inter_ch': 4},
    {'type': 'N3Net', 'num_feat': 8, 'depth': 3, 'num_stages': 2, 'stage_type': 'vdsr'},
])
def test_detected_arch_rebuilds_the_same_network(spec):
    with torch.device('meta'):
        sd = ARCH_REGISTRY.get(spec['type'])(**{k: v for k, v in spec.items() if k != 'type'}).state_dict()
    found = detect_arch(sd)
    assert found['type'] == spec['type']
    for key, value in spec.items():
        assert found.get(key, value) == value, key
    assert detect_arch({'conv.weight': torch.zeros(1)}) is None


def test_convert_weights_script(tmp_path, capsys):
    pytest.importorskip('safetensors')
    spec = {'type': 'N3Net', 'num_feat': 8, 'depth': 3, 'embed_feat': 8, 'num_stages': 2}
    net = build(spec)
    bare = str(tmp_path / 'bare.pth')
    torch.save(net.state_dict(), bare)      # written elsewhere: no arch
    st, back = str(tmp_path / 'n3.safetensors'), str(tmp_path / 'back.pth')
    assert convert.main([bare, st]) == 0
    assert 'carries no architecture' in capsys.readouterr().out
    assert convert.main([st, back]) == 0
    w = weights.read_weights(back)
    assert w.arch['type'] == 'N3Net' and w.arch['num_stages'] == 2
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in w.state_dict.items())
    assert convert.main([st, back]) == 2
    assert 'back.pth exists' in capsys.readouterr().err


def _train_opt(root):
    return {
        'name': 'tiny', 'model_type': 'RestorationModel', 'num_gpu': 0, 'manual_seed': 1,
        'datasets': {'train': {'name': 't', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(root / 'train'),
                               'sigma': 25, 'gt_size': 16, 'use_hflip': False, 'use_rot': False,
                               'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1}},
        'network_g': {'type': 'DnCNN', 'num_feat': 4, 'depth': 3},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None,
                 'save_format': 'safetensors'},
        'train': {'ema_decay': 0.9, 'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 2, 'warmup_iter': -1,
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                  'pixel_opt': {'type': 'SquaredErrorLoss'}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False},
        'dist_params': {'backend': 'gloo', 'port': 29500},
    }


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A real ``basicsr train`` run of 2 iterations saving safetensors + EMA: (root, option file, env)."""
    pytest.importorskip('safetensors')
    import cv2
    tmp_path = tmp_path_factory.mktemp('tiny_run')
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / 'train')
    for i in range(3):
        cv2.imwrite(str(tmp_path / 'train' / f'{i}.png'), rng.integers(0, 256, (24, 24), dtype=np.uint8))
    opt = tmp_path / 'tiny.yml'
    opt.write_text(yaml.safe_dump(_train_opt(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([basicsr_cmd(), 'train', '-opt', str(opt)], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path, opt, env


def test_training_checkpoints_rebuild_without_arch(tiny_run):
    """safetensors + EMA from ``basicsr train``, resumed from them, then .pth; both rebuild from the file alone."""
    tmp_path, opt, env = tiny_run
    models = tmp_path / 'experiments' / 'tiny' / 'models'
    assert sorted(os.listdir(models)) == ['net_g_2.safetensors', 'net_g_latest.safetensors']
    dicts, arch, pipeline = weights.read_all(models / 'net_g_2.safetensors')
    assert arch == {'type': 'DnCNN', 'num_feat': 4, 'depth': 3} and sorted(dicts) == ['params', 'params_ema']
    assert pipeline == {'residual_learning': False}
    r = subprocess.run([basicsr_cmd(), 'train', '-opt', str(opt), '--auto_resume', '--force_yml',
                        'train:total_iter=3', 'path:save_format=pth'], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = ''.join(p.read_text() for p in (tmp_path / 'experiments' / 'tiny').glob('train_*.log'))
    assert 'net_g_2.safetensors, with param key: [params_ema]' in log and 'Resuming training from epoch' in log
    net, spec, w = weights.load_network(models / 'net_g_latest.pth')
    assert spec == arch and w.param_key == 'params_ema' and type(net).__name__ == 'DnCNN'


def test_resume_from_another_experiment_or_network_is_refused(tiny_run):
    """A training state records its experiment and network: resuming it in another run is one line naming both."""
    tmp_path, opt, env = tiny_run
    state = tmp_path / 'experiments' / 'tiny' / 'training_states' / '2.state'
    assert torch.load(state, weights_only=False)['experiment'] == 'tiny'
    runs = {'other': ['--force_yml', 'name=other', f'path:resume_state={state}'],
            'wider': ['--auto_resume', '--force_yml', 'network_g:num_feat=8', 'train:total_iter=4']}
    for name, extra in runs.items():
        r = subprocess.run([basicsr_cmd(), 'train', '-opt', str(opt), *extra], cwd=tmp_path, capture_output=True,
                           text=True, env=env, timeout=300)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and 'path:resume_state: ' in last, r.stderr[-3000:]
        if name == 'other':
            assert f"{str(state)!r} is a state of experiment 'tiny' (DnCNN(depth=3, num_feat=4)), this run is " \
                   "'other'" in last
        else:
            assert 'was written for network_g: DnCNN(depth=3, num_feat=4), this run has network_g: ' \
                   'DnCNN(depth=3, num_feat=8)' in last
    assert not (tmp_path / 'experiments' / 'other').exists()


def test_old_states_resume_with_a_warning_and_a_missing_network_names_the_resume(tmp_path):
    from nl_plugin import checkpoint
    opt = {'name': 'run', 'network_g': {'type': 'DnCNN', 'num_feat': 4},
           'path': {'models': str(tmp_path), 'training_states': str(tmp_path)}}
    said = []
    with pytest.raises(FileNotFoundError, match=r"path:resume_state: 'x/7.state' is iteration 7, but the network "
                                                r"saved with it, '.*net_g_7.pth', does not exist"):
        checkpoint.check_resume_state({'iter': 7}, opt, 'x/7.state', report=said.append)
    assert said == ["resume: 'x/7.state' records no experiment name or network spec (written by plain BasicSR or an "
                    'older nl_plugin); it is not checked against this run']
    weights.save_weights(build({'type': 'DnCNN', 'num_feat': 4}).state_dict(), str(tmp_path / 'net_g_7.safetensors'))
    checkpoint.check_resume_state({'iter': 7, **checkpoint.run_identity(opt)}, opt, 'x/7.state')


def test_unknown_save_format_is_refused_naming_the_key():
    from nl_plugin.models.restoration_model import RestorationModel
    with pytest.raises(ValueError, match=r"path:save_format: must be one of \['pth', 'safetensors'\], got 'onnx'"):
        RestorationModel.validate_options({'path': {'save_format': 'onnx'}})


@pytest.mark.parametrize('ext', ['pth', 'safetensors'])
def test_every_weight_path_reads_both_formats_with_one_error_type(tmp_path, ext):
    """The analysis scripts' --weights and NonLocalInjection's base_pretrained go through the one reader:
    either format, DataParallel's ``module.`` prefix, a missing or unfit file is a WeightsError."""
    if ext == 'safetensors':
        pytest.importorskip('safetensors')
    from nl_plugin.analysis.networks import build_network, load_checkpoint
    from nl_plugin.archs.nonlocal_injection_arch import NonLocalInjection
    spec = {'type': 'DnCNN', 'num_feat': 8, 'depth': 3}
    net = build(spec)
    path = str(tmp_path / f'w.{ext}')
    weights.save_weights({'params_ema': {f'module.{k}': v for k, v in net.state_dict().items()}}, path)
    x = torch.rand(1, 1, 9, 11)
    loaded = load_checkpoint(build_network(spec), path, param_key='params_ema').eval()
    wrapped = NonLocalInjection(spec, [], base_pretrained=path, base_param_key='params_ema').eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x)) and torch.equal(wrapped(x), net(x))
    missing = str(tmp_path / f'none.{ext}')
    for call in (lambda: load_checkpoint(build_network(spec), missing), lambda: weights.read_weights(missing),
                 lambda: NonLocalInjection(spec, [], base_pretrained=missing)):
        with pytest.raises(weights.WeightsError, match=r'none\.(pth|safetensors): no such weight file'):
            call()
    with pytest.raises(weights.WeightsError, match=r'--weights: .* does not fit DnCNN: shape mismatch'):
        load_checkpoint(build_network(dict(spec, num_feat=4)), path, param_key='params_ema')


def test_one_reader_one_builder_one_prefix_rule():
    """Weight files are read by nl_plugin.weights alone (training states excepted), networks built by its
    build_network alone, and the ``module.`` prefix is stripped there alone."""
    import ast
    import glob
    found = {'torch.load': [], 'module.': [], 'build': []}
    root = os.path.dirname(os.path.dirname(os.path.abspath(weights.__file__)))
    for path in glob.glob(os.path.join(root, 'nl_plugin', '**', '*.py'), recursive=True) + \
            glob.glob(os.path.join(root, 'scripts', '*.py')):
        rel = os.path.relpath(path, root)
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == 'load' and getattr(node.value, 'id', '') == 'torch':
                found['torch.load'].append(rel)
            if isinstance(node, ast.Constant) and node.value == 'module.':
                found['module.'].append(rel)
            if isinstance(node, ast.FunctionDef) and node.name == 'build_network':
                found['build'].append(rel)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Call) and \
                    getattr(node.func.func, 'attr', '') == 'get' and \
                    getattr(node.func.func.value, 'id', '') == 'ARCH_REGISTRY':   # ARCH_REGISTRY.get(name)(**kwargs)
                found['build'].append(rel)
    assert sorted(set(found['torch.load'])) == ['nl_plugin/checkpoint.py', 'nl_plugin/weights.py']
    assert sorted(set(found['module.'])) == ['nl_plugin/weights.py']
    # compat's fix 6 is BasicSR's entry point, a one-line call of the one builder
    assert sorted(found['build']) == ['nl_plugin/compat.py', 'nl_plugin/weights.py']
