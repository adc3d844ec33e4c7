"""The N3 block's pure functions against naive dense references (forward and gradients)."""
import dataclasses
import itertools
import math

import pytest
import torch
from torch.autograd import gradcheck

from nl_plugin.ops import n3

D64 = torch.float64


pytestmark = pytest.mark.usefixtures('one_thread')


def nondet_tol(device):
    """gradcheck's tolerance between two backward passes of the same input: the fold's ``index_add_``
    adds with atomics on CUDA, in an order that changes from run to run (fp64 rounding, ~1e-16)."""
    return 1e-12 if torch.device(device).type == 'cuda' else 0.0


def naive_patches(x, p, s):
    """Patches by explicit slicing, (B, L, C*p*p) in row-major grid order."""
    b, c, h, w = x.shape
    out = [x[:, :, i:i + p, j:j + p].reshape(b, -1) for i in range(0, h - p + 1, s) for j in range(0, w - p + 1, s)]
    return torch.stack(out, 1)


def naive_fold(patches, size, p, s, c):
    h, w = size
    img = patches.new_zeros(patches.shape[0], c, h, w)
    cnt = patches.new_zeros(1, 1, h, w)
    idx = 0
    for i in range(0, h - p + 1, s):
        for j in range(0, w - p + 1, s):
            img[:, :, i:i + p, j:j + p] += patches[:, idx].view(-1, c, p, p)
            cnt[:, :, i:i + p, j:j + p] += 1
            idx += 1
    return img / cnt


def naive_candidates(nh, nw, win):
    out = []
    for i, j in itertools.product(range(nh), range(nw)):
        wh, ww = min(win, nh), min(win, nw)
        r0 = min(max(i - wh // 2, 0), nh - wh)
        c0 = min(max(j - ww // 2, 0), nw - ww)
        out.append([r * nw + c for r in range(r0, r0 + wh) for c in range(c0, c0 + ww) if (r, c) != (i, j)])
    return torch.tensor(out)


def naive_knn(logits, k):
    """Eqs. 8-11 literally: softmax, then add log(1 - w)."""
    ws = []
    for _ in range(k):
        w = torch.softmax(logits, -1)
        ws.append(w)
        logits = logits + torch.log(1 - w)
    return torch.stack(ws, -2)


def naive_knn_paper(alpha, k, t):
    ws = []
    for _ in range(k):
        w = torch.softmax(alpha / t, -1)
        ws.append(w)
        alpha = alpha + torch.log(1 - w)
    return torch.stack(ws, -2)


def dense_weights(weights, index, n):
    """Scatter (B, L, k, M) weights at ``index`` into dense (B, L, k, N)."""
    b, q, k, m = weights.shape
    return weights.new_zeros(b, q, k, n).scatter(3, index.expand(b, q, m)[:, :, None].expand(b, q, k, m), weights)


def test_padding_rule():
    # official: pad = (-(H - p)) mod s, floor on top/left, ceil at the bottom/right
    assert n3.patch_grid_padding(321, 481, 10, 5) == (2, 2, 2, 2)
    assert n3.patch_grid_padding(80, 83, 10, 5) == (1, 1, 0, 0)
    assert n3.patch_grid_padding(84, 80, 10, 5) == (0, 0, 0, 1)
    assert n3.patch_grid_padding(7, 10, 10, 5) == (0, 0, 1, 2)  # smaller than a patch: one patch
    xp, _ = n3.pad_to_patch_grid(torch.zeros(1, 1, 321, 481), 10, 5)
    assert n3.patch_grid_shape(*xp.shape[-2:], 10, 5) == (64, 96)
    with pytest.raises(ValueError, match='not tiled exactly'):
        n3.extract_patches(torch.zeros(1, 1, 12, 10), 10, 5)


def test_extract_and_fold_match_naive():
    x = torch.randn(2, 3, 17, 22, dtype=D64, requires_grad=True)
    p, s = 7, 5
    assert torch.allclose(n3.extract_patches(x, p, s), naive_patches(x, p, s))
    pt = n3.extract_patches(x, p, s).detach().clone().requires_grad_(True)
    assert torch.allclose(n3.fold_patches(pt, (17, 22), p, s), naive_fold(pt, (17, 22), p, s, 3))
    # folding the patches of an image with overlap averaging gives the image back
    assert torch.allclose(n3.fold_patches(n3.extract_patches(x, p, s), (17, 22), p, s), x)
    small = torch.randn(1, 1, 7, 9, dtype=D64, requires_grad=True)
    assert gradcheck(lambda t: n3.extract_patches(t, 3, 2), (small,))
    sp = torch.randn(1, 6, 9, dtype=D64, requires_grad=True)  # 6 patches of 1x3x3 on a 5x7 image
    assert gradcheck(lambda t: n3.fold_patches(t, (5, 7), 3, 2), (sp,))


def test_search_starts_clamped_inside_the_grid():
    for n, size in [(20, 15), (15, 15), (4, 15), (9, 4)]:
        starts, extent = n3.search_starts(n, size)
        assert extent == min(n, size)
        assert starts.tolist() == [min(max(i - extent // 2, 0), n - extent) for i in range(n)]


@pytest.mark.parametrize('nh,nw,win', [(17, 20, 15), (15, 15, 15), (4, 9, 15), (9, 30, 5), (6, 6, 4)])
def test_candidate_index(nh, nw, win):
    idx = n3.candidate_index(nh, nw, win)
    assert torch.equal(idx, naive_candidates(nh, nw, win))
    assert idx.shape == (nh * nw, min(win, nh) * min(win, nw) - 1)
    assert not (idx == torch.arange(nh * nw)[:, None]).any()  # the query is excluded
    assert idx.min() >= 0 and idx.max() < nh * nw
    if (nh, nw, win) == (17, 20, 15):
        assert idx.shape[1] == 224  # official: 15x15 window minus the query


def test_patch_sqdist_matches_dense_and_gradcheck():
    q = torch.randn(2, 12, 5, dtype=D64, requires_grad=True)
    idx = n3.candidate_index(3, 4, 3)
    dense = torch.cdist(q, q).pow(2)  # all pairs
    ref = torch.gather(dense, 2, idx.expand(2, -1, -1))
    assert torch.allclose(n3.patch_sqdist(q, q, idx), ref)
    assert gradcheck(lambda t: n3.patch_sqdist(t, t, idx), (q,))
    # batch-specific index
    bidx = torch.stack([idx, idx.flip(1)])
    assert torch.allclose(n3.patch_sqdist(q, q, bidx)[1], ref[1].flip(1))


def test_log1mexp_stable_and_gradcheck():
    a = torch.tensor([-1e-20, -1e-10, -0.1, -math.log(2), -1.0, -40.0, -800.0], dtype=D64)
    ref = torch.tensor([math.log(1e-20), math.log(1e-10) - 0.5e-10, math.log(-math.expm1(-0.1)), math.log(0.5),
                        math.log1p(-math.exp(-1.0)), -math.exp(-40.0), 0.0], dtype=D64)
    out = n3.log1mexp(a)
    assert torch.allclose(out, ref, rtol=1e-12, atol=0)
    naive = torch.log(1 - torch.exp(a))
    assert torch.isinf(naive[0]) and naive[-2] == 0  # what the naive formula loses
    assert n3.log1mexp(torch.tensor(-float('inf'))) == 0
    g = torch.linspace(-5, -0.01, 23, dtype=D64, requires_grad=True)
    assert gradcheck(n3.log1mexp, (g,))
    n3.log1mexp(torch.tensor([-1e-30, -100.0], requires_grad=True)).sum().backward()  # no NaN path


def test_continuous_knn_matches_eqs_and_gradcheck():
    logits = (torch.randn(3, 4, 11, dtype=D64) * 2).requires_grad_(True)
    w = n3.continuous_knn(logits, 5)
    assert w.shape == (3, 4, 5, 11)
    assert torch.allclose(w, naive_knn(logits, 5), atol=1e-12)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, 5, dtype=D64))
    small = logits[:2, :2, :6].detach().clone().requires_grad_(True)
    assert gradcheck(lambda t: n3.continuous_knn(t, 3), (small,))
    temp = (torch.rand(2, 2, 1, dtype=D64) + 0.5).requires_grad_(True)
    assert torch.allclose(n3.continuous_knn(small, 4, temperature=temp), naive_knn_paper(small, 4, temp), atol=1e-12)
    assert gradcheck(lambda t, tt: n3.continuous_knn(t, 3, temperature=tt), (small, temp), fast_mode=True)
    # gradients agree with the literal formula
    gw = torch.randn_like(w)
    g1, = torch.autograd.grad((w * gw).sum(), logits)
    g2, = torch.autograd.grad((naive_knn(logits, 5) * gw).sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-10)
    # -inf logits are never selected
    masked = logits.detach().clone()
    masked[..., 0] = -float('inf')
    assert (n3.continuous_knn(masked, 4)[..., 0] == 0).all()


def test_continuous_knn_tends_to_hard_knn():
    """Paper placement of the temperature: w_j -> one-hot of the j-th nearest as t -> 0."""
    # distinct distances at least 0.25 apart, random order
    d = torch.stack([torch.randperm(40) for _ in range(6)]).to(D64) * 0.25 + torch.rand(6, 40, dtype=D64) * 0.05
    hard = n3.hard_knn_weights(d, 5)
    order = d.argsort(-1)[:, :5]
    assert torch.equal(hard.argmax(-1), order)  # hard k-NN: the 5 smallest distances, in order
    errs = [(n3.continuous_knn(-d, 5, temperature=t) - hard).abs().max().item() for t in (0.05, 0.01, 1e-3)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6
    # float32, extreme temperature: exact hard selection, no NaN
    w32 = n3.continuous_knn(-d.float(), 5, temperature=1e-6)
    assert torch.isfinite(w32).all() and torch.equal(w32, hard.float())
    # and gradients stay finite in the saturated regime
    lg = (-d / 1e-3).float().requires_grad_(True)
    n3.continuous_knn(lg, 5).pow(2).sum().backward()
    assert torch.isfinite(lg.grad).all()


def test_official_update_only_first_neighbour_hard():
    """Official placement (logits pre-divided by t): w_1 -> nearest, w_2 splits 1st/2nd (documented)."""
    d = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=D64)
    w = n3.continuous_knn(-d / 0.05, 2)
    assert torch.allclose(w[0, 0], torch.tensor([1.0, 0, 0, 0], dtype=D64), atol=1e-6)
    assert torch.allclose(w[0, 1], torch.tensor([0.5, 0.5, 0, 0], dtype=D64), atol=1e-6)
    # with t = 1 both placements coincide
    assert torch.allclose(n3.continuous_knn(-d, 3), n3.continuous_knn(-d, 3, temperature=1.0))


def naive_selection(alpha, k, t, g, knn_update):
    """Concrete k-NN literally: official softmax(logits + g_j / t) with logits = alpha / t, or paper
    softmax((alpha + g_j) / t); then log(1 - w) is added to the logits (official) or to alpha (paper)."""
    ws = []
    lg = alpha / t if knn_update == 'official' else alpha
    for j in range(k):
        w = torch.softmax(lg + g[..., j, :] / t if knn_update == 'official' else (lg + g[..., j, :]) / t, -1)
        ws.append(w)
        lg = lg + torch.log(1 - w)
    return torch.stack(ws, -2)


@pytest.mark.parametrize('knn_update', ['official', 'paper'])
def test_selection_inputs_and_neighbour_weights_match_naive(knn_update):
    alpha = torch.randn(2, 5, 9, dtype=D64) * 2
    t = torch.rand(2, 5, 1, dtype=D64) + 0.3
    torch.manual_seed(3)
    inputs = n3.selection_inputs(alpha, 3, t, knn_update, sample=True)
    torch.manual_seed(3)
    g = n3.gumbel_noise((2, 5, 3, 9), alpha)
    for sel in ('concrete', 'n3'):  # the same rule once noise is given; 'n3' blocks never draw it
        w = n3.neighbour_weights(*inputs, k=3, selection=sel)
        assert torch.allclose(w, naive_selection(alpha, 3, t, g, knn_update), atol=1e-12)
    det = n3.neighbour_weights(*n3.selection_inputs(alpha, 3, t, knn_update), k=3, selection='n3')
    assert torch.allclose(det, naive_selection(alpha, 3, t, torch.zeros_like(g), knn_update), atol=1e-12)
    logits, temp, noise = n3.selection_inputs(alpha, 3)  # no temperature: alpha unchanged, no noise
    assert logits is alpha and temp is None and noise is None
    d = torch.rand(2, 5, 9, dtype=D64)
    assert torch.equal(n3.neighbour_weights(-d, k=3, selection='knn'), n3.hard_knn_weights(d, 3))
    with pytest.raises(ValueError, match='selection'):
        n3.neighbour_weights(alpha, k=2, selection='soft')
    with pytest.raises(ValueError, match='knn_update'):
        n3.selection_inputs(alpha, 2, t, 'both')


def test_aggregate_matches_dense_and_gradcheck():
    b, nh, nw, d = 2, 3, 4, 6
    n = nh * nw
    idx = n3.candidate_index(nh, nw, 3)
    vals = torch.randn(b, n, d, dtype=D64, requires_grad=True)
    wts = torch.softmax(torch.randn(b, n, 2, idx.shape[1], dtype=D64), -1).requires_grad_(True)
    ref = dense_weights(wts, idx, n) @ vals.unsqueeze(1)  # (B, L, k, D)
    assert torch.allclose(n3.aggregate_patches(wts, vals, idx), ref)
    assert gradcheck(lambda w, v: n3.aggregate_patches(w, v, idx), (wts, vals))


def test_patch_temperature_modes():
    lt = torch.randn(1, 1, 15, 20, dtype=D64)
    mean = n3.patch_temperature(lt, 10, 5, 'mean')
    centre = n3.patch_temperature(lt, 10, 5, 'center')
    ref_mean = torch.exp(naive_patches(lt, 10, 5).mean(-1) + math.log(0.1))
    assert torch.allclose(mean, ref_mean)
    assert torch.allclose(centre[0, 0], torch.exp(lt[0, 0, 5, 5] + math.log(0.1)))
    with pytest.raises(ValueError, match='temperature mode'):
        n3.patch_temperature(lt, 10, 5, 'median')


@pytest.mark.parametrize('size,tile', [((80, 80), None), ((41, 67), (3, 4)), ((120, 95), None),
                                       ((120, 95), (6, 7)), ((12, 130), None)])
def test_tiled_equals_reference(size, tile, device):
    """The linear-time tiled search/aggregation equals the gather-based reference exactly."""
    p, s, win, k, c = 10, 5, 15, 3, 2
    x = torch.randn(2, c, *size, dtype=D64).to(device)
    xp, _ = n3.pad_to_patch_grid(x, p, s)
    nh, nw = n3.patch_grid_shape(*xp.shape[-2:], p, s)
    vals = n3.extract_patches(xp, p, s)
    idx = n3.candidate_index(nh, nw, win).to(device)
    plan = n3.make_tile_plan(nh, nw, win, tile=tile, device=device)
    dist = n3.patch_sqdist(vals, vals, idx)
    assert torch.allclose(n3.tiled_patch_sqdist(vals, plan), dist, atol=1e-10)
    logits = -dist / 30

    def wfn(lg):
        return n3.continuous_knn(lg, k)
    ref = n3.aggregate_patches(wfn(logits), vals, idx)
    ref = torch.stack([n3.fold_patches(ref[:, :, j], xp.shape[-2:], p, s, average=False) for j in range(k)], 1)
    out = n3.tiled_aggregate_fold(logits, vals, plan, wfn, p, s, c)
    assert torch.allclose(out, ref, atol=1e-12)


def test_tiled_gradients_equal_reference(device):
    p, s, win, k, c = 4, 2, 5, 2, 2
    x = torch.randn(1, c, 15, 13, dtype=D64).to(device)
    xp, _ = n3.pad_to_patch_grid(x, p, s)
    nh, nw = n3.patch_grid_shape(*xp.shape[-2:], p, s)
    plan = n3.make_tile_plan(nh, nw, win, tile=(2, 3), device=device)
    idx = n3.candidate_index(nh, nw, win).to(device)
    vals = n3.extract_patches(xp, p, s).clone().requires_grad_(True)

    def tiled(v):
        lg = -n3.tiled_patch_sqdist(v, plan) / 5
        return n3.tiled_aggregate_fold(lg, v, plan, lambda t: n3.continuous_knn(t, k), p, s, c)

    def reference(v):
        lg = -n3.patch_sqdist(v, v, idx) / 5
        z = n3.aggregate_patches(n3.continuous_knn(lg, k), v, idx)
        return torch.stack([n3.fold_patches(z[:, :, j], xp.shape[-2:], p, s, average=False) for j in range(k)], 1)

    gout = torch.randn_like(reference(vals))
    g1, = torch.autograd.grad((tiled(vals) * gout).sum(), vals)
    g2, = torch.autograd.grad((reference(vals) * gout).sum(), vals)
    assert torch.allclose(g1, g2, atol=1e-10)
    # gradcheck on a smaller grid (3 x 4 patches of 1 x 4 x 4)
    x = torch.randn(1, 1, 8, 10, dtype=D64).to(device)
    plan = n3.make_tile_plan(3, 4, 3, tile=(2, 3), device=device)
    vals = n3.extract_patches(x, p, s).clone().requires_grad_(True)
    assert gradcheck(lambda v: n3.tiled_aggregate_fold(-n3.tiled_patch_sqdist(v, plan) / 5, v, plan,
                                                       lambda t: n3.continuous_knn(t, k), p, s, 1), (vals,),
                     fast_mode=True, nondet_tol=nondet_tol(device))


def test_tile_plan_covers_every_candidate():
    for nh, nw, search in [(64, 96, 15), (15, 15, 15), (30, 17, 15), (11, 12, 2), (12, 11, 2)]:
        plan = n3.make_tile_plan(nh, nw, search)
        idx = n3.candidate_index(nh, nw, search)
        # each tile's local candidates, mapped back to global indices, are candidate_index
        glob = torch.gather(plan.union[:, None, :].expand(-1, plan.query.shape[1], -1), 2, plan.local)
        assert torch.equal(glob, idx[plan.query])
        assert plan.owner.sum() == nh * nw  # every query reported exactly once


def test_tile_plan_is_a_typed_immutable_record():
    plan = n3.make_tile_plan(20, 23, 15, tile=(6, 7))
    names = [f.name for f in dataclasses.fields(n3.TilePlan)]
    assert names == ['nh', 'nw', 'th', 'tw', 'uh', 'uw', 'sh', 'sw', 'query', 'union', 'local', 'owner', 'slot',
                     'origin']
    assert (plan.nh, plan.nw, plan.th, plan.tw, plan.sh, plan.sw) == (20, 23, 6, 7, 15, 15)
    assert (plan.uh, plan.uw) == (min(6 + 15 - 1, 20), min(7 + 15 - 1, 23))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.th = 3  # plans are cached and shared
    moved = plan.to('cpu')
    assert moved is not plan and all(torch.equal(getattr(moved, n), getattr(plan, n)) for n in names[8:])
    assert n3.make_tile_plan(20, 23, 15, tile=(6, 7)).query is plan.query  # cached


def test_chunk_budget_follows_the_device(monkeypatch):
    """CPU chunks stay at 2^25 elements; CUDA chunks take 1/16 of the free memory, within [2^25, 2^28]."""
    from nl_plugin.ops.n3 import tiled
    assert tiled.chunk_budget(torch.device('cpu')) == 1 << 25
    for free, expected in ((80 * 2**30, 1 << 28), (4 * 2**30, 1 << 26), (2**30, 1 << 25)):
        monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device, free=free: (free, 2 * free))
        tiled.chunk_budget.cache_clear()
        assert tiled.chunk_budget(torch.device('cuda')) == expected
    tiled.chunk_budget.cache_clear()


def test_tiled_search_is_the_same_for_any_chunking(monkeypatch):
    from nl_plugin.ops.n3 import tiled
    vals = torch.randn(2, 19 * 23, 12, dtype=D64)
    plan = n3.make_tile_plan(19, 23, 7, tile=(3, 4))
    whole = n3.tiled_patch_sqdist(vals, plan)
    monkeypatch.setattr(tiled, 'chunk_budget', lambda device: 1)       # one tile a chunk
    assert torch.equal(n3.tiled_patch_sqdist(vals, plan), whole)
