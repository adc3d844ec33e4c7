"""RestorationModel features, exercised on a model built from an option dict (no CLI)."""
import logging

import pytest
import torch
from basicsr.models import build_model

from conftest import make_opt, model_batch


def test_weight_decay_groups_exclude_biases(tmp_path):
    model = build_model(make_opt(tmp_path, train={'optim_g': {
        'type': 'Adam', 'lr': 1e-3, 'weight_decay': 1e-4, 'no_weight_decay': ['bias$']}}))
    groups = model.optimizer_g.param_groups
    assert [g['weight_decay'] for g in groups] == [1e-4, 0.0]
    names = dict((id(p), n) for n, p in model.net_g.named_parameters())
    assert all(names[id(p)].endswith('weight') for p in groups[0]['params'])
    assert all(names[id(p)].endswith('bias') for p in groups[1]['params'])


def test_exponential_decay_reaches_lr_end(tmp_path):
    """lr_end is the lr after total_iter (= decay_iter) iterations: iteration 11 of a 10-iteration run."""
    model = build_model(make_opt(tmp_path, train={'scheduler': {'type': 'ExponentialDecayLR', 'lr_end': 1e-8}}))
    lrs = []
    for it in range(1, 12):
        model.update_learning_rate(it)
        lrs.append(model.get_current_learning_rate()[0])
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-8, rel=1e-6)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))


def test_exponential_decay_per_epoch(tmp_path):
    """decay_every: N3Net's lr = 1e-3 * 10^(-3e/50) in epoch e (here 2 iterations an epoch, 50 epochs)."""
    model = build_model(make_opt(tmp_path, train={'total_iter': 100, 'scheduler': {
        'type': 'ExponentialDecayLR', 'lr_end': 1e-6, 'decay_every': 2}}))
    for it in range(1, 101):
        model.update_learning_rate(it)
        assert model.get_current_learning_rate()[0] == pytest.approx(1e-3 * 10**(-3 * ((it - 1) // 2) / 50), rel=1e-9)


def test_value_clipping_divided_by_lr(tmp_path):
    """VDSR's adjustable clipping: every gradient element within [-theta / lr, theta / lr]."""
    model = build_model(make_opt(tmp_path, train={
        'grad_clip': {'mode': 'value', 'max_value': 1e-6, 'divide_by_lr': True},
        'optim_g': {'type': 'SGD', 'lr': 0.01}}))
    model.feed_data(model_batch())
    model.optimize_parameters(1)
    grads = torch.cat([p.grad.flatten() for p in model.net_g.parameters()])
    assert grads.abs().max().item() == pytest.approx(1e-4, rel=1e-5)


@pytest.mark.parametrize('mode', ['global_norm', 'per_tensor'])
def test_grad_clipping(tmp_path, mode):
    model = build_model(make_opt(tmp_path, train={'grad_clip': {'mode': mode, 'max_norm': 1e-3},
                                                 'optim_g': {'type': 'SGD', 'lr': 0.0}}))
    model.feed_data(model_batch())
    model.optimize_parameters(1)
    grads = [p.grad for p in model.net_g.parameters()]
    if mode == 'global_norm':
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == pytest.approx(1e-3, rel=1e-4)
    else:  # every tensor clipped on its own (TF clip_by_norm)
        assert all(g.norm().item() == pytest.approx(1e-3, rel=1e-4) for g in grads)


def test_residual_learning_adds_input(tmp_path):
    model = build_model(make_opt(tmp_path, residual_learning=True, val={'metrics': {}}))
    x = torch.rand(1, 1, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model._forward(model.net_g, x), x + model.net_g(x))


def test_nan_loss_raises_clear_error(tmp_path):
    model = build_model(make_opt(tmp_path))
    data = model_batch()
    data['lq'][0, 0, 0, 0] = float('nan')
    model.feed_data(data)
    with pytest.raises(FloatingPointError, match='iter 7: the training loss is not finite'):
        model.optimize_parameters(7)


def test_wrong_channel_count_names_file(tmp_path):
    model = build_model(make_opt(tmp_path))
    with pytest.raises(ValueError, match=r'a\.png: input has 3 channels but network_g expects 1'):
        model.feed_data(model_batch(c=3))


@pytest.mark.parametrize('section,key', [('train', 'grad_clp'), ('val', 'tiles')])
def test_unknown_option_keys_are_named(tmp_path, section, key):
    opt = make_opt(tmp_path, val={})
    opt[section][key] = 1
    with pytest.raises(KeyError, match=f"{section}: unknown option key.*{key}"):
        build_model(opt)


def test_unknown_network_key_is_named(tmp_path):
    opt = make_opt(tmp_path)
    opt['network_g']['num_feats'] = 3
    with pytest.raises(KeyError, match=r"unknown option key\(s\) \['num_feats'\].*did you mean 'num_feat'"):
        build_model(opt)


def test_unknown_type_suggests_names(tmp_path):
    opt = make_opt(tmp_path)
    opt['model_type'] = 'RestorationModle'
    with pytest.raises(KeyError, match="Did you mean 'RestorationModel'"):
        build_model(opt)


def test_tiled_and_ensemble_inference(tmp_path):
    plain = build_model(make_opt(tmp_path, val={}))
    tiled = build_model(make_opt(tmp_path, val={'tile': {'size': 5, 'stride': 3, 'batch': 4}, 'self_ensemble': True}))
    tiled.net_g.load_state_dict(plain.net_g.state_dict())
    data = model_batch()
    for m in (plain, tiled):
        m.feed_data(data)
        m.test()
    torch.testing.assert_close(tiled.output, plain.output)  # pointwise net: tiling and ensemble are exact


def _failing_backend(gm, example_inputs):
    raise RuntimeError('this backend cannot compile')


def _backward_failing_backend(gm, example_inputs):
    """Compiles the forward (runs the graph as is) but its backward fails, as a compiler failing there."""
    def hook(grad):
        raise RuntimeError('backward kernel failed to compile')

    def run(*args):
        outs = gm(*args)
        for o in (outs if isinstance(outs, (list, tuple)) else [outs]):
            if isinstance(o, torch.Tensor) and o.requires_grad:
                o.register_hook(hook)
        return outs
    return run


@pytest.fixture
def basicsr_log(caplog):
    """caplog for BasicSR's logger (which does not propagate to the root logger)."""
    logger = logging.getLogger('basicsr')
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize('backend', [_failing_backend, _backward_failing_backend])
def test_compile_failure_falls_back_to_eager(tmp_path, backend, basicsr_log):
    eager = build_model(make_opt(tmp_path))
    model = build_model(make_opt(tmp_path, compile={'backend': backend}))
    model.net_g.load_state_dict(eager.net_g.state_dict())
    data = model_batch()
    for m in (eager, model):
        m.feed_data(data)
        m.optimize_parameters(1)
    text = basicsr_log.text
    assert 'compile: torch.compile of _TestPointNet failed' in text and 'it runs eagerly' in text
    assert ('cannot compile' if backend is _failing_backend else 'backward kernel failed') in text
    assert not model._compiler().active(model.net_g)
    for a, b in zip(model.net_g.parameters(), eager.net_g.parameters()):     # the same (eager) step
        torch.testing.assert_close(a, b)
    model.feed_data(data)
    model.test()
    assert model.output.shape == data['lq'].shape


@pytest.mark.parametrize('key,value,match', [('compile', 'yes', 'compile must be'), ('tf32', 1, 'tf32 must'),
                                             ('channels_last', 'auto', 'channels_last must')])
def test_device_options_are_checked(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(make_opt(tmp_path, **{key: value}))
    with pytest.raises(KeyError, match=r"compile: unknown option key\(s\) \['mdoe'\]"):
        build_model(make_opt(tmp_path, compile={'mdoe': 'max-autotune'}))


def test_channels_last_network_gives_the_same_output(tmp_path):
    plain = build_model(make_opt(tmp_path, val={}))
    cl = build_model(make_opt(tmp_path, val={}, channels_last=True))
    assert cl.net_g.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    cl.net_g.load_state_dict(plain.net_g.state_dict())
    data = model_batch()
    for m in (plain, cl):
        m.feed_data(data)
        m.test()
    torch.testing.assert_close(cl.output, plain.output)


@pytest.mark.slow
def test_compile_trains_and_validates_a_small_dncnn_on_the_cpu(tmp_path):
    """A real torch.compile (inductor, C++ on the CPU): 5-50 s here, depending on the compiler cache."""
    net = {'type': 'DnCNN', 'num_in_ch': 1, 'num_out_ch': 1, 'num_feat': 8, 'depth': 3}
    eager = build_model(make_opt(tmp_path, network_g=dict(net)))
    model = build_model(make_opt(tmp_path, network_g=dict(net), compile=True))
    model.net_g.load_state_dict(eager.net_g.state_dict())
    data = model_batch()
    for m in (eager, model):
        m.feed_data(data)
        m.optimize_parameters(1)
        m.feed_data(data)
        m.test()
    assert model._compiler().active(model.net_g)
    torch.testing.assert_close(model.output, eager.output, rtol=1e-4, atol=1e-5)
