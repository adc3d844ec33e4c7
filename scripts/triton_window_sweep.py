#!/usr/bin/env python
"""Time NLRN's Triton window step alone over its launch configurations, on one GPU, in one process.

    python scripts/triton_window_sweep.py [--size 768x1024] [--steps 12] [--precision bf16|tf32|fp32]
                                          [--configs 8x16x8 8x8x4 ...] [--quick]

Runs ``steps`` propagated window steps (q = 45, 64-d embeddings, 128-d values, the carried fp32 logits updated in
place) for each configuration (query tile rows x columns x warps) and prints the median time of the whole chain,
the fraction of the memory-traffic floor (the carried logits' (2T - 2) passes over the GPU's bandwidth; see
``nl_plugin.benchmark.triton_cases``), the rate of the useful products and the largest difference from the first
configuration's output (every configuration computes the same function). The default configuration of the kernel
is ``triton_window.TILE_Y x TILE_X`` with ``NUM_WARPS`` warps. ``--quick`` runs a tiny case on the CPU under
Triton's interpreter (it checks this script, not the speed).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIGS = ('8x16x8', '8x16x4', '8x8x4', '16x16x8', '4x32x8', '8x32x8')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--size', default='768x1024', help='H x W')
    ap.add_argument('--steps', type=int, default=12)
    ap.add_argument('--window', type=int, default=45)
    ap.add_argument('--precision', default='bf16', choices=['bf16', 'tf32', 'fp32'])
    ap.add_argument('--configs', nargs='*', default=list(DEFAULT_CONFIGS), help='tile rows x columns x warps')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--quick', action='store_true', help='a tiny case on the CPU under the interpreter')
    args = ap.parse_args()
    if args.quick:
        os.environ['TRITON_INTERPRET'] = '1'
    import torch

    from nl_plugin.benchmark.triton_cases import gpu_bandwidth_gbs, logit_bytes
    from nl_plugin.ops.nlrn_attention import triton_window as tw
    from nl_plugin.ops.nlrn_attention.common import window_geometry
    if args.quick:
        device, (h, w), steps, window, d, c, repeats = torch.device('cpu'), (9, 11), 3, 5, 16, 16, 1
    else:
        if not torch.cuda.is_available():
            sys.exit('triton_window_sweep: no CUDA device is visible; --quick checks the script on the CPU')
        device = torch.device('cuda')
        h, w = (int(n) for n in args.size.lower().split('x'))
        steps, window, d, c, repeats = args.steps, args.window, 64, 128, args.repeats
    torch.backends.cuda.matmul.allow_tf32 = args.precision == 'tf32'
    dtype = torch.bfloat16 if args.precision == 'bf16' else torch.float32
    geo = window_geometry(h, w, window, 'exclude')
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(1, h, w, d, generator=g).mul_(0.1).to(device, dtype) for _ in range(2 * steps)]
    v = torch.randn(1, h, w, c, generator=g).to(device, dtype)

    def chain():
        out, prev = None, None
        with torch.no_grad():
            for t in range(steps):
                last = t == steps - 1
                res = tw.triton_window_attention(qs[2 * t], qs[2 * t + 1], v, geo, 'softmax', prev_logits=prev,
                                                 return_logits=not last)
                out, prev = (res, prev) if last else res      # the carry is one buffer, updated in place
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return out

    bw = gpu_bandwidth_gbs(torch.cuda.get_device_name()) if device.type == 'cuda' else None
    floor_bytes = logit_bytes(1, h, w, steps=steps, window=window)
    flops = 2 * h * w * geo.p * (d + c) * steps
    saved = tw.TILE_Y, tw.TILE_X, tw.NUM_WARPS
    rows, first = [], None
    for cfg in args.configs:
        ty, tx, warps = (int(n) for n in cfg.lower().split('x'))
        tw.TILE_Y, tw.TILE_X, tw.NUM_WARPS = ty, tx, warps
        try:
            out = chain()                                    # compile and warm up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                chain()
                times.append(time.perf_counter() - t0)
        except Exception as err:      # noqa: BLE001  (a configuration the GPU cannot build is reported, not fatal)
            rows.append((cfg, None, f'{type(err).__name__}: {str(err).splitlines()[0][:60] if str(err) else ""}'))
            continue
        finally:
            tw.TILE_Y, tw.TILE_X, tw.NUM_WARPS = saved
        diff = 0.0 if first is None else ((out.float() - first.float()).abs().max() / first.float().abs().max()).item()
        first = out if first is None else first
        rows.append((cfg, statistics.median(times), diff))
    print(f"\nTriton window step x {steps}, {h}x{w}, q={window}, D={d}, C={c}, {args.precision}, {device}"
          f"{f', {bw:.0f} GB/s' if bw else ''}")
    print(f"{'config':<10}{'median s':>10}{'floor':>8}{'TFLOP/s':>9}{'max rel diff':>14}")
    for cfg, med, diff in rows:
        if med is None:
            print(f'{cfg:<10}{"failed":>10}  {diff}')
            continue
        floor = f'{floor_bytes / (med * bw * 1e9):.2f}' if bw else '-'
        print(f'{cfg:<10}{med:>10.4f}{floor:>8}{flops / med / 1e12:>9.1f}{diff:>14.2e}')
    ok = [r for r in rows if r[1] is not None]
    sys.exit(0 if ok and all(r[2] < 5e-2 for r in ok) else 1)


if __name__ == '__main__':
    main()
