"""Speed and memory of the non-local operations and the full networks, measured in one run.

    python scripts/benchmark.py [--quick] [--device cpu|cuda] [--json PATH] [--only SUBSTR ...]

Every case runs in a fresh process (so peak RSS is that case's own), warms up once, then repeats
until ``--repeats`` runs or ``--budget`` seconds are used (at least one run); the table shows the
median and the number of runs. CPU memory is the process's peak RSS (``ru_maxrss``, which includes
about 0.75 GB of Python, torch, BasicSR and nl_plugin imports); '+GB' is what the timed runs
themselves need: after the warm-up, freed heap memory is handed back (``malloc_trim``) and the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), so it is the peak RSS of the runs
minus the RSS they started from (model and inputs included there, one-time library set-up not).
GPU memory is ``torch.cuda.max_memory_allocated`` over the timed runs. The fp32 matmul rate of the
machine is measured in the same run, so GFLOP/s figures can be read against it. Cases that state the bytes
they must move (the ``gpu_`` cases of :mod:`nl_plugin.benchmark.triton_cases`, run only with ``--device cuda``)
also give the fraction of the memory-traffic floor they reach: bytes / (time x bandwidth), the bandwidth from
a table by GPU name or ``--bandwidth_gbs``.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from ..fileio import atomic_write
from ..utils import cpuinfo_field, reset_rss_peak, rss_mb, run_process_group
from .network_cases import CASES as NETWORK_CASES
from .op_cases import OP_CASES
from .triton_cases import BANDWIDTH_ENV, GPU_ONLY, gpu_bandwidth_gbs
from .triton_cases import CASES as TRITON_CASES

CASES = {**NETWORK_CASES, **OP_CASES, **TRITON_CASES}
#: the folder holding the nl_plugin package, put on the workers' PYTHONPATH so they time this tree
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status_gb(field):
    """VmRSS / VmHWM of this process in GB (Linux), or None."""
    mb = rss_mb(field)
    return None if mb is None else mb / 1024


def worker(name, device, quick, repeats, budget):
    import torch
    torch.manual_seed(0)
    build = CASES[name][1]
    spec = build(device, quick)
    # Fallback base: interpreter, torch, nl_plugin/BasicSR imports, the model and the inputs.
    base_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    (spec.get('warmup') or spec['fn'])()
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    elif reset_rss_peak() and _status_gb('VmRSS') is not None:
        base_gb = _status_gb('VmRSS')
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        spec['fn']()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    scale = spec.get('scale', 1.0)
    med = statistics.median(times) * scale
    out = {'case': name, 'description': CASES[name][0], 'median_s': med, 'runs': len(times),
           'times_s': [t * scale for t in times], 'note': spec.get('note', '')}
    if spec.get('flops'):
        out['gflops'] = spec['flops'] / statistics.median(times) / 1e9
    if device == 'cuda':
        out['peak_mem_gb'] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out['peak_mem_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        out['extra_mem_gb'] = (_status_gb('VmHWM') or out['peak_mem_gb']) - base_gb
    if spec.get('bytes'):
        out['bytes_moved'] = spec['bytes']
        bw = gpu_bandwidth_gbs(torch.cuda.get_device_name()) if device == 'cuda' else None
        if bw:
            out['bandwidth_gbs'] = bw
            out['floor_fraction'] = spec['bytes'] / (med * bw * 1e9)
    for k, v in spec.get('extra', {}).items():
        out[k] = v
    return out


def run_case(name, args):
    cmd = [sys.executable, '-m', 'nl_plugin.benchmark', '--_worker', name, '--device', args.device,
           '--repeats', str(args.repeats), '--budget', str(args.budget)] + (['--quick'] if args.quick else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
    try:
        proc = run_process_group(cmd, timeout=args.case_timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
    except subprocess.TimeoutExpired:
        return {'case': name, 'description': CASES[name][0], 'error': f'timeout after {args.case_timeout:.0f} s'}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {'case': name, 'description': CASES[name][0], 'error': ' | '.join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(results):
    by = {r['case']: r for r in results if 'median_s' in r}
    out = []

    def add(label, a, b, key='median_s'):
        if a in by and b in by and by[b].get(key):
            out.append((label, by[a][key] / by[b][key]))
    add('NLRN tiled protocol / window scope, time (481x321)', 'nlrn_tiled_481x321', 'nlrn_window_481x321')
    add('window attention op: widely spread / narrow logits, time', 'op_window_fwd_spread_481x321',
        'op_window_fwd_481x321')
    add('NLRN window 1024x768 / 481x321, time (pixels x5.07)', 'nlrn_window_1024x768', 'nlrn_window_481x321')
    add('N3Net 1024x768 / 481x321, time (pixels x5.07)', 'n3net_1024x768', 'n3net_481x321')
    add('N3Net 1024x768 / 481x321, peak memory', 'n3net_1024x768', 'n3net_481x321', 'peak_mem_gb')
    add('N3Net 1024x768 / 481x321, memory added by the run', 'n3net_1024x768', 'n3net_481x321', 'extra_mem_gb')
    add('training-size attention: dense reference / fast, time', 'op_train_dense_fwdbwd', 'op_train_fast_fwdbwd')
    add('training-size attention: dense reference / fast, memory added by the run',
        'op_train_dense_fwdbwd', 'op_train_fast_fwdbwd', 'extra_mem_gb')
    add('NLRN training-size attention, 12 propagated steps: dense reference / routed, time',
        'op_train_nlrn_dense_fwdbwd', 'op_train_nlrn_fwdbwd')
    add('NLRN training-size attention, 12 propagated steps: dense reference / routed, memory added by the run',
        'op_train_nlrn_dense_fwdbwd', 'op_train_nlrn_fwdbwd', 'extra_mem_gb')
    add('training-size window attention (q=45): dense / fast, time', 'op_train_win_dense_fwdbwd',
        'op_train_win_fast_fwdbwd')
    add('training-size window attention (q=45): dense / fast, memory added by the run',
        'op_train_win_dense_fwdbwd', 'op_train_win_fast_fwdbwd', 'extra_mem_gb')
    add('NLRN window 1024x768 / 481x321, peak memory', 'nlrn_window_1024x768', 'nlrn_window_481x321', 'peak_mem_gb')
    for block in ('n3', 'window'):
        add(f'EDSR + inserted {block} block / EDSR, time (481x321)', f'inject_edsr_{block}_481x321',
            'inject_edsr_base_481x321')
        add(f'EDSR + inserted {block} block / EDSR, memory added by the run', f'inject_edsr_{block}_481x321',
            'inject_edsr_base_481x321', 'extra_mem_gb')
    add('RRDBNet + 2 window blocks / RRDBNet, training iteration time', 'gpu_train_iter_rrdb_window',
        'gpu_train_iter_rrdb_base')
    add('N3 block: reference / fast, time (481x321)', 'op_n3block_ref_481x321', 'op_n3block_fast_481x321')
    add('N3 block: reference / fast, memory added by the run', 'op_n3block_ref_481x321',
        'op_n3block_fast_481x321', 'extra_mem_gb')
    for r in results:       # fp32 / bf16 autocast of the same case, same run
        if r['case'].endswith('_bf16'):
            add(f"{r['case'][:-5]}: fp32 / bf16 time", r['case'][:-5], r['case'])
    for r in results:
        for k, v in r.items():
            if k.startswith('ratio_'):
                out.append((f"{r['case']}: {k[6:].replace('_', ' ')}", v))
    if 'matmul_fp32' in by:
        rate = by['matmul_fp32']['gflops']
        for r in results:
            if r.get('gflops') and r['case'] != 'matmul_fp32':
                out.append((f"{r['case']}: achieved / matmul GFLOP/s", r['gflops'] / rate))
    return out


def _cpu_name():
    name = cpuinfo_field('model name')
    return f'{name} ({os.cpu_count()} cores)' if name else platform.processor() or 'cpu'


def print_table(results, meta):
    print(f"\nnl_plugin benchmark — {meta['device_name']}, torch {meta['torch']}, {meta['threads']} threads"
          f"{', quick' if meta['quick'] else ''}")
    head = f"{'case':<26}{'median s':>10}{'runs':>6}{'peak GB':>9}{'+GB':>7}{'GFLOP/s':>9}  note"
    print(head)
    print('-' * len(head))
    for r in results:
        if 'error' in r:
            print(f"{r['case']:<26}{'error':>10}  {r['error'][:100]}")
            continue
        gf = f"{r['gflops']:.1f}" if r.get('gflops') else ''
        extra = f"{r['extra_mem_gb']:.2f}" if 'extra_mem_gb' in r else ''
        floor = f", {r['floor_fraction']:.2f} of the memory-traffic floor" if 'floor_fraction' in r else ''
        print(f"{r['case']:<26}{r['median_s']:>10.3f}{r['runs']:>6}{r['peak_mem_gb']:>9.2f}{extra:>7}{gf:>9}"
              f"  {r['note']}{floor}")
    rs = ratios(results)
    if rs:
        print('\nratios (same run)')
        for label, v in rs:
            print(f'  {label:<70}{v:8.2f}')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='quarter-size images, smaller batches')
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--json', default=None, help='also write the figures to this JSON file')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--budget', type=float, default=120.0, help='seconds of timed runs per case (>= 1 run)')
    ap.add_argument('--case_timeout', type=float, default=None,
                    help='seconds a case may take, start and warm-up included (default: no limit)')
    ap.add_argument('--only', nargs='*', default=None, help='run the cases whose name contains one of these')
    ap.add_argument('--bandwidth_gbs', type=float, default=None,
                    help='GPU memory bandwidth in GB/s for the memory-traffic floor (default: by GPU name)')
    ap.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(worker(args._worker, args.device, args.quick, args.repeats, args.budget)))
        return
    import torch
    if args.bandwidth_gbs:
        os.environ[BANDWIDTH_ENV] = str(args.bandwidth_gbs)     # read by the workers
    names = [n for n in CASES if (not args.only or any(s in n for s in args.only))
             and (args.device == 'cuda' or n not in GPU_ONLY)]
    if 'matmul_fp32' not in names:
        names.insert(0, 'matmul_fp32')
    meta = {'device': args.device, 'quick': args.quick, 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(), 'platform': platform.platform(),
            'device_name': torch.cuda.get_device_name() if args.device == 'cuda' else _cpu_name(),
            'date': time.strftime('%Y-%m-%d')}
    results = []
    for name in names:
        print(f'running {name} ...', file=sys.stderr, flush=True)
        results.append(run_case(name, args))
        if args.json:       # after every case, so a run stopped from outside keeps what it measured
            write_json(args.json, meta, results)
    print_table(results, meta)
    if args.json:
        print(f'\nwrote {args.json}')


def write_json(path, meta, results):
    doc = {'meta': meta, 'results': results, 'ratios': dict(ratios(results))}
    atomic_write(path, lambda f: json.dump(doc, f, indent=1), mode='w')

