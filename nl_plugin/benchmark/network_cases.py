"""Whole-network benchmark cases: NLRN (window scope and the official tiled protocol), N3Net, training
iterations, and the machine's matmul rate. Every network case also runs under ``torch.autocast`` with bf16
(``<case>_bf16``; the runner prints the fp32 / bf16 time ratios of the same run).

Each case: name -> (description, builder). A builder gets (device, quick) and returns a dict with 'fn' (the
timed callable), optional 'warmup' (run once before timing; default fn), optional 'flops' (per call, for
GFLOP/s), optional 'scale' (the timed part is 1/scale of the case) and optional 'note'.
"""
from .common import image, sync


def under_autocast(build, dtype_name='bf16'):
    """The case ``build`` with its timed and warm-up calls under ``torch.autocast(device, dtype)``."""
    def wrapped(device, quick):
        import torch
        dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype_name]
        spec = build(device, quick)

        def autocast(fn):
            def run():
                with torch.autocast(device, dtype=dtype):
                    return fn()
            return run
        spec = dict(spec, fn=autocast(spec['fn']), note=f"{spec.get('note', '')} {dtype_name} autocast".strip())
        if spec.get('warmup'):
            spec['warmup'] = autocast(spec['warmup'])
        return spec
    return wrapped


def case_injection(blocks):
    """``options/train_edsr_n3.yml``'s network (EDSR x2, 16 blocks of 64 features) on 481x321 with only the
    inserted blocks at ``blocks`` (indices into its list; () = the EDSR base alone), eval, no autograd."""
    def build(device, quick):
        import os

        import torch
        import yaml
        from basicsr.archs import build_network
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, 'options', 'train_edsr_n3.yml')) as f:
            opt = yaml.safe_load(f)['network_g']
        opt = dict(opt, blocks=[opt['blocks'][i] for i in blocks], base_pretrained=None)
        net = build_network(opt).to(device).eval()
        torch.set_grad_enabled(False)
        h, w = (321, 481) if not quick else (80, 120)
        x = image(h, w, device, c=3)
        return {'fn': lambda: (net(x), sync(device)), 'warmup': lambda: net(image(64, 64, device, c=3)),
                'note': ', '.join(f"{b['type']} after {b['after']}" for b in opt['blocks']) or 'base'}
    return build


def case_matmul(device, quick):
    import torch
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return {'fn': lambda: (a @ b, sync(device)), 'flops': 2 * n**3}


def _nlrn(device, **kw):
    import torch

    from nl_plugin.archs.nlrn_arch import NLRN
    net = NLRN(**kw).to(device).eval()
    torch.set_grad_enabled(False)
    return net


def case_nlrn_window(size):
    """NLRN window scope on one image (its bf16 twin: :func:`under_autocast`)."""
    def build(device, quick):
        h, w = (size if not quick else (size[0] // 4, size[1] // 4))
        net = _nlrn(device, nl_scope='window', window_size=45)
        x = image(h, w, device)

        # On CUDA the warm-up is the full image: it compiles the FlexAttention kernels for this size.
        warm = x if device == 'cuda' else image(64, 64, device)
        return {'fn': lambda: (net(x), sync(device)), 'warmup': lambda: (net(warm), sync(device))}
    return build


def case_nlrn_tiled(size):
    def build(device, quick):
        from nl_plugin.ops.tiling import tile_starts, tiled_forward
        h, w = (size if not quick else (size[0] // 4, size[1] // 4))
        net = _nlrn(device, nl_scope='global')
        n_tiles = len(tile_starts(h, 45, 7)) * len(tile_starts(w, 45, 7))
        # The whole tiled pass takes many minutes on a CPU: time a horizontal strip of whole rows of
        # tiles and scale by the tile count (tiles are independent and equally sized).
        rows = h if device == 'cuda' or quick else 45 + 7 * 4   # 5 rows of tiles
        x = image(rows, w, device)
        part = len(tile_starts(rows, 45, 7)) * len(tile_starts(w, 45, 7))
        fn = lambda: (tiled_forward(net, x, 45, stride=7, tile_batch=100), sync(device))  # noqa: E731
        return {'fn': fn, 'warmup': lambda: tiled_forward(net, image(45, 45, device), 45, stride=7),
                'scale': n_tiles / part,
                'note': f'{n_tiles} tiles; timed {part} and scaled' if part < n_tiles else f'{n_tiles} tiles'}
    return build


def case_n3net(size):
    def build(device, quick):
        import torch

        from nl_plugin.archs.n3net_arch import N3Net
        h, w = (size if not quick else (size[0] // 4, size[1] // 4))
        net = N3Net().to(device).eval()
        torch.set_grad_enabled(False)
        x = image(h, w, device)
        return {'fn': lambda: (net(x), sync(device)), 'warmup': lambda: net(image(96, 96, device))}
    return build


def case_train_iter(kind, dtype_name=None):
    """One training iteration: forward and loss under autocast when ``dtype_name`` is set (backward and the
    Adam step outside it, fp32 master weights, as RestorationModel does)."""
    def build(device, quick):
        import torch
        from basicsr.losses import build_loss

        import nl_plugin  # noqa: F401  (compat fixes before BasicSR's subpackages load)
        if kind == 'nlrn':
            from nl_plugin.archs.nlrn_arch import NLRN
            net, shape = NLRN(nl_scope='global'), (16, 1, 43, 43)
        else:
            from nl_plugin.archs.n3net_arch import N3Net
            net, shape = N3Net(), (32, 1, 80, 80)
        if quick:
            shape = (max(shape[0] // 8, 2),) + shape[1:]
        net = net.to(device).train()
        opt = torch.optim.Adam(net.parameters(), 1e-4)
        loss_fn = build_loss({'type': 'SquaredErrorLoss'})
        x = torch.rand(shape, device=device)
        y = x.clone()

        dtype = {None: None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype_name]

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = net(x + 0.1 * torch.randn_like(x))
            loss = loss_fn(out.float(), y)
            loss.backward()
            opt.step()
            sync(device)
        note = f'batch {shape[0]} of {shape[2]}x{shape[3]}' + (f' {dtype_name} autocast' if dtype_name else '')
        return {'fn': step, 'note': note}
    return build


CASES = {
    'matmul_fp32': ('fp32 matmul rate of this machine', case_matmul),
    'nlrn_window_481x321': ('NLRN window scope (q=45, T=12), 481x321', case_nlrn_window((321, 481))),
    'nlrn_window_1024x768': ('NLRN window scope (q=45, T=12), 1024x768', case_nlrn_window((768, 1024))),
    'nlrn_tiled_481x321': ('NLRN official protocol (global scope, 45x45 tiles, stride 7), 481x321',
                           case_nlrn_tiled((321, 481))),
    'n3net_481x321': ('N3Net (official denoiser), 481x321', case_n3net((321, 481))),
    'n3net_1024x768': ('N3Net (official denoiser), 1024x768', case_n3net((768, 1024))),
    'train_iter_nlrn': ('NLRN training iteration (batch 16, 43x43)', case_train_iter('nlrn')),
    'train_iter_n3net': ('N3Net training iteration (batch 32, 80x80)', case_train_iter('n3net')),
    'inject_edsr_base_481x321': ('EDSR x2 (base of train_edsr_n3.yml), 481x321 input', case_injection(())),
    'inject_edsr_n3_481x321': ('EDSR x2 + its inserted N3Block, 481x321 input', case_injection((0, ))),
    'inject_edsr_window_481x321': ('EDSR x2 + its inserted window-scope non-local block, 481x321 input',
                                   case_injection((1, ))),
}


def _with_bf16(cases):
    """Each network case followed by its bf16 autocast twin ``<case>_bf16`` (run next to each other, so that
    the fp32 / bf16 ratio compares runs made under the same machine load)."""
    out = {}
    for name, (desc, build) in cases.items():
        out[name] = (desc, build)
        if name.startswith(('nlrn_window', 'n3net')):
            out[f'{name}_bf16'] = (f'{desc}, bf16 autocast', under_autocast(build))
        elif name.startswith('train_iter_'):
            out[f'{name}_bf16'] = (f'{desc}, bf16 autocast', case_train_iter(name[len('train_iter_'):], 'bf16'))
    return out


CASES = _with_bf16(CASES)


