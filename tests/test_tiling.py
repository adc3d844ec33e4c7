"""Test-time tiling (start offsets, overlap averaging, scale) and the x8 self-ensemble."""
import itertools

import pytest
import torch
from torch import nn

from nl_plugin.ops.tiling import self_ensemble, tile_starts, tiled_forward


def test_tile_starts_cover_and_last_flush():
    starts = tile_starts(321, 45, 7)
    assert starts[0] == 0 and starts[-1] == 321 - 45
    assert all(b - a <= 7 for a, b in zip(starts, starts[1:]))
    assert tile_starts(30, 45, 7) == [0]  # tile clamped to a small image
    assert tile_starts(52, 45, 7) == [0, 7]
    with pytest.raises(ValueError, match='stride'):
        tile_starts(10, 4, 0)


def test_tiled_equals_untiled_for_pointwise_conv_net(device):
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).double().to(device)
    x = torch.randn(2, 3, 37, 29, dtype=torch.float64).to(device)
    for kwargs in (dict(stride=7), dict(overlap=5), dict(overlap=0)):
        y = tiled_forward(net, x, 11, tile_batch=4, **kwargs)
        torch.testing.assert_close(y, net(x), rtol=0, atol=1e-12)


def test_tiled_overlap_is_averaged():
    # fn adds a different constant to every tile of a batch: each output pixel must be the mean of
    # the constants of the tiles covering it.
    counter = itertools.count()

    def fn(t):
        return t + torch.tensor([float(next(counter)) for _ in range(t.shape[0])]).view(-1, 1, 1, 1)

    x = torch.zeros(1, 1, 10, 6, dtype=torch.float64)
    y = tiled_forward(fn, x, 6, stride=4, tile_batch=1)
    # tiles start at rows 0 and 4 (constants 0 and 1): rows 4-5 are covered by both -> 0.5
    expected = torch.tensor([0.0] * 4 + [0.5] * 2 + [1.0] * 4, dtype=torch.float64).view(1, 1, 10, 1)
    expected = expected.expand(1, 1, 10, 6)
    torch.testing.assert_close(y, expected)


def test_tiled_with_scale():
    up = nn.Upsample(scale_factor=2, mode='nearest')
    x = torch.randn(1, 1, 9, 13)
    torch.testing.assert_close(tiled_forward(up, x, 5, stride=3, scale=2), up(x))


def _explicit_transforms():
    """The 8 dihedral maps as (forward, inverse) pairs written with transpose/flip only."""
    def t(x):
        return x.transpose(-2, -1)
    pairs = []
    for transpose in (False, True):
        for fv in (False, True):
            for fh in (False, True):
                def fwd(x, transpose=transpose, fv=fv, fh=fh):
                    x = t(x) if transpose else x
                    x = x.flip(-2) if fv else x
                    return x.flip(-1) if fh else x

                def inv(y, transpose=transpose, fv=fv, fh=fh):
                    y = y.flip(-1) if fh else y
                    y = y.flip(-2) if fv else y
                    return t(y) if transpose else y
                pairs.append((fwd, inv))
    return pairs


def test_self_ensemble_equals_mean_of_eight_transformed_outputs(device):
    net = nn.Conv2d(1, 1, 3, padding=1, bias=True).double().to(device)  # not rotation-equivariant
    x = torch.randn(1, 1, 7, 9, dtype=torch.float64).to(device)
    expected = sum(inv(net(fwd(x))) for fwd, inv in _explicit_transforms()) / 8
    with torch.no_grad():
        torch.testing.assert_close(self_ensemble(net, x), expected.detach())
        assert not torch.allclose(self_ensemble(net, x), net(x))
