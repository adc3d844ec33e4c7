"""Training as the official code trains: ``RestorationModel`` built from the option files' solver keys
takes the same steps as a plain transcription of the official solver, from the same weights and batch.

NLRN (official TF code, Liu et al.): everything on 0..255, the network's conv_end output is the residual,
target -noise, loss ``tf.losses.mean_squared_error`` (mean over all elements), ``tf.clip_by_norm(g, 2.5)``
on every variable's gradient, ``tf.train.AdamOptimizer(1e-3)`` (beta1 0.9, beta2 0.999, epsilon 1e-8 added
to the raw sqrt(v): "epsilon hat"), BatchNorm on batch statistics (eps 1e-3). Assumed: all trainable
variables are clipped and updated, the default TF Adam hyper-parameters besides lr.

N3Net (official PyTorch code, Ploetz & Roth): loss per image 0.5 * SSE * 1600 / patchsize^2 averaged over
the batch, ``torch.optim.Adam`` with ``weight_decay`` 1e-4 (coupled L2) on every parameter but biases,
lr ``1e-3 * 10^(-3e/50)`` in epoch e.
"""
import copy
import math
import os

import pytest
import torch
import yaml
from basicsr.models import build_model
from torch.nn import functional as F

from conftest import ROOT
from nl_plugin.archs.nlrn_arch import NLRN


def _train_section(name):
    with open(os.path.join(ROOT, 'options', name)) as f:
        return yaml.safe_load(f)['train']


def _model(tmp_path, network, train):
    opt = {'name': 'fidelity', 'model_type': 'RestorationModel', 'is_train': True, 'dist': False, 'num_gpu': 0,
           'rank': 0, 'world_size': 1, 'scale': 1, 'network_g': network,
           'path': {'models': str(tmp_path / 'models'), 'training_states': str(tmp_path / 'states')},
           'train': train}
    model = build_model(opt)
    model.net_g.double()     # same Parameter objects: the optimizer keeps them
    return model


def _smooth_images(gen, n, size):
    """Clean grey images in [0, 1] with some structure (upsampled noise)."""
    low = torch.rand(n, 1, size // 4 + 1, size // 4 + 1, generator=gen, dtype=torch.float64)
    return F.interpolate(low, size=(size, size), mode='bilinear', align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- NLRN
def _official_nlrn_residual(p, x, num_steps, eps=1e-3):
    """The official graph on 0..255 pixels with parameters ``p`` (name -> tensor), BN on batch statistics."""
    def bn(name, t):
        return F.batch_norm(t, None, None, p[f'{name}.weight'], p[f'{name}.bias'], training=True, eps=eps)

    def conv(name, t):
        w = p[f'{name}.weight']
        return F.conv2d(t, w, p[f'{name}.bias'], padding=w.shape[-1] // 2)

    s0 = conv('conv_first', bn('bn_first', x))
    s, logits = s0, None
    for t in range(num_steps):
        z = F.relu(bn(f'bns.{t}.0', s))
        theta, phi, g = (conv(f'nonlocal_blocks.0.{n}', z).flatten(2).transpose(1, 2) for n in ('theta', 'phi', 'g'))
        corr = theta @ phi.transpose(1, 2)                   # no 1/sqrt(d)
        logits = corr if logits is None else logits + corr   # correlation propagation
        z = z + (torch.softmax(logits, -1) @ g).transpose(1, 2).reshape(z.shape)
        h = conv('convs_a.0', bn(f'bns.{t}.1', z))
        s = conv('convs_b.0', F.relu(bn(f'bns.{t}.2', h))) + s0
    return conv('conv_last', F.relu(bn('bn_last', s)))


def _official_nlrn_steps(params, noisy255, noise255, num_steps, iters):
    """Official solver: MSE(residual, -noise), per-variable clip_by_norm 2.5, TF Adam (epsilon hat)."""
    p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    lr, b1, b2, eps_hat, clip = 1e-3, 0.9, 0.999, 1e-8, 2.5
    losses, clipped = [], 0
    for t in range(1, iters + 1):
        loss = torch.mean((_official_nlrn_residual(p, noisy255, num_steps) - (-noise255))**2)
        grads = torch.autograd.grad(loss, list(p.values()))
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        with torch.no_grad():
            for (k, w), g in zip(p.items(), grads):
                norm = g.norm()
                clipped += int(norm > clip)
                g = g * clip / torch.clamp(norm, min=clip)
                m[k] = b1 * m[k] + (1 - b1) * g
                v2[k] = b2 * v2[k] + (1 - b2) * g * g
                w -= lr_t * m[k] / (v2[k].sqrt() + eps_hat)
        losses.append(loss.item())
    return losses, p, clipped


@pytest.mark.parametrize('option_file',
                         ['train_nlrn_denoise.yml', 'train_nlrn_denoise_bsd300.yml', 'train_nlrn_sr.yml'])
def test_nlrn_steps_match_official_solver(tmp_path, option_file, one_thread):
    torch.manual_seed(0)
    steps, iters = 3, 3
    network = {'type': 'NLRN', 'num_feat': 16, 'num_embed': 8, 'num_steps': steps}
    model = _model(tmp_path, network, copy.deepcopy(_train_section(option_file)))
    init = {k: v.detach().clone() for k, v in model.net_g.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    clean = _smooth_images(gen, 4, 12)
    noise = torch.randn(clean.shape, generator=gen, dtype=torch.float64) * 25 / 255
    ours = []
    for it in range(1, iters + 1):
        model.update_learning_rate(it)
        model.feed_data({'lq': clean + noise, 'gt': clean})
        model.optimize_parameters(it)
        ours.append(model.log_dict['l_pix'])
    official, ref, clipped = _official_nlrn_steps(init, (clean + noise) * 255, noise * 255, steps, iters)
    assert clipped > 0                       # the per-variable clipping is exercised
    assert 0.5 * 625 < official[0] < 2 * 625
    assert ours == pytest.approx(official, rel=1e-9)
    for k, w in model.net_g.named_parameters():
        torch.testing.assert_close(w.detach(), ref[k].detach(), rtol=1e-7, atol=1e-9, msg=k)


def test_first_loss_of_default_nlrn_is_near_noise_variance(one_thread):
    """``NLRN()`` from its own initialisation predicts a residual of about a grey level: the first loss
    (0..255 units) is close to sigma^2, as the official network's."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    clean = _smooth_images(gen, 3, 43).float()
    noisy = clean + torch.randn(clean.shape, generator=gen) * 25 / 255
    with torch.no_grad():
        out = NLRN().train()(noisy)
    loss = torch.mean((out - clean)**2).item() * 255**2
    assert 625 / 2 < loss < 625 * 2, loss
    assert ((out - noisy) * 255).abs().mean().item() < 10


@pytest.mark.parametrize('kw, size', [({}, (9, 11)),     # default scope: global attention
                                      ({'nl_scope': 'window', 'window_size': 5}, (9, 11)),
                                      ({'nl_scope': 'window', 'window_size': 5}, (30, 9))])   # streamed bands
def test_img_range_scales_every_path(kw, size):
    """img_range 255 and 1 with rescaled weights give the same function in every forward path."""
    net255 = NLRN(num_feat=8, num_embed=4, num_steps=3, **kw).double()
    for m in net255.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    net255.bn_first.running_mean.fill_(110.0)       # statistics of 0..255 pixels
    net255.bn_first.running_var.fill_(3000.0)
    torch.nn.init.normal_(net255.nonlocal_blocks[0].g.weight, std=0.1)
    torch.nn.init.normal_(net255.conv_last.weight, std=3.0)     # residuals of tens of grey levels
    net255.eval()
    net1 = NLRN(num_feat=8, num_embed=4, num_steps=3, img_range=1.0, **kw).double().eval()
    net1.load_state_dict(net255.state_dict())
    x = torch.rand(2, 1, *size, dtype=torch.float64)
    with torch.no_grad():
        a, b = net255(x), net1(x)
    assert ((a - x) * 255).abs().mean() > 5
    torch.testing.assert_close(a, b)
    xg = x.clone().requires_grad_()             # autograd: the whole-image path
    torch.testing.assert_close(net255(xg).detach(), a)


# ----------------------------------------------------------------------------------------------- N3Net
def _official_n3net_steps(net, noisy, clean, iters, iters_per_epoch):
    """Official solver: torch Adam, weight decay 1e-4 except biases, per-epoch lr, 800 x MSE-type loss."""
    net = copy.deepcopy(net)
    decay = [p for n, p in net.named_parameters() if not n.endswith('bias')]
    plain = [p for n, p in net.named_parameters() if n.endswith('bias')]
    opt = torch.optim.Adam([{'params': decay, 'weight_decay': 1e-4}, {'params': plain, 'weight_decay': 0.0}],
                           lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    patch = clean.shape[-1]
    losses = []
    for it in range(iters):
        for group in opt.param_groups:
            group['lr'] = 1e-3 * 10**(-3 * (it // iters_per_epoch) / 50)
        opt.zero_grad()
        sse = ((net(noisy) - clean)**2).flatten(1).sum(1)
        loss = (0.5 * sse * 1600 / patch**2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, net


@pytest.mark.parametrize('option_file, network', [
    ('train_n3net_denoise.yml', {'type': 'N3Net', 'num_feat': 8, 'depth': 3, 'num_inter_ch': 2, 'num_stages': 2,
                                 'k': 2, 'embed_feat': 8}),
    ('train_dncnn_denoise.yml', {'type': 'DnCNN', 'num_feat': 8, 'depth': 4}),
    ('train_n3net_realnoise.yml', {'type': 'N3Net', 'num_feat': 8, 'depth': 3, 'num_inter_ch': 2, 'num_stages': 2,
                                   'k': 2, 'embed_feat': 8})])
def test_n3net_protocol_steps_match_official_solver(tmp_path, option_file, network, one_thread):
    torch.manual_seed(0)
    train = copy.deepcopy(_train_section(option_file))
    # 50 "epochs" of 2 iterations (the files: 50 of 1600); 5 steps cross two epoch boundaries.
    every = 2
    assert train['scheduler']['decay_every'] * 50 == train['total_iter']
    train['scheduler']['decay_every'], train['total_iter'] = every, 50 * every
    model = _model(tmp_path, network, train)
    net0 = copy.deepcopy(model.net_g)
    gen = torch.Generator().manual_seed(3)
    clean = _smooth_images(gen, 2, 20)
    noisy = clean + torch.randn(clean.shape, generator=gen, dtype=torch.float64) * 25 / 255
    ours = []
    for it in range(1, 6):
        model.update_learning_rate(it)
        model.feed_data({'lq': noisy, 'gt': clean})
        model.optimize_parameters(it)
        ours.append(model.log_dict['l_pix'])
    official, ref = _official_n3net_steps(net0, noisy, clean, 5, every)
    assert ours == pytest.approx(official, rel=1e-9)
    ref_params = dict(ref.named_parameters())
    for k, w in model.net_g.named_parameters():
        # atol: parameters with mathematically zero gradients (shift-invariant biases) move by
        # rounding noise through Adam; a 0.1% error of the loss scale gives differences of ~1e-7.
        torch.testing.assert_close(w.detach(), ref_params[k].detach(), rtol=1e-7, atol=1e-8, msg=k)


# ----------------------------------------------------------------------------------------------- VDSR solver
def test_n3net_sr_steps_match_vdsr_solver(tmp_path, one_thread):
    """VDSR's solver (N3Net SR): SGD momentum 0.9, weight decay 1e-4, every gradient element clipped to
    [-theta/lr, theta/lr], loss 1/2 SSE of a 41x41 patch averaged over the batch (per-pixel equivalent)."""
    torch.manual_seed(0)
    network = {'type': 'VDSR', 'num_feat': 8, 'depth': 4}
    model = _model(tmp_path, network, copy.deepcopy(_train_section('train_n3net_sr.yml')))
    net = copy.deepcopy(model.net_g)
    gen = torch.Generator().manual_seed(4)
    hr = _smooth_images(gen, 2, 16)
    lr_img = F.avg_pool2d(hr, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    ours = []
    for it in range(1, 4):
        model.update_learning_rate(it)
        model.feed_data({'lq': lr_img, 'gt': hr})
        model.optimize_parameters(it)
        ours.append(model.log_dict['l_pix'])
    decay = [p for n, p in net.named_parameters() if not n.endswith('bias')]
    plain = [p for n, p in net.named_parameters() if n.endswith('bias')]
    opt = torch.optim.SGD([{'params': decay, 'weight_decay': 1e-4}, {'params': plain, 'weight_decay': 0.0}],
                          lr=0.1, momentum=0.9)
    official, clipped = [], 0
    for _ in range(3):
        opt.zero_grad()
        loss = (0.5 * ((net(lr_img) - hr)**2).flatten(1).sum(1) * 41**2 / hr.shape[-1]**2).mean()
        loss.backward()
        for p in net.parameters():
            clipped += int((p.grad.abs() > 0.01 / 0.1).any())
            p.grad.clamp_(-0.01 / 0.1, 0.01 / 0.1)
        opt.step()
        official.append(loss.item())
    assert clipped > 0
    assert ours == pytest.approx(official, rel=1e-9)
    ref = dict(net.named_parameters())
    for k, w in model.net_g.named_parameters():
        torch.testing.assert_close(w.detach(), ref[k].detach(), rtol=1e-7, atol=1e-9, msg=k)
