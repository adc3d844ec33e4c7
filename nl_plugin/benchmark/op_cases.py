"""Per-op benchmark cases: the fast ops against their readable references (same builder protocol as
:mod:`nl_plugin.benchmark.network_cases`)."""
import torch

from .common import sync


def _qkv(b, h, w, d, c, device, grad=False):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(b, h, w, d, generator=g).mul_(0.1).to(device) for _ in range(2))
    v = torch.randn(b, h, w, c, generator=g).to(device)
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v


def window_fwd(impl, spread=False):
    """Windowed attention (q = 45, 64-d embeddings, 128-d values), one step, no grad, 481x321; with
    ``spread`` the logits have a standard deviation of about 32 (peaked attention, as trained)
    instead of 0.08."""
    def build(device, quick):
        from nl_plugin.ops import nlrn_attention as wa
        h, w = (321, 481) if not quick else (80, 120)
        q, k, v = _qkv(1, h, w, 64, 128, device)
        if spread:
            q, k = q * 20, k * 20
        torch.set_grad_enabled(False)
        fn = (lambda: wa.window_attention(q, k, v, 45)) if impl == 'fast' else \
            (lambda: wa.dense_attention_reference(q, k, v, 45)[0])
        p = 45 * 45
        return {'fn': lambda: (fn(), sync(device)), 'flops': 2 * h * w * p * (64 + 128),
                'note': 'flops counted for q x q keys per pixel'}
    return build


def train_size(impl, window_size=None):
    """Attention at NLRN's training size (batch 16, 43x43, 64/128 ch), forward + backward: global scope
    (window_size None: the whole patch) or the q x q window scope."""
    def build(device, quick):
        from nl_plugin.ops import nlrn_attention as wa
        b = 16 if not quick else 4
        q, k, v = _qkv(b, 43, 43, 64, 128, device, grad=True)
        if impl == 'dense':
            def op(q, k, v):
                return wa.dense_attention_reference(q, k, v, window_size)[0]
        elif window_size:
            def op(q, k, v):
                return wa.window_attention(q, k, v, window_size)
        else:
            op = wa.global_attention

        def step():
            out = op(q, k, v)
            out.sum().backward()
            sync(device)
        n = 43 * 43
        return {'fn': step, 'flops': 3 * 2 * b * n * n * (64 + 128),
                'note': f'batch {b}, fwd+bwd, dense-equivalent flops'}
    return build


def train_propagated(impl, window_size=None, steps=12):
    """What NLRN runs at its training size: ``steps`` non-local steps with correlation propagation
    (batch 16 of 43x43, 64/128 ch), forward + backward through all of them; 'fast' is the routed
    ``propagated_attention`` (the kernel NLRN's forward uses), 'dense' the reference carrying dense logits."""
    def build(device, quick):
        from nl_plugin.ops import nlrn_attention as wa
        b, t = (16, steps) if not quick else (4, 3)
        qkv = [_qkv(b, 43, 43, 64, 128, device, grad=True) for _ in range(t)]

        def run():
            out, state, logits = 0, None, None
            for q, k, v in qkv:
                if impl == 'dense':
                    o, logits = wa.dense_attention_reference(q, k, v, window_size, prev_logits=logits)
                else:
                    o, state = wa.propagated_attention(q, k, v, state, window_size=window_size)
                out = out + o.sum()
            out.backward()
            sync(device)
        n = 43 * 43
        return {'fn': run, 'flops': t * 3 * 2 * b * n * n * (64 + 128),
                'note': f'batch {b}, {t} steps, fwd+bwd, dense-equivalent flops'}
    return build


def n3block(impl):
    """One N3 block (8 ch, k = 7, 10x10 patches, stride 5, 80x80 search) on 481x321, no grad."""
    def build(device, quick):
        from nl_plugin.archs.n3block_arch import N3Block
        h, w = (321, 481) if not quick else (100, 140)
        block = N3Block(num_in_ch=8, impl='auto' if impl == 'fast' else 'reference').to(device).eval()
        x = torch.randn(1, 8, h, w, generator=torch.Generator().manual_seed(0)).to(device)
        torch.set_grad_enabled(False)
        return {'fn': lambda: (block(x), sync(device))}
    return build


OP_CASES = {
    'op_window_fwd_481x321': ('windowed attention op (fast), one step, 481x321', window_fwd('fast')),
    'op_window_fwd_spread_481x321': ('windowed attention op (fast), one step, 481x321, widely spread logits',
                                     window_fwd('fast', spread=True)),
    'op_train_fast_fwdbwd': ('global-scope attention (fast: SDPA), batch 16 of 43x43, fwd+bwd', train_size('fast')),
    'op_train_dense_fwdbwd': ('global-scope attention, dense reference, batch 16 of 43x43, fwd+bwd',
                              train_size('dense')),
    'op_train_win_fast_fwdbwd': ('window attention q=45 (fast: masked SDPA), batch 16 of 43x43, fwd+bwd',
                                 train_size('fast', 45)),
    'op_train_win_dense_fwdbwd': ('window attention q=45, dense masked reference, batch 16 of 43x43, fwd+bwd',
                                  train_size('dense', 45)),
    'op_train_nlrn_fwdbwd': ('NLRN training-size attention as NLRN runs it: 12 propagated steps (routed), '
                             'global scope, batch 16 of 43x43, fwd+bwd', train_propagated('fast')),
    'op_train_nlrn_dense_fwdbwd': ('the same 12 propagated steps, dense reference, fwd+bwd',
                                   train_propagated('dense')),
    'op_n3block_fast_481x321': ('N3 block (tiled, linear in area), 481x321', n3block('fast')),
    'op_n3block_ref_481x321': ('N3 block, gather-all-candidates reference, 481x321', n3block('reference')),
}
