"""Model statistics: parameters, multiply-adds, depth, receptive field; the table script and the
per-block overhead of an injected network."""
import json

import torch
from basicsr.utils.registry import ARCH_REGISTRY

from nl_plugin.analysis.commands import model_stats
from nl_plugin.analysis.model_stats import (
    Case,
    all_cases,
    count_parameters,
    graph_depth,
    injection_overhead,
    multiply_adds,
    receptive_field,
    stats_row,
)
from nl_plugin.archs.dncnn_arch import DnCNN
from nl_plugin.archs.nlrn_arch import NLRN


def test_dncnn_counts_by_hand():
    net = DnCNN(num_feat=8, depth=5)
    total, no_bn = count_parameters(net)
    # convs 1->8 (+bias), 3 x 8->8 (no bias), 8->1 (+bias); 3 BatchNorms of 8 (weight + bias)
    convs = (9 * 8 + 8) + 3 * 9 * 64 + (9 * 8 + 1)
    assert (total, no_bn) == (convs + 3 * 16, convs)
    assert multiply_adds(net, torch.rand(1, 1, 20, 30)) == 20 * 30 * 9 * (8 + 3 * 64 + 8)
    assert graph_depth(net, torch.rand(1, 1, 16, 16)) == 5
    assert receptive_field(net, torch.rand(1, 1, 32, 32)) == (11, 11)     # five 3x3 convs


def test_nlrn_depth_is_one_plus_three_per_step_plus_one():
    for steps, every in ((2, 1), (4, 2)):
        net = NLRN(num_feat=8, num_embed=4, num_steps=steps, nonlocal_every=every, nl_scope='window', window_size=3)
        nl_steps = len(range(0, steps, every))
        assert graph_depth(net, torch.rand(1, 1, 12, 12)) == 1 + 2 * steps + nl_steps + 1
    # the official network: 330,625 parameters outside BatchNorm, unrolled depth 38
    row = stats_row(Case('NLRN', {'type': 'NLRN'}), (8, 8), rf_size=8, depth_size=8)
    assert (row['params_no_bn'], row['depth']) == (330625, 38)


def test_window_reach_grows_with_the_steps_and_zero_g_is_looked_through():
    def rf(steps):
        net = NLRN(num_feat=8, num_embed=4, num_steps=steps, nl_scope='window', window_size=3,
                   img_range=1.0)  # random weights on 0..255 pixels saturate the softmax: gradients vanish
        return receptive_field(net, torch.rand(1, 1, 41, 41))
    # radius: conv_first and conv_last 1 each; every step the window's 1 and its two 3x3 convs' 2 (with g
    # left at zero the window would add nothing: 9 and 13)
    assert rf(1) == (2 * (2 + 3) + 1,) * 2 and rf(2) == (2 * (2 + 6) + 1,) * 2


def test_multiply_adds_on_the_meta_device_equal_a_real_run():
    net = NLRN(num_feat=8, num_embed=4, num_steps=2, nl_scope='window', window_size=5).eval()
    x = torch.rand(1, 1, 24, 21)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    assert multiply_adds(net, x) == counter.get_total_flops() // 2 > 0


def test_table_covers_every_registered_architecture():
    ours = {name for name, obj in ARCH_REGISTRY if getattr(obj, '__module__', '').startswith('nl_plugin.')}
    cases = all_cases()
    assert ours <= {c.net_opt['type'] for c in cases}
    assert {'EDSR', 'RRDBNet'} <= {c.net_opt['type'] for c in cases}     # the hybrids' bases, for comparison


def test_script_table_and_json(tmp_path, capsys):
    rows = model_stats(['--only', 'DnCNN', 'N3SetBlock', '--size', '16', '24', '--rf_size', '40',
                       '--json', str(tmp_path / 's.json')])
    out = capsys.readouterr().out
    assert 'DnCNN-17' in out and 'GMACs 24x16' in out and '35x35' in out
    saved = json.loads((tmp_path / 's.json').read_text())
    assert [r['network'] for r in saved['rows']] == [r['network'] for r in rows]
    dncnn = rows[0]
    assert dncnn['depth'] == 17 and dncnn['params'] == sum(p.numel() for p in DnCNN(depth=17).parameters())
    assert rows[1]['rf'] is None      # a set block has no image receptive field


def test_injection_overhead_has_a_row_per_block():
    net_opt = {'type': 'NonLocalInjection',
               'base': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': 2},
               'blocks': [{'after': 'body.0', 'type': 'N3Block', 'k': 2, 'embed_feat': 8, 'patch_size': 4,
                           'stride': 2, 'search_size': 5},
                          {'after': 'body.1', 'type': 'WindowedNonLocalBlock', 'nl_scope': 'window', 'window_size': 5,
                           'num_embed': 4}]}
    rows = injection_overhead(net_opt, size=(24, 20), repeats=1)
    assert [r['block'] for r in rows] == ['base alone', 'after body.0: N3Block', 'after body.1: WindowedNonLocalBlock']
    assert rows[0]['seconds'] > 0 and rows[0]['mb'] == rows[0]['mb']      # a number (not NaN) on Linux
    for r in rows[1:]:
        assert r['seconds'] > 0 and r['added_mb'] == r['mb'] - rows[0]['mb'] and 'added_seconds' in r
