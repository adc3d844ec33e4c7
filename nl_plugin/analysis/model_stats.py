"""Parameters, multiply-adds, depth and receptive field of networks: the NLRN paper's Table 3 by our code.

* parameters: trainable ones, and without BatchNorm (the papers' count: NLRN 330,625 = "330k");
* multiply-adds: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention) / 2, for one
  forward in eval mode, run on the meta device (shapes only) where the network allows it;
* depth: weight layers on the longest input -> output path of the autograd graph (a non-local module
  counts once: its path crosses one of theta / phi / g), so NLRN unrolled over 12 steps is 1 + 3 x 12 + 1;
* receptive field: extent of the input pixels the centre output pixel depends on (non-zero gradient),
  with zero-initialised weights (NLRN's g, the injection adapters) given small random values.
"""
import copy
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nl_plugin.utils import reset_rss_peak, rss_mb

_VIEWS = ('View', 'Reshape', 'Alias', 'T', 'Transpose', 'Permute', 'Expand', 'Squeeze', 'Unsqueeze', 'Clone',
          'ToCopy', 'Select', 'Slice', 'Unsafe', 'Contiguous')


def count_parameters(net):
    """(trainable parameters, trainable parameters outside BatchNorm layers)."""
    total = sum(p.numel() for p in net.parameters() if p.requires_grad)
    bn = sum(p.numel() for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters() if p.requires_grad)
    return total, total - bn


def multiply_adds(net, x):
    """Multiply-adds of ``net(x)`` in eval mode without autograd: on the meta device if possible, else for real."""
    def count(model, inp):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(inp)
        return counter.get_total_flops() // 2
    was = net.training
    net.eval()
    try:
        try:
            return count(copy.deepcopy(net).to('meta'), x.to('meta'))
        except Exception:       # data-dependent code (.item(), sizes from values): run it
            return count(net, x)
    finally:
        net.train(was)


def _is_view(node):
    name = type(node).__name__
    return any(name.startswith(v) for v in _VIEWS)


def _reaches_weight(node, weights, memo):
    """Whether ``node`` is a weight (dim >= 2) leaf or reaches one through view-like nodes only."""
    if node is None:
        return False
    if id(node) in memo:
        return memo[id(node)]
    var = getattr(node, 'variable', None)
    hit = (var is not None and id(var) in weights) or (_is_view(node) and any(
        _reaches_weight(n, weights, memo) for n, _ in node.next_functions))
    memo[id(node)] = hit
    return hit


def graph_depth(net, x):
    """Weight layers on the longest path from ``x`` to the output in the autograd graph of ``net(x)``."""
    weights = {id(p) for p in net.parameters() if p.dim() >= 2}
    x = x.clone().requires_grad_(True)
    was = net.training
    net.eval()
    try:
        with torch.enable_grad():
            out = net(x)
    finally:
        net.train(was)
    leaf_memo, depth = {}, {}
    stack = [(out.grad_fn, False)]
    while stack:          # iterative post-order: graphs of unrolled networks are deep
        node, done = stack.pop()
        if node is None or (id(node) in depth and not done):
            continue
        if getattr(node, 'variable', None) is not None:
            depth[id(node)] = 0 if node.variable is x else None
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in depth)
            continue
        below = [depth[id(c)] for c in children if depth.get(id(c)) is not None]
        if not below:
            depth[id(node)] = None
            continue
        own = 0 if _is_view(node) else int(any(_reaches_weight(c, weights, leaf_memo) for c in children))
        depth[id(node)] = max(below) + own
    return depth.get(id(out.grad_fn)) or 0


def receptive_field(net, x):
    """(rows, cols) of input pixels the centre output pixel of ``net(x)`` depends on (eval mode)."""
    net = copy.deepcopy(net).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():          # zero-initialised paths (g, adapters) would hide the non-local reach
            if p.dim() >= 2 and not p.any():
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    x = x.clone().requires_grad_(True)
    out = net(x)
    cy, cx = out.shape[-2] // 2, out.shape[-1] // 2
    out[..., cy, cx].sum().backward()
    hit = x.grad.abs().sum(tuple(range(x.dim() - 2))) > 0
    rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
    if not len(rows):
        return 0, 0
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@dataclass
class Case:
    """One row of the table: a network (``network_g``-style dict) and its input."""
    label: str
    net_opt: dict
    in_ch: int = 1
    reference: str = ''
    make_input: Optional[Callable] = field(default=None, repr=False)


# The networks of the papers and their variants (the NLRN paper's Table 3 compares parameters and depth).
PAPER_CASES = [
    Case('DnCNN-17', {'type': 'DnCNN', 'depth': 17}, reference='556k; 554k w/o BN (papers)'),
    Case('VDSR-20', {'type': 'VDSR'}, reference='20 layers (VDSR)'),
    Case('NLRN (official, global scope)', {'type': 'NLRN'}, reference='330k w/o BN; 38 = 1 + 3 x 12 + 1'),
    Case('NLRN (window scope, q = 45)', {'type': 'NLRN', 'nl_scope': 'window'}, reference='same weights'),
    Case('N3Net', {'type': 'N3Net'}, reference='705,511 (official)'),
    Case('N3Net light (2 stages)', {'type': 'N3Net', 'num_stages': 2}, reference='427k (paper)'),
    Case('N3Net SR (VDSR stages)', {'type': 'N3Net', 'stage_type': 'vdsr', 'depth': 7}),
    Case('N3Net real noise', {'type': 'N3Net', 'num_feat': 128, 'depth': 9, 'num_inter_ch': 32, 'k': 3,
                              'num_noise_ch': 2}, in_ch=3),
]


def block_cases(names):
    """Default-argument rows for registered blocks without a row of their own: an input of their channels."""
    import inspect

    from basicsr.utils.registry import ARCH_REGISTRY
    cases = []
    for name in names:
        params = inspect.signature(ARCH_REGISTRY.get(name)).parameters
        ch_key = next((k for k in ('num_in_ch', 'num_feat') if k in params), None)
        default = params[ch_key].default if ch_key else inspect.Parameter.empty
        ch = default if isinstance(default, int) else 8
        opt = {'type': name} if isinstance(default, int) or ch_key is None else {'type': name, ch_key: ch}
        if name == 'N3SetBlock':     # items (B, N, C), not an image: 1,000 items (all pairs are searched)
            cases.append(Case(f'{name} (block, 1,000 items)', opt, ch,
                              make_input=lambda h, w, c=ch: torch.rand(1, 1000, c)))
        else:
            cases.append(Case(f'{name} (block)', opt, ch))
    return cases


def option_file_case(path):
    """A row for the ``network_g`` of an option file (the injected hybrids), and one for its base alone."""
    import os

    import yaml
    with open(path) as f:
        net_opt = yaml.safe_load(f)['network_g']
    name = os.path.splitext(os.path.basename(path))[0]
    if net_opt['type'] != 'NonLocalInjection':
        return [Case(name, net_opt, net_opt.get('num_in_ch', 1))]
    net_opt = dict(net_opt, base_pretrained=None)
    base = net_opt['base']
    in_ch = base.get('num_in_ch', 3)
    n = len(net_opt.get('blocks') or [])
    return [Case(f'{base["type"]} (base of {name})', base, in_ch),
            Case(f'{base["type"]} + {n} block{"s" * (n != 1)} ({name})', net_opt, in_ch,
                 reference=', '.join(f"{b['type']} after {b['after']}" for b in net_opt.get('blocks') or []))]


def stats_row(case, size, rf_size=48, depth_size=24):
    """Statistics of one case: MACs at input ``size``, receptive field at ``rf_size``, depth at ``depth_size``."""
    from nl_plugin.analysis.networks import build_network
    torch.manual_seed(0)
    net = build_network(case.net_opt)
    make = case.make_input or (lambda h, w: torch.rand(1, case.in_ch, h, w))
    params, no_bn = count_parameters(net)
    row = {'network': case.label, 'params': params, 'params_no_bn': no_bn, 'reference': case.reference}
    row['gmacs'] = multiply_adds(net, make(*size)) / 1e9
    row['depth'] = graph_depth(net, make(depth_size, depth_size))
    small = make(rf_size, rf_size)
    row['rf'] = receptive_field(net, small) if small.dim() == 4 else None
    row['rf_input'] = rf_size
    return row


def format_table(rows, size):
    """The rows as a fixed-width text table."""
    head = f"{'network':<40}{'params':>12}{'w/o BN':>12}{'depth':>7}{f'GMACs {size[1]}x{size[0]}':>17}" \
           f"{'receptive field':>17}  reference"
    lines = [head, '-' * len(head)]
    for r in rows:
        rf = '-' if r['rf'] is None else f"{r['rf'][0]}x{r['rf'][1]}"
        rf = 'whole input' if r['rf'] is not None and min(r['rf']) >= r['rf_input'] else rf
        lines.append(f"{r['network']:<40}{r['params']:>12,}{r['params_no_bn']:>12,}{r['depth']:>7}{r['gmacs']:>17.2f}"
                     f"{rf:>17}  {r['reference']}")
    return '\n'.join(lines)


#: the folder holding the nl_plugin package (and options/ in a checkout)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: injection option files whose networks the table shows next to their bases
OPTION_FILES = ('options/train_edsr_n3.yml', 'options/train_rrdb_nonlocal.yml')


def all_cases(option_files=OPTION_FILES, root=ROOT):
    """Table rows: paper networks, the hybrids of the injection option files, then every other registered arch."""
    from basicsr.utils.registry import ARCH_REGISTRY
    cases = list(PAPER_CASES)
    for path in option_files:
        cases += option_file_case(os.path.join(root, path))
    covered = {c.net_opt['type'] for c in cases}
    ours = sorted(name for name, obj in ARCH_REGISTRY if getattr(obj, '__module__', '').startswith('nl_plugin.'))
    return cases + block_cases([n for n in ours if n not in covered])


def _run_once(net, x, device):
    """Seconds of one ``net(x)`` without autograd."""
    with torch.no_grad():
        t0 = time.perf_counter()
        net(x)
        if device == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _memory_mb(net, x, device):
    """MB one ``net(x)`` (eval, no autograd) needs above the memory live before it, after a warm-up run."""
    _run_once(net, x, device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2**20
        _run_once(net, x, device)
        return torch.cuda.max_memory_allocated() / 2**20 - start
    if not reset_rss_peak():
        return float('nan')
    start = rss_mb('VmRSS')
    _run_once(net, x, device)
    return rss_mb('VmHWM') - start


def injection_overhead(net_opt, size=(321, 481), device='cpu', repeats=3):
    """Time and memory each inserted block of a ``NonLocalInjection`` network adds to one forward.

    The base alone and the base with each block on its own run on the same random input (eval mode, no
    autograd). Each block's network is timed alternately with the base, ``repeats`` times after a warm-up,
    and the medians are compared, so that a machine whose speed drifts affects both alike. Memory: CUDA peak
    allocation, or on the CPU the peak RSS above the RSS the run starts from.

    Args:
        net_opt (dict): ``network_g`` of type NonLocalInjection (e.g. from an option file).
        size (tuple[int, int]): Input (H, W). Default: 481x321 (BSD68 landscape).
        device (str): 'cpu' or 'cuda'.
        repeats (int): Timed runs per network.

    Returns:
        list[dict]: First the base (``seconds``, ``mb``), then per block ``block``, ``seconds``, ``mb``,
        ``added_seconds`` and ``added_mb`` (the block's network against the base timed next to it).
    """
    from nl_plugin.analysis.networks import build_network
    opt = dict(net_opt, base_pretrained=None)
    blocks = opt.pop('blocks', []) or []
    x = torch.rand(1, opt['base'].get('num_in_ch', 3), *size, generator=torch.Generator().manual_seed(0)).to(device)
    base = build_network(dict(opt, blocks=[])).to(device).eval()
    base_mb = _memory_mb(base, x, device)
    rows, base_times = [{'block': 'base alone', 'mb': base_mb}], []
    for spec in blocks:
        net = build_network(dict(opt, blocks=[spec])).to(device).eval()
        mb = _memory_mb(net, x, device)
        pairs = [(_run_once(base, x, device), _run_once(net, x, device)) for _ in range(repeats)]
        t_base, t_net = (statistics.median(p) for p in zip(*pairs))
        base_times.append(t_base)
        rows.append({'block': f"after {spec['after']}: {spec['type']}", 'seconds': t_net, 'mb': mb,
                     'added_seconds': t_net - t_base, 'added_mb': mb - base_mb})
        del net
    rows[0]['seconds'] = statistics.median(base_times) if base_times else statistics.median(
        _run_once(base, x, device) for _ in range(repeats))
    return rows


def format_overhead(rows, size, device):
    """``injection_overhead``'s rows as a text table."""
    lines = [f'per inserted block at {size[1]}x{size[0]} ({device}, eval, no autograd)',
             f"{'block':<44}{'s':>9}{'MB':>9}{'+s':>9}{'+MB':>9}"]
    for r in rows:
        extra = f"{r['added_seconds']:>9.3f}{r['added_mb']:>9.0f}" if 'added_seconds' in r else ''
        lines.append(f"{r['block']:<44}{r['seconds']:>9.3f}{r['mb']:>9.0f}{extra}")
    return '\n'.join(lines)


__all__ = ['count_parameters', 'multiply_adds', 'graph_depth', 'receptive_field', 'Case', 'PAPER_CASES',
           'block_cases', 'option_file_case', 'stats_row', 'format_table',
           'ROOT', 'OPTION_FILES', 'all_cases', 'injection_overhead', 'format_overhead']
