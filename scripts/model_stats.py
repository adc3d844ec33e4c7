#!/usr/bin/env python
"""Parameters, multiply-adds, depth and receptive field of every architecture of this project, as one table.

    python scripts/model_stats.py                        # the table at 481x321 (the NLRN paper's Table 3 and more)
    python scripts/model_stats.py --size 256 256 --only NLRN N3Net --json stats.json
    python scripts/model_stats.py --overhead options/train_edsr_n3.yml   # time / memory each inserted block adds

Rows: the papers' networks and variants, every registered block with default arguments, and the networks
of the injection option files (``options/train_edsr_n3.yml``, ``options/train_rrdb_nonlocal.yml``) next to
their bases. Multiply-adds are counted at ``--size`` (H W), the receptive field at ``--rf_size`` ("whole input":
it reaches every pixel of that input), the depth on a 24x24 input. See ``nl_plugin.analysis.model_stats``.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OPTION_FILES = ('options/train_edsr_n3.yml', 'options/train_rrdb_nonlocal.yml')


def all_cases():
    """Table rows: paper networks, the hybrids of the injection option files, then every other registered arch."""
    from basicsr.utils.registry import ARCH_REGISTRY

    from nl_plugin.analysis.model_stats import PAPER_CASES, block_cases, option_file_case
    cases = list(PAPER_CASES)
    for path in OPTION_FILES:
        cases += option_file_case(os.path.join(ROOT, path))
    covered = {c.net_opt['type'] for c in cases}
    ours = sorted(name for name, obj in ARCH_REGISTRY if getattr(obj, '__module__', '').startswith('nl_plugin.'))
    return cases + block_cases([n for n in ours if n not in covered])


def _rss_mb(field):
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak():
    """Hand freed heap back and reset the kernel's peak-RSS mark (Linux/glibc); False where impossible."""
    import ctypes
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except (OSError, AttributeError):
        return False


def _run_once(net, x, device):
    """Seconds of one ``net(x)`` without autograd."""
    import torch
    with torch.no_grad():
        t0 = time.perf_counter()
        net(x)
        if device == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _memory_mb(net, x, device):
    """MB one ``net(x)`` (eval, no autograd) needs above the memory live before it, after a warm-up run."""
    import torch
    _run_once(net, x, device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2**20
        _run_once(net, x, device)
        return torch.cuda.max_memory_allocated() / 2**20 - start
    if not _reset_peak():
        return float('nan')
    start = _rss_mb('VmRSS')
    _run_once(net, x, device)
    return _rss_mb('VmHWM') - start


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
    import torch

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


def _print_overhead(rows, size, device):
    print(f'\nper inserted block at {size[1]}x{size[0]} ({device}, eval, no autograd)')
    print(f"{'block':<44}{'s':>9}{'MB':>9}{'+s':>9}{'+MB':>9}")
    for r in rows:
        extra = f"{r['added_seconds']:>9.3f}{r['added_mb']:>9.0f}" if 'added_seconds' in r else ''
        print(f"{r['block']:<44}{r['seconds']:>9.3f}{r['mb']:>9.0f}{extra}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--size', type=int, nargs=2, default=[321, 481], metavar=('H', 'W'), help='input for MACs')
    ap.add_argument('--rf_size', type=int, default=48, help='square input for the receptive field')
    ap.add_argument('--only', nargs='*', default=None, help='rows whose name contains one of these')
    ap.add_argument('--json', default=None, help='also write the rows to this JSON file')
    ap.add_argument('--overhead', default=None, metavar='YML', help='time/memory per inserted block instead')
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='for --overhead')
    ap.add_argument('--repeats', type=int, default=3, help='for --overhead')
    args = ap.parse_args(argv)
    import yaml

    import nl_plugin  # noqa: F401  (registers the architectures)
    from nl_plugin.analysis.model_stats import format_table, stats_row
    size = tuple(args.size)
    if args.overhead:
        with open(args.overhead) as f:
            rows = injection_overhead(yaml.safe_load(f)['network_g'], size, args.device, args.repeats)
        _print_overhead(rows, size, args.device)
    else:
        rows = []
        for case in all_cases():
            if args.only and not any(s in case.label for s in args.only):
                continue
            t0 = time.perf_counter()
            rows.append(stats_row(case, size, args.rf_size))
            print(f'{case.label}: {time.perf_counter() - t0:.1f} s', file=sys.stderr, flush=True)
        print(format_table(rows, size))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'size': size, 'rows': rows}, f, indent=1)
    return rows


if __name__ == '__main__':
    main()
