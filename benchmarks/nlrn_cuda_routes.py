"""NLRN window scope at 1024x768 on CUDA by each attention route, fp32 and bf16 (gpu_results.txt, run 2).

    python benchmarks/nlrn_cuda_routes.py          (writes $OUT/nlrn_routes.json, else /tmp/nlrn_routes.json)

Routes: 'flex' is the router's CUDA choice (FlexAttention); 'strips' and 'bands' are what the router picks
when FlexAttention does not apply (the CPU's kernels), forced here by replacing ``router._flex_applies``:
the whole image with window logits carried, and rows streamed through all steps. Each route and precision
runs in a fresh process with a time cap: one warm-up (compiles), then the median of 2 runs. The outputs
are compared with the fp32 'strips' output where both finished. EXP_DEVICE=cpu runs it on a 200x100 image.
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = [('strips', 'fp32', 30), ('strips', 'bf16', 30), ('bands', 'fp32', 30), ('bands', 'bf16', 30),
           ('flex', 'fp32', 80)]


def worker(route, prec):
    import torch

    from nl_plugin.archs.nlrn_arch import NLRN
    from nl_plugin.ops.nlrn_attention import router
    if route != 'flex':
        router._flex_applies = lambda device, normalization: False
    torch.manual_seed(0)
    dev = os.environ.get('EXP_DEVICE', 'cuda')
    net = NLRN(nl_scope='window', window_size=45).to(dev).eval()
    net.stream_inference = route == 'bands'
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(1)
    hw = (768, 1024) if dev == 'cuda' else (200, 100)
    x = torch.rand(1, 1, *hw, generator=g).to(dev)
    dt = {'fp32': None, 'bf16': torch.bfloat16}[prec]

    def run():
        if dt is None:
            y = net(x)
        else:
            with torch.autocast(dev, dtype=dt):
                y = net(x)
        if dev == 'cuda':
            torch.cuda.synchronize()
        return y
    def timed():
        t0 = time.perf_counter()
        y = run()
        return y, time.perf_counter() - t0
    y, first = timed()
    if dev == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        y, t = timed()
        times.append(t)
    torch.save(y.float().cpu(), f'/tmp/nlrn_{route}_{prec}.pt')
    print(json.dumps({'route': route, 'prec': prec, 'first_s': first, 'times_s': times,
                      'median_s': statistics.median(times),
                      'peak_gb': torch.cuda.max_memory_allocated() / 2**30 if dev == 'cuda' else None}))


def main():
    from nl_plugin.utils import run_process_group
    rows = []
    for route, prec, cap in CONFIGS:
        try:
            p = run_process_group([sys.executable, __file__, route, prec], timeout=cap, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            row = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else \
                {'route': route, 'prec': prec, 'error': p.stderr.strip().splitlines()[-3:]}
        except subprocess.TimeoutExpired:
            row = {'route': route, 'prec': prec, 'error': f'timeout {cap} s'}
        print(row, flush=True)
        rows.append(row)
    import torch
    ref = '/tmp/nlrn_strips_fp32.pt'
    if os.path.exists(ref):
        r = torch.load(ref)
        for row in rows:
            f = f"/tmp/nlrn_{row['route']}_{row['prec']}.pt"
            if os.path.exists(f):
                row['max_abs_diff_vs_strips_fp32'] = (torch.load(f) - r).abs().max().item()
    out = os.path.join(os.environ.get('OUT', '/tmp'), 'nlrn_routes.json')
    json.dump(rows, open(out, 'w'), indent=1)
    for row in rows:
        print(row)


if __name__ == '__main__':
    worker(*sys.argv[1:3]) if len(sys.argv) > 2 else main()
