"""The visualize_attention command (scripts/visualize_attention.py) on small trained-like NLRN / N3Net /
injected networks: PNG files of the expected size, and the weights drawn sum to one per query."""

import cv2
import numpy as np
import pytest
import torch
import yaml

from nl_plugin.analysis.commands import visualize_attention
from nl_plugin.analysis.networks import build_network

pytest.importorskip('matplotlib')

NLRN = {'type': 'NLRN', 'num_feat': 8, 'num_embed': 4, 'num_steps': 3, 'nl_scope': 'window', 'window_size': 7}
N3NET = {'type': 'N3Net', 'num_feat': 8, 'depth': 2, 'num_inter_ch': 4, 'k': 3, 'patch_size': 4, 'stride': 2,
         'search_size': 5, 'embed_feat': 8}
INJECTED = {'type': 'NonLocalInjection',
            'base': {'type': 'EDSR', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 2, 'upscale': 2},
            'blocks': [{'after': 'body.1', 'type': 'WindowedNonLocalBlock', 'nl_scope': 'window', 'window_size': 5,
                        'num_embed': 4}]}
PANEL, CBAR, TITLE = 128, 56, 28


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('viz')
    torch.manual_seed(0)
    for name, opt in (('nlrn', NLRN), ('n3net', N3NET), ('injected', INJECTED)):
        net = build_network(opt)
        for p in net.parameters():       # stand-in for trained weights: g != 0, soft attention
            p.data.add_(0.05 * torch.randn_like(p))
        torch.save({'params': net.state_dict()}, root / f'{name}.pth')
        (root / f'{name}.yml').write_text(yaml.safe_dump({'network_g': opt}))
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (40, 46, 3), dtype=np.uint8), (5, 5), 0)
    cv2.imwrite(str(root / 'img.png'), img)
    return root


def _run(files, name, *extra):
    out = files / f'{name}_{len(extra)}.png'
    res = visualize_attention(
        ['-opt', str(files / f'{name}.yml'), '--weights', str(files / f'{name}.pth'), '--image', str(files / 'img.png'),
         '--out', str(out), '--save_arrays', str(files / f'{name}.npz')] + list(extra))
    png = cv2.imread(str(out))
    assert png is not None and png.shape[:2] == res['size']
    return res, png, dict(np.load(files / f'{name}.npz'))


def test_nlrn_steps_with_and_without_propagation(files):
    res, png, arrays = _run(files, 'nlrn', '--sigma', '25', '--pixels', '0,0', '20,30')
    # per pixel: a row of propagated attention and a row of each step alone; image + 3 steps + colour bar
    assert png.shape[:2] == (TITLE + 4 * PANEL, 4 * PANEL + CBAR)
    assert sorted(arrays) == ['q0_row0', 'q0_row1', 'q1_row0', 'q1_row1']
    assert arrays['q0_row0'].shape == (3, 4, 4) and arrays['q1_row0'].shape == (3, 7, 7)   # corner window clipped
    for a in arrays.values():
        assert np.allclose(a.sum((1, 2)), 1, atol=1e-5) and (a >= 0).all()
    # next to a model without correlation propagation (one row per pixel)
    res, png, arrays = _run(files, 'nlrn', '--pixels', '20,30', '--compare', str(files / 'nlrn.pth'),
                            '--compare_set', 'propagate_correlation=false')
    assert png.shape[:2] == (TITLE + 3 * PANEL, 4 * PANEL + CBAR)
    assert np.allclose(arrays['q1_row0'], arrays['q0_row1'], atol=1e-6)   # B's attention = A's "step alone"


def test_n3net_neighbours_and_temperature(files):
    res, png, arrays = _run(files, 'n3net', '--pixels', '10,12', '39,45', '--block', '1')
    # a row per query (image + k = 3 neighbours) and one for the temperature map
    assert png.shape[:2] == (TITLE + 3 * PANEL, 4 * PANEL + CBAR)
    for a in arrays.values():
        assert a.shape[0] == 3 and np.allclose(a.sum((1, 2)), 1, atol=1e-5)


def test_block_inserted_into_another_network(files):
    res, png, arrays = _run(files, 'injected', '--pixels', '20,20')
    assert png.shape[:2] == (TITLE + PANEL, 2 * PANEL + CBAR)      # one call of the block: one step
    assert np.allclose(arrays['q0_row0'].sum((1, 2)), 1, atol=1e-5)


def test_bad_block_index_is_one_clear_error(files):
    with pytest.raises(ValueError, match=r'has 2 non-local blocks \(0..1\)'):
        _run(files, 'n3net', '--block', '2')


def test_set_takes_key_value_pairs(capsys):
    with pytest.raises(SystemExit):
        visualize_attention(['-opt', 'x.yml', '--image', 'x.png', '--out', 'o.png', '--set', 'window_size'])
    assert "expected KEY=VALUE, got 'window_size'" in capsys.readouterr().err
