#!/usr/bin/env python
"""PSNR cost of bf16 autocast on trained networks: bf16 vs fp32 inference, and bf16 vs fp32 training.

    python scripts/prepare_demo_data.py --out /tmp/bf16data
    python scripts/precision_report.py --data /tmp/bf16data --work /tmp/bf16report --arch nlrn n3net --seeds 0 1

For every architecture (a small NLRN in the window scope, a small N3Net) the script

1. trains it through the ``basicsr train`` command on the demo data (sigma 25) with ``train:precision: fp32``
   and with ``train:precision: bf16``, once per seed of ``--seeds``: same data and iteration count
   (``--iters``); runs that already have their final weights are not repeated;
2. evaluates the trained networks on the validation photographs (camera, coins, astronaut) at their full
   size from scikit-image (not the 256 px versions that training validates on), gray, with noise of sigma
   25 fixed by the image name: each fp32-trained network once in fp32 and once under
   ``torch.autocast(dtype=torch.bfloat16)``, each bf16-trained one in fp32;
3. prints one table per architecture: per-image PSNR (dB, float output clipped to [0, 1], no rounding, so
   that differences far below one grey level show) of the noisy input, of the fp32-trained networks in
   fp32 and in bf16 and their difference, and of the bf16-trained networks and their difference from the
   fp32-trained ones (each averaged over the seeds); then the worst per-image bf16 inference change, the
   mean training difference, and the spread of fp32 training over the seeds (the yardstick for the
   training difference: short trainings differ by a few tenths of a dB from seed to seed). ``--json``
   writes the figures.

With ``--weights`` it evaluates given trained weights instead of training (e.g. the released N3Net):

    python scripts/precision_report.py --work /tmp/bf16report --weights 051_ckpt.t7 --images datasets/BSD68 \
        --time-images astronaut test001 --time-repeats 5

per-image PSNR (float output, unclipped) of fp32 and bf16 inference on the full-size photographs and on every
image of ``--images`` folders (noise of ``--sigma`` seeded by the image name), the worst and the mean change,
and the time of fp32 and bf16 inference on ``--time-images``: fp32 and bf16 runs interleaved (so that a load
from other processes hits both alike), medians and their ratio.

Training uses the given number of threads (``OMP_NUM_THREADS``, default 2); expect a few minutes per run.
"""
import argparse
import json
import math
import os
import os.path as osp
import subprocess
import sys

import yaml

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: small networks of each paper's family (window-scope NLRN with the paper's q = 45; one N3 block)
ARCHS = {
    'nlrn': {'network_g': {'type': 'NLRN', 'num_feat': 32, 'num_embed': 16, 'num_steps': 4, 'nl_scope': 'window',
                           'window_size': 45},
             'gt_size': 43, 'batch': 8, 'lr': 1e-3},
    # BN momentum 0.1: the official 0.001 leaves the running statistics (eval mode) unconverged after a short run
    'n3net': {'network_g': {'type': 'N3Net', 'num_feat': 32, 'depth': 5, 'num_stages': 2, 'k': 4, 'embed_feat': 16,
                            'bn_momentum': 0.1},
              'gt_size': 48, 'batch': 8, 'lr': 1e-3},
}


def train_options(arch, precision, data, iters, seed=0):
    spec = ARCHS[arch]
    return {
        'name': f'precision_{arch}_{precision}' + (f'_seed{seed}' if seed else ''), 'model_type': 'RestorationModel',
        'num_gpu': 0, 'manual_seed': seed,
        'datasets': {
            'train': {'name': 'demo_train', 'type': 'SyntheticNoiseDataset',
                      'dataroot_gt': osp.join(data, 'train.lmdb'), 'io_backend': {'type': 'lmdb'}, 'color': 'gray',
                      'sigma': 25, 'gt_size': spec['gt_size'], 'use_hflip': True, 'use_rot': True,
                      'num_worker_per_gpu': 0, 'batch_size_per_gpu': spec['batch'], 'dataset_enlarge_ratio': 100},
            'val': {'name': 'demo_val', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': osp.join(data, 'val'),
                    'io_backend': {'type': 'disk'}, 'color': 'gray', 'sigma': 25}},
        'network_g': dict(spec['network_g']),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'total_iter': iters, 'warmup_iter': -1, 'precision': precision,
                  'optim_g': {'type': 'Adam', 'lr': spec['lr'], 'betas': [0.9, 0.999]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [int(iters * 0.7)], 'gamma': 0.5},
                  'pixel_opt': {'type': 'SquaredErrorLoss', 'normalization': 'pixel'}},
        'val': {'val_freq': iters, 'save_img': False, 'precision': 'fp32',
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
        'logger': {'print_freq': 50, 'save_checkpoint_freq': iters, 'use_tb_logger': False},
    }


def train(arch, precision, args, seed):
    opt = train_options(arch, precision, osp.abspath(args.data), args.iters, seed)
    weights = osp.join(args.work, 'experiments', opt['name'], 'models', 'net_g_latest.pth')
    if osp.exists(weights):
        return weights
    os.makedirs(args.work, exist_ok=True)
    path = osp.join(args.work, f"{opt['name']}.yml")
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    basicsr = osp.join(osp.dirname(sys.executable), 'basicsr')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
    print(f'training {opt["name"]} ({args.iters} iterations) ...', file=sys.stderr, flush=True)
    subprocess.run([basicsr, 'train', '-opt', path, '--root_path', args.work], check=True, env=env)
    return weights


def load(arch, weights):
    from nl_plugin.analysis.networks import build_network, load_checkpoint
    return load_checkpoint(build_network(ARCHS[arch]['network_g']), weights).eval()


def full_size_val(work):
    """The validation photographs at their full size from scikit-image, as PNG files in ``work/val_full``."""
    import cv2
    from prepare_demo_data import VAL, _load
    folder = osp.join(work, 'val_full')
    os.makedirs(folder, exist_ok=True)
    for name in VAL:
        path = osp.join(folder, f'{name}.png')
        if not osp.exists(path):
            cv2.imwrite(path, _load(name))
    return folder


def val_pairs(folder):
    from basicsr.data import build_dataset
    ds = build_dataset({'name': 'val_full', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': folder,
                        'io_backend': {'type': 'disk'}, 'color': 'gray', 'sigma': 25, 'phase': 'val'})
    return [(osp.splitext(osp.basename(ds[i]['gt_path']))[0], ds[i]['lq'][None], ds[i]['gt'][None])
            for i in range(len(ds))]


def psnr(out, gt):
    mse = float(((out.clamp(0, 1) - gt)**2).mean())
    return 10 * math.log10(1.0 / mse)


def restore(net, lq, dtype):
    import torch
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
        return net(lq).float()


def evaluate(arch, runs, pairs):
    """Per-image PSNR of each seed's trained pair ``runs = [(fp32 weights, bf16 weights), ...]``, averaged over
    the seeds, plus each seed's fp32-trained PSNR (for the spread over seeds)."""
    import torch
    nets = [(load(arch, w32), load(arch, w16)) for w32, w16 in runs]
    rows = []
    for name, lq, gt in pairs:
        per_seed = []
        for net32, net16 in nets:
            p32 = psnr(restore(net32, lq, None), gt)
            per_seed.append({'fp32': p32, 'bf16': psnr(restore(net32, lq, torch.bfloat16), gt),
                             'bf16_trained': psnr(restore(net16, lq, None), gt)})
        row = {'image': name, 'size': f'{gt.shape[3]}x{gt.shape[2]}', 'noisy': psnr(lq, gt)}
        for key in ('fp32', 'bf16', 'bf16_trained'):
            row[key] = sum(r[key] for r in per_seed) / len(per_seed)
        row['bf16_minus_fp32'] = min(r['bf16'] - r['fp32'] for r in per_seed)      # the worst seed
        row['bf16_trained_minus_fp32_trained'] = row['bf16_trained'] - row['fp32']
        row['fp32_by_seed'] = [r['fp32'] for r in per_seed]
        rows.append(row)
    return rows


def print_table(arch, rows, iters, seeds):
    print(f'\n{arch}: {ARCHS[arch]["network_g"]}, {iters} iterations, seeds {seeds}, sigma 25, PSNR dB '
          '(float output; the mean over the seeds, bf16-fp32 the worst seed)')
    print(f"{'image':<12}{'size':>9}{'noisy':>8}{'fp32':>9}{'bf16':>9}{'bf16-fp32':>11}"
          f"{'bf16-trained':>14}{'trained diff':>14}")
    keys = ('noisy', 'fp32', 'bf16', 'bf16_minus_fp32', 'bf16_trained', 'bf16_trained_minus_fp32_trained')
    for r in rows:
        print(f"{r['image']:<12}{r['size']:>9}{r['noisy']:8.2f}{r['fp32']:9.3f}{r['bf16']:9.3f}"
              f"{r['bf16_minus_fp32']:11.4f}{r['bf16_trained']:14.3f}{r['bf16_trained_minus_fp32_trained']:14.3f}")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    print(f"{'mean':<12}{'':>9}{mean['noisy']:8.2f}{mean['fp32']:9.3f}{mean['bf16']:9.3f}"
          f"{mean['bf16_minus_fp32']:11.4f}{mean['bf16_trained']:14.3f}{mean['bf16_trained_minus_fp32_trained']:14.3f}")
    worst = min(r['bf16_minus_fp32'] for r in rows)
    seed_means = [sum(r['fp32_by_seed'][i] for r in rows) / len(rows) for i in range(len(seeds))]
    spread = max(seed_means) - min(seed_means)
    print(f'worst per-image change from bf16 inference: {worst:+.4f} dB; bf16 training vs fp32 training, mean '
          f"PSNR: {mean['bf16_trained_minus_fp32_trained']:+.3f} dB; fp32 training over the seeds: mean PSNR "
          f"{', '.join(f'{m:.3f}' for m in seed_means)} (spread {spread:.3f} dB)")
    return {'rows': rows, 'mean': mean, 'worst_bf16_minus_fp32': worst, 'fp32_mean_by_seed': seed_means,
            'fp32_seed_spread': spread}


def weights_report(args):
    """``--weights``: bf16 vs fp32 inference of given weights, PSNR per image and interleaved timing."""
    import statistics
    import time

    import torch

    from nl_plugin.analysis.reproduce import load_model, noisy_pairs
    torch.set_flush_denormal(True)  # as the N3Net inference does by itself
    folders = [full_size_val(args.work)] + list(args.images or [])
    pairs = [(osp.basename(f), n, lq, gt) for f in folders for n, lq, gt in noisy_pairs(f, args.sigma)]
    report = {}
    for path in args.weights:
        net, arch = load_model(path)
        rows = []
        for folder, name, lq, gt in pairs:
            p32 = psnr_float(restore(net, lq, None), gt)
            p16 = psnr_float(restore(net, lq, torch.bfloat16), gt)
            rows.append({'folder': folder, 'image': name, 'size': f'{gt.shape[3]}x{gt.shape[2]}', 'fp32': p32,
                         'bf16': p16, 'bf16_minus_fp32': p16 - p32})
            print(f"{folder:<10}{name:<12}{rows[-1]['size']:>9}{p32:9.3f}{p16:9.3f}{p16 - p32:+9.4f}", flush=True)
        by_folder = {}
        for r in rows:
            by_folder.setdefault(r['folder'], []).append(r['bf16_minus_fp32'])
        summary = {f: {'images': len(v), 'worst': min(v), 'mean': sum(v) / len(v)} for f, v in by_folder.items()}
        for f, v in summary.items():
            print(f"{path} {f}: {v['images']} images, bf16 - fp32 worst {v['worst']:+.4f} dB, mean {v['mean']:+.4f} dB")
        timing = {}
        for folder, name, lq, _ in pairs:
            if name not in (args.time_images or []):
                continue
            t = {'fp32': [], 'bf16': []}
            restore(net, lq, torch.bfloat16)  # warm-up of both paths
            restore(net, lq, None)
            for _ in range(args.time_repeats):
                for key, dtype in (('fp32', None), ('bf16', torch.bfloat16)):
                    t0 = time.perf_counter()
                    restore(net, lq, dtype)
                    t[key].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in t.items()}
            timing[name] = {'fp32_s': med['fp32'], 'bf16_s': med['bf16'], 'ratio': med['fp32'] / med['bf16'],
                            'runs': t, 'load_avg_1min': os.getloadavg()[0]}
            print(f"time {name} ({lq.shape[3]}x{lq.shape[2]}): fp32 {med['fp32']:.2f} s, bf16 {med['bf16']:.2f} s "
                  f"(medians of {args.time_repeats}, interleaved), fp32/bf16 {med['fp32'] / med['bf16']:.2f}x; "
                  f'load {os.getloadavg()[0]:.1f}', flush=True)
        report[path] = {'arch': arch, 'rows': rows, 'summary': summary, 'timing': timing}
    return report


def psnr_float(out, gt):
    """PSNR of the float output, neither clipped nor rounded (the papers' metric)."""
    mse = float(((out.double() - gt.double())**2).mean())
    return 10 * math.log10(1.0 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', help='folder written by scripts/prepare_demo_data.py (for the trainings)')
    ap.add_argument('--weights', nargs='+', help='evaluate these trained weights (.pth, official N3Net .t7) '
                    'instead of training')
    ap.add_argument('--images', nargs='+', help='--weights: also these image folders (e.g. datasets/BSD68)')
    ap.add_argument('--sigma', type=float, default=25, help='--weights: noise sigma (default 25)')
    ap.add_argument('--time-images', nargs='+', help='--weights: time fp32 and bf16 on these images (names)')
    ap.add_argument('--time-repeats', type=int, default=5, help='--weights: interleaved repeats (default 5)')
    ap.add_argument('--work', required=True, help='folder for option files, experiments and results')
    ap.add_argument('--arch', nargs='+', default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument('--iters', type=int, default=600, help='training iterations of every run')
    ap.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS', 2)))
    ap.add_argument('--json', default=None, help='also write the figures to this JSON file')
    ap.add_argument('--train_only', default=None, choices=['fp32', 'bf16'], help='only run this training and stop')
    ap.add_argument('--seeds', type=int, nargs='+', default=[0], help='manual_seed of each training pair (the '
                    'spread of short runs over seeds is the yardstick for the bf16-vs-fp32 training difference)')
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    if args.weights:
        import torch

        import nl_plugin  # noqa: F401
        torch.set_num_threads(args.threads)
        report = weights_report(args)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(report, f, indent=1)
        return
    if not args.data:
        ap.error('--data is required to train (or give --weights)')
    if args.train_only:
        for arch, seed in ((a, sd) for a in args.arch for sd in args.seeds):
            train(arch, args.train_only, args, seed)
        return
    import torch

    import nl_plugin  # noqa: F401  (registers the architectures, applies the BasicSR fixes)
    torch.set_num_threads(args.threads)
    pairs = val_pairs(full_size_val(args.work))
    report = {}
    for arch in args.arch:
        runs = [(train(arch, 'fp32', args, seed), train(arch, 'bf16', args, seed)) for seed in args.seeds]
        report[arch] = print_table(arch, evaluate(arch, runs, pairs), args.iters, args.seeds)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)


if __name__ == '__main__':
    main()
