"""The precision policy (nl_plugin.models.precision) and its use by RestorationModel: options, ``auto``
detection from CPU flags, autocast during training and validation, fp32 master weights, fp16 loss scaling."""
import logging

import pytest
import torch
import yaml
from basicsr.models import build_model

from conftest import basicsr_cmd, make_opt, model_batch, read_log, run, write_cli_opt
from nl_plugin.models.precision import ModelPrecision, check_precision, cpu_bf16_flags, fast_bf16, resolve_precision

pytestmark = pytest.mark.usefixtures('one_thread')


def cpuinfo(tmp_path, flags):
    path = tmp_path / 'cpuinfo'
    path.write_text(f'processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n')
    return str(path)


@pytest.mark.parametrize('flags,expected', [('avx512f amx_tile amx_bf16', torch.bfloat16),
                                            ('avx512f avx512_bf16', torch.bfloat16),
                                            ('avx512f avx512_vnni', None), ('', None)])
def test_auto_reads_the_cpu_bf16_flags(tmp_path, flags, expected):
    path = cpuinfo(tmp_path, flags)
    dtype, why = resolve_precision('auto', 'cpu', cpuinfo=path)
    assert dtype is expected
    assert why.startswith('auto: CPU ')
    if expected is None:
        assert 'neither amx_bf16 nor avx512_bf16' in why
    else:
        assert set(cpu_bf16_flags(path)) == set(flags.split()) & {'amx_bf16', 'avx512_bf16'}


def test_auto_without_cpu_flags_is_fp32(tmp_path):
    fast, why = fast_bf16('cpu', cpuinfo=str(tmp_path / 'missing'))
    assert not fast and 'not found' in why
    assert resolve_precision('auto', 'cpu', cpuinfo=str(tmp_path / 'missing'))[0] is None


def test_explicit_precisions_and_errors():
    assert resolve_precision('fp32', 'cpu') == (None, 'set in the options')
    assert resolve_precision('bf16', 'cpu')[0] is torch.bfloat16
    assert resolve_precision('fp16', 'cpu')[0] is torch.float16
    with pytest.raises(ValueError, match=r"val:precision: precision must be one of .* got 'bfloat16' "
                                         r"\(did you mean 'bf16'\?\)"):
        check_precision('bfloat16', 'val:precision')
    with pytest.raises(ValueError, match="got 'fp8'"):
        check_precision('fp8', 'train:precision')


def test_bad_precision_option_is_named(tmp_path):
    with pytest.raises(ValueError, match="train:precision: .* got 'float16' \\(did you mean 'fp16'\\?\\)"):
        build_model(make_opt(tmp_path, train={'precision': 'float16'}))
    with pytest.raises(ValueError, match="val:precision"):
        build_model(make_opt(tmp_path, val={'precision': 'half'}))


def test_log_names_choice_and_reason(tmp_path, caplog):
    opt = make_opt(tmp_path, train={'precision': 'bf16'}, val={'precision': 'fp32'})
    with caplog.at_level(logging.INFO, logger='basicsr'):
        ModelPrecision(opt, 'cpu', logging.getLogger('basicsr'))
    assert 'Training precision: bf16 (set in the options)' in caplog.text
    assert 'Validation precision: fp32 (set in the options)' in caplog.text


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_training_step_keeps_fp32_master_weights(tmp_path, precision):
    """Autocast leaves parameters, gradients, optimizer state and checkpoints in fp32; the output the
    loss sees is fp32; fp16 scales the loss (the step is skipped if the scaled gradients overflow)."""
    opt = make_opt(tmp_path, train={'precision': precision, 'grad_clip': {'mode': 'global_norm', 'max_norm': 1.0}},
                   val={'precision': precision})
    model = build_model(opt)
    before = [p.detach().clone() for p in model.net_g.parameters()]
    seen = []
    model.net_g.register_forward_hook(lambda m, i, o: seen.append((o.dtype, torch.is_autocast_enabled('cpu'))))
    model.feed_data(model_batch())
    model.optimize_parameters(1)
    low = {'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    assert seen == [(low, True)]                # the network's last conv runs in the low precision
    assert model.output.dtype == torch.float32  # what the loss saw
    scaler = model.precision.scaler
    assert (scaler is not None) == (precision == 'fp16')
    if scaler is not None:   # steps whose scaled gradients overflow are skipped, each halving the scale (2^16 first)
        for it in range(2, 40):
            if not all(torch.equal(p, b) for p, b in zip(model.net_g.parameters(), before)):
                break
            assert scaler.get_scale() < 2.0**16
            model.optimize_parameters(it)
    for p, b in zip(model.net_g.parameters(), before):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and not torch.equal(p, b)
    state = model.optimizer_g.state[next(model.net_g.parameters())]
    assert state['exp_avg'].dtype == torch.float32 and state['exp_avg_sq'].dtype == torch.float32
    (tmp_path / 'models').mkdir()
    model.save_network(model.net_g, 'net_g', 1)
    saved = torch.load(tmp_path / 'models' / 'net_g_1.pth', weights_only=True)['params']
    assert all(t.dtype == torch.float32 for t in saved.values())
    model.test()
    assert model.output.dtype == torch.float32


def test_validation_runs_under_its_own_precision(tmp_path):
    model = build_model(make_opt(tmp_path, train={'precision': 'fp32'}, val={'precision': 'bf16'}))
    seen = []
    model.net_g.body[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.feed_data(model_batch())
    model.optimize_parameters(1)
    model.test()
    assert seen == [torch.float32, torch.bfloat16]


def test_cli_trains_with_auto_precision_and_logs_the_choice(cli_workdir):
    opt = write_cli_opt(cli_workdir, 'auto_precision', total_iter=2)
    data = yaml.safe_load(opt.read_text())
    data['train']['precision'] = 'auto'
    data['val']['precision'] = 'bf16'
    opt.write_text(yaml.safe_dump(data))
    r = run([basicsr_cmd(), 'train', '-opt', str(opt)], cli_workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(cli_workdir / 'experiments' / 'auto_precision')
    expected = 'bf16' if fast_bf16('cpu')[0] else 'fp32'
    assert f'Training precision: {expected} (auto: CPU ' in log
    assert 'Validation precision: bf16 (set in the options)' in log and '# psnr:' in log
    saved = torch.load(cli_workdir / 'experiments' / 'auto_precision' / 'models' / 'net_g_2.pth', weights_only=True)
    assert all(t.dtype == torch.float32 for t in saved['params'].values() if t.is_floating_point())
