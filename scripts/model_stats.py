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


def _measure(net, x, device, repeats):
    """(median seconds, MB above the memory live before) of ``net(x)`` in eval mode without autograd."""
    import torch
    net.eval()
    with torch.no_grad():
        net(x)      # warm-up
        if device == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            start_mb = _rss_mb('VmRSS') if _reset_peak() else None
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            if device == 'cuda':
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2**20 - start_mb
    else:
        peak = (_rss_mb('VmHWM') - start_mb) if start_mb is not None else float('nan')
    return statistics.median(times), peak


def injection_overhead(net_opt, size=(321, 481), device='cpu', repeats=3):
    """Time and memory each inserted block of a ``NonLocalInjection`` network adds to one forward.

    The base alone and the base with each block on its own run on the same random input (eval mode, no
    autograd; median of ``repeats`` runs after a warm-up). Memory: CUDA peak allocation, or on the CPU the
    peak RSS above the RSS the runs start from.

    Args:
        net_opt (dict): ``network_g`` of type NonLocalInjection (e.g. from an option file).
        size (tuple[int, int]): Input (H, W). Default: 481x321 (BSD68 landscape).
        device (str): 'cpu' or 'cuda'.
        repeats (int): Timed runs per network.

    Returns:
        list[dict]: First the base (``seconds``, ``mb``), then per block ``block``, ``seconds``, ``mb``,
        ``added_seconds`` and ``added_mb`` relative to the base.
    """
    import torch

    from nl_plugin.analysis.networks import build_network
    opt = dict(net_opt, base_pretrained=None)
    blocks = opt.pop('blocks', []) or []
    x = torch.rand(1, opt['base'].get('num_in_ch', 3), *size, generator=torch.Generator().manual_seed(0)).to(device)
    base_s, base_mb = _measure(build_network(dict(opt, blocks=[])).to(device), x, device, repeats)
    rows = [{'block': 'base alone', 'seconds': base_s, 'mb': base_mb}]
    for spec in blocks:
        s, mb = _measure(build_network(dict(opt, blocks=[spec])).to(device), x, device, repeats)
        rows.append({'block': f"after {spec['after']}: {spec['type']}", 'seconds': s, 'mb': mb,
                     'added_seconds': s - base_s, 'added_mb': mb - base_mb})
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
