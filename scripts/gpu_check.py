#!/usr/bin/env python
"""Everything the GPU path promises, checked in one run on one GPU, with one table at the end.

    python scripts/gpu_check.py [OUT_DIR] [--smoke]

Steps (each one a subprocess; a failed step is reported and the next one still runs):

1. the demo photographs (``scripts/prepare_demo_data.py``) under OUT_DIR;
2. ``scripts/benchmark.py --device cuda`` on the cases that have targets (full size) and their bf16
   twins, with its JSON written to ``OUT_DIR/gpu_results.json`` after every case;
3. the CUDA-marked tests (``pytest -m cuda``, 4 workers where pytest-xdist is installed): every fast path
   against its CPU reference on the GPU;
4. ``basicsr train`` of a reduced window-scope NLRN and of N3Net on the demo photographs, 200 iterations
   each, under ``torchrun --nproc_per_node=1 ... --launcher pytorch`` (NCCL) with ``compile: true``
   (``options/gpu_check_nlrn.yml``, ``options/gpu_check_n3net.yml``);
5. ``basicsr test`` of the trained NLRN (``options/gpu_check_nlrn_test.yml``).

Every step has a time cap and all of them together at most ``BUDGET_S`` (560 s): a step past its
cap is reported as a timeout, a step left without time as skipped. The table gives each step's status,
wall time and peak GPU memory (``nvidia-smi``'s used memory of the device, polled twice a second, so it
includes the CUDA context), then the benchmark figures next to the targets.

``--smoke`` runs the same steps on the CPU, without a time budget: 2 iterations, a batch of 4, no
``compile`` (a cold compile takes minutes on a CPU), and the benchmark's matmul case only. It checks
the script itself on a machine without a GPU.
Everything written goes under OUT_DIR (default ``$OUT``, else ``gpu_check_out``).
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nl_plugin.utils import run_process_group  # noqa: E402

#: benchmark case -> (target seconds, what the target is); from the GPU issue's targets for one H100.
TARGETS = {
    'nlrn_window_1024x768': (0.5, 'NLRN window 1024x768, fp32/TF32'),
    'nlrn_window_1024x768_bf16': (0.25, 'NLRN window 1024x768, bf16'),
    'train_iter_nlrn': (0.060, 'NLRN training iteration, batch 16 of 43x43'),
    'n3net_1024x768': (0.2, 'N3Net 1024x768'),
    'train_iter_n3net': (0.100, 'N3Net training iteration, batch 32 of 80x80'),
}
MEMORY_TARGET_GB = {'nlrn_window_1024x768': 8.0, 'nlrn_window_1024x768_bf16': 8.0}
#: benchmark cases run on the GPU (``--only`` substrings): the ones with targets and the matmul rate
BENCH_CASES = ('matmul', 'nlrn_window_1024x768', 'n3net_1024x768', 'train_iter')
#: seconds: all steps together on the GPU, and each step's cap
BUDGET_S = 560
# Caps from the H200 run (benchmarks/gpu_results.txt): data 15 s, benchmark 189 s, CUDA tests 31-50 s, the
# NLRN training 119 s with its compile.
STEP_CAPS_S = {'prepare demo data': 45, 'benchmark': 200, 'cuda tests': 90, 'train nlrn': 150, 'train n3net': 100,
               'test nlrn': 40}
#: seconds one benchmark case may take (process start, CUDA context, compiles, warm-up, timed runs)
CASE_TIMEOUT_S = 60


class GpuMemoryPoll:
    """Peak used memory of GPU 0 in GB while a step runs, from ``nvidia-smi`` (None without one)."""

    def __init__(self, interval=0.5):
        self.interval, self.peak, self._stop = interval, None, threading.Event()
        self._smi = shutil.which('nvidia-smi')

    def _read(self):
        out = subprocess.run([self._smi, '--query-gpu=memory.used', '--format=csv,noheader,nounits', '-i', '0'],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) / 1024 if out.returncode == 0 else None

    def _loop(self):
        while not self._stop.is_set():
            try:
                used = self._read()
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                used = None
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._smi:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._smi:
            self._thread.join()


def run_step(log_dir, name, cmd, timeout, ok_codes=(0,)):
    """Run one step, its output into ``log_dir/<name>.log``; returns a result row."""
    log = os.path.join(log_dir, name.replace(' ', '_') + '.log')
    if timeout <= 0:
        print(f'SKIPPED {name} (no time left in the {BUDGET_S} s budget)', flush=True)
        return {'step': name, 'ok': False, 'rc': 'skipped', 'seconds': 0.0, 'peak_gpu_gb': None, 'log': None}
    t0 = time.perf_counter()
    with open(log, 'w') as f, GpuMemoryPoll() as mem:
        f.write('$ ' + ' '.join(cmd) + '\n')
        f.flush()
        try:
            rc = run_process_group(cmd, timeout=timeout, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            rc = 'timeout'
    row = {'step': name, 'ok': rc in ok_codes, 'rc': rc, 'seconds': time.perf_counter() - t0, 'peak_gpu_gb': mem.peak,
           'log': log}
    timed_out = ', timeout' if rc == 'timeout' else ''
    print(f"{'ok    ' if row['ok'] else 'FAILED'} {name} ({row['seconds']:.0f} s{timed_out})", flush=True)
    if not row['ok']:
        with open(log) as f:
            print(''.join(f.readlines()[-15:]), flush=True)
    return row


def steps(out, smoke):
    """(name, command, ok return codes) of each step."""
    py = sys.executable
    basicsr = [py, '-m', 'nl_plugin.cli']
    torchrun = [py, '-m', 'torch.distributed.run', '--nproc_per_node=1', '--master_port=29571', '-m',
                'nl_plugin.cli']
    iters = 2 if smoke else 200
    data = os.path.join(out, 'demo_data')
    # Validation and the checkpoint only once, at the end of training (BasicSR does both there anyway).
    force = [f'train:total_iter={iters}', f'val:val_freq={iters + 1}', f'logger:save_checkpoint_freq={iters + 1}',
             f'datasets:train:dataroot_gt={data}/train.lmdb', f'datasets:val:dataroot_gt={data}/val']
    # The smoke run checks the script, not the GPU: no cold compile (minutes on a CPU), small batches.
    smoke_force = ['compile=false', 'datasets:train:batch_size_per_gpu=4', 'datasets:train:num_worker_per_gpu=1']
    yield 'prepare demo data', [py, 'scripts/prepare_demo_data.py', '--out', data], (0,)
    bench = [py, 'scripts/benchmark.py', '--json', os.path.join(out, 'gpu_results.json')]
    bench += ['--device', 'cpu', '--quick', '--repeats', '1', '--only', 'matmul'] if smoke else \
        ['--device', 'cuda', '--repeats', '3', '--budget', '10', '--case_timeout', str(CASE_TIMEOUT_S),
         '--only', *BENCH_CASES]
    yield 'benchmark', bench, (0,)
    workers = ['-n', '4'] if not smoke and importlib.util.find_spec('xdist') else []
    # Without a GPU every cuda-marked test skips; pytest's 5 ('no tests ran') is then the expected answer.
    yield 'cuda tests', [py, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', 'cuda', *workers, 'tests'], \
        (0, 5) if smoke else (0,)
    for arch in ('nlrn', 'n3net'):
        opt = os.path.join('options', f'gpu_check_{arch}.yml')
        yield f'train {arch}', torchrun + ['train', '-opt', opt, '--launcher', 'pytorch', '--root_path', out,
                                           '--force_yml', *force, *(smoke_force if smoke else [])], (0,)
    model = os.path.join(out, 'experiments', 'gpu_check_nlrn', 'models', 'net_g_latest.pth')
    yield 'test nlrn', basicsr + ['test', '-opt', os.path.join('options', 'gpu_check_nlrn_test.yml'),
                                  '--root_path', out, '--force_yml', f'path:pretrain_network_g={model}',
                                  f'datasets:test:dataroot_gt={data}/val',
                                  *(['compile=false'] if smoke else [])], (0,)


def run_steps(out, smoke):
    """Run the steps in order; on the GPU each within its cap and what is left of the budget."""
    rows, start = [], time.perf_counter()
    for name, cmd, ok_codes in steps(out, smoke):
        left = BUDGET_S - (time.perf_counter() - start)
        timeout = 3600 if smoke else min(STEP_CAPS_S[name], left)
        rows.append(run_step(out, name, cmd, timeout, ok_codes))
    return rows


def print_table(rows, bench):
    print('\nGPU check')
    print(f"{'step':<22}{'status':>9}{'time s':>9}{'peak GPU GB':>13}")
    for r in rows:
        mem = f"{r['peak_gpu_gb']:.1f}" if r['peak_gpu_gb'] is not None else '-'
        status = 'ok' if r['ok'] else r['rc'] if r['rc'] in ('timeout', 'skipped') else 'FAILED'
        print(f"{r['step']:<22}{status:>9}{r['seconds']:>9.0f}{mem:>13}")
    if not bench:
        return
    print(f"\n{'benchmark case':<30}{'median s':>10}{'target s':>10}{'GB':>7}{'target GB':>11}  met")
    for r in bench.get('results', []):
        if 'median_s' not in r:
            print(f"{r['case']:<30}{'error':>10}  {r.get('error', '')[:80]}")
            continue
        t, _ = TARGETS.get(r['case'], (None, ''))
        mt = MEMORY_TARGET_GB.get(r['case'])
        met = '' if t is None else ('yes' if r['median_s'] <= t and (mt is None or r['peak_mem_gb'] <= mt) else 'NO')
        print(f"{r['case']:<30}{r['median_s']:>10.4g}{(f'{t:.3f}' if t else ''):>10}{r['peak_mem_gb']:>7.2f}"
              f"{(f'{mt:.0f}' if mt else ''):>11}  {met}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('out', nargs='?', default=os.environ.get('OUT') or 'gpu_check_out')
    ap.add_argument('--smoke', action='store_true', help='CPU, 2 iterations: checks this script without a GPU')
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            sys.exit('gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); '
                     'use --smoke to check the script on a CPU')
    rows = run_steps(out, args.smoke)
    bench_path = os.path.join(out, 'gpu_results.json')
    bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
    print_table(rows, bench)
    with open(os.path.join(out, 'gpu_check.json'), 'w') as f:
        json.dump({'smoke': args.smoke, 'steps': rows, 'targets_s': TARGETS, 'targets_gb': MEMORY_TARGET_GB}, f,
                  indent=1)
    sys.exit(0 if all(r['ok'] for r in rows) else 1)


if __name__ == '__main__':
    main()
