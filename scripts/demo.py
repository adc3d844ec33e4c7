#!/usr/bin/env python
"""The demo behind ``make demo``: non-local denoising networks against a plain CNN and classical non-local means.

On the photographs bundled with scikit-image (gray, Gaussian noise sigma 25) it
  1. writes the data set (scripts/prepare_demo_data.py; nothing is downloaded),
  2. trains reduced DnCNN, N3Net and NLRN (window scope) of about 80k parameters each with
     ``basicsr train -opt options/demo_train_<net>.yml`` (same data, batch, crops, iterations and loss),
  3. tests each with ``basicsr test -opt options/demo_test_<net>.yml``, which writes per-image CSVs,
  4. runs scikit-image's non-local means on the same noisy images, with the true sigma,
  5. prints one PSNR/SSIM table (BasicSR's calculate_psnr / calculate_ssim on 8-bit images, as in the
     CSVs) and writes <out>/side_by_side.png: clean | noisy | NL-means | DnCNN | N3Net | NLRN.

Usage: python scripts/demo.py [--iters N] [--out demo_out] [--root DIR] [--report-only]
"""
import argparse
import csv
import os
import resource
import subprocess
import sys
import time

import cv2
import numpy as np
import yaml

import nl_plugin  # noqa: F401  (BasicSR compatibility fixes and registration, before BasicSR is imported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

#: (column label, option-file stem): options/demo_train_<stem>.yml and options/demo_test_<stem>.yml
NETWORKS = (('DnCNN', 'dncnn'), ('N3Net', 'n3net'), ('NLRN', 'nlrn'))
#: scikit-image's non-local means, given the true noise sigma. h = 0.8 sigma and 5x5 patches searched
#: over 13x13 (patch_distance 6) are scikit-image's own example settings; on these photographs they are
#: within 0.1 dB of the best of h in {0.6, 0.8, 1.0} sigma, patch_size {5, 7}, patch_distance {6, 11}.
NLM = {'h_over_sigma': 0.8, 'patch_size': 5, 'patch_distance': 6, 'fast_mode': True}


def option_path(kind, stem):
    return os.path.join(REPO, 'options', f'demo_{kind}_{stem}.yml')


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd, cwd):
    """Run a command (its output goes to this terminal); returns its wall time in seconds."""
    print('\n$ ' + ' '.join(os.path.relpath(c, cwd) if os.path.isabs(c) else c for c in cmd), flush=True)
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, check=True, cwd=cwd)
    wall = time.perf_counter() - start
    print(f'[{wall:.0f} s, CPU time {_children_cpu() - cpu:.0f} s]', flush=True)
    return wall


def scaled_iters(total_iters, iters):
    """``--iters N``: the longest training gets N iterations, the others keep their ratio to it (>= 1)."""
    if not iters:
        return dict(total_iters)
    longest = max(total_iters.values())
    return {k: max(1, round(v * iters / longest)) for k, v in total_iters.items()}


def count_parameters(net_opt):
    from nl_plugin.weights import build_network
    net = build_network(net_opt)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def degraded_images(test_opt, root):
    """The exact (noisy float, noisy uint8, clean uint8) images ``basicsr test`` saw, by image name.

    Validation noise is seeded by the image name, so building the dataset again gives the same noise.
    """
    from basicsr.data import build_dataset
    from basicsr.utils import tensor2img
    (ds_opt, ) = test_opt['datasets'].values()
    ds_opt = dict(ds_opt, phase='test', dataroot_gt=os.path.join(root, ds_opt['dataroot_gt']))
    dataset = build_dataset(ds_opt)
    images = {}
    for i in range(len(dataset)):
        item = dataset[i]
        name = os.path.splitext(os.path.basename(item['lq_path']))[0]
        images[name] = (item['lq'][0].double().numpy(), tensor2img([item['lq']]), tensor2img([item['gt']]))
    return ds_opt['name'], images


def nl_means(noisy, sigma):
    """scikit-image's non-local means on the float noisy image (the networks' input) -> uint8 image."""
    from skimage.restoration import denoise_nl_means
    out = denoise_nl_means(noisy, h=NLM['h_over_sigma'] * sigma, sigma=sigma, patch_size=NLM['patch_size'],
                           patch_distance=NLM['patch_distance'], fast_mode=NLM['fast_mode'])
    return (np.clip(out, 0, 1) * 255.0).round().astype(np.uint8)  # = basicsr.utils.tensor2img


def image_metrics(img, gt, metrics_opt):
    """PSNR and SSIM of two uint8 images with the test options' metrics (as ``basicsr test`` computes them)."""
    from basicsr.metrics import calculate_metric
    return tuple(float(calculate_metric({'img': img, 'img2': gt}, metrics_opt[m])) for m in ('psnr', 'ssim'))


def read_metrics_csv(path):
    """``{image: (psnr, ssim, psnr_input, ssim_input)}`` of a ``basicsr test`` CSV (the MEAN row included)."""
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f'{path}: no rows')
    return {r['image']: tuple(float(r[k]) for k in ('psnr', 'ssim', 'psnr_input', 'ssim_input')) for r in rows}


def build_table(names, columns):
    """Lines of the PSNR/SSIM table.

    Args:
        names (list[str]): Image names, in row order.
        columns (dict[str, dict[str, tuple[float, float]]]): column label -> image name -> (PSNR, SSIM).

    Returns:
        list[str]: A header, one line per image and a 'mean' line (mean of the per-image values).
    """
    def cells(values):
        return ''.join(f'{p:>7.2f} / {s:.4f}' for p, s in values)

    lines = [f"{'image':<12}" + ''.join(f'{label:>16}' for label in columns)]
    lines += [f'{name:<12}' + cells(c[name] for c in columns.values()) for name in names]
    means = [(np.mean([c[n][0] for n in names]), np.mean([c[n][1] for n in names])) for c in columns.values()]
    lines.append(f"{'mean':<12}" + cells(means))
    return lines


CAPTION = 24  # px of the caption strip above every panel of the picture


def label(img, text):
    """The image as BGR under a black strip with ``text`` in white (the image itself is not drawn over)."""
    img = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    img = np.pad(img, ((CAPTION, 0), (0, 0), (0, 0)))
    cv2.putText(img, text, (4, CAPTION - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def side_by_side(rows, gap=4):
    """One sheet from rows of labelled panels: ``rows`` is a list of lists of (text, uint8 image)."""
    strips = []
    for row in rows:
        panels = [label(img, text) for text, img in row]
        h = max(p.shape[0] for p in panels)
        strips.append(np.concatenate([np.pad(p, ((0, h - p.shape[0]), (0, gap), (0, 0))) for p in panels], 1))
    w = max(s.shape[1] for s in strips)
    return np.concatenate([np.pad(s, ((0, gap), (0, w - s.shape[1]), (0, 0))) for s in strips], 0)


def train_and_test(root, iters):
    """Data, the three trainings and tests through the ``basicsr`` command; returns train seconds per label."""
    run([sys.executable, os.path.join(REPO, 'scripts', 'prepare_demo_data.py'), '--out', 'datasets/demo'], root)
    basicsr = os.path.join(BIN, 'basicsr')
    seconds = {}
    for label_, stem in NETWORKS:
        seconds[label_] = run([basicsr, 'train', '-opt', option_path('train', stem),
                               '--force_yml', f'train:total_iter={iters[label_]}'], root)
        run([basicsr, 'test', '-opt', option_path('test', stem)], root)
    return seconds


def report(root, out_dir, iters, seconds):
    """Print the table from the CSVs and the non-local means run, and write the side-by-side PNG."""
    test_opts = {lab: load_yaml(option_path('test', stem)) for lab, stem in NETWORKS}
    first = next(iter(test_opts.values()))
    dataset_name, images = degraded_images(first, root)
    sigma = float(first['datasets']['test_1']['sigma']) / 255.0
    metrics_opt = first['val']['metrics']
    names = list(images)
    columns = {'noisy': {}, 'NL-means': {}}
    restored = {'NL-means': {}}
    for name, (noisy_f, noisy, clean) in images.items():
        columns['noisy'][name] = image_metrics(noisy, clean, metrics_opt)
        restored['NL-means'][name] = nl_means(noisy_f, sigma)
        columns['NL-means'][name] = image_metrics(restored['NL-means'][name], clean, metrics_opt)
    for lab, opt in test_opts.items():
        results = os.path.join(root, 'results', opt['name'])
        rows = read_metrics_csv(os.path.join(results, f'{dataset_name}_metrics.csv'))
        for name in names:
            if abs(rows[name][2] - columns['noisy'][name][0]) > 1e-3:
                raise RuntimeError(f'{opt["name"]}: noisy {name} has PSNR {rows[name][2]} in the CSV but '
                                   f'{columns["noisy"][name][0]:.4f} here: not the same noisy image')
        columns[lab] = {name: rows[name][:2] for name in names}
        suffix = opt['val'].get('suffix') or opt['name']
        restored[lab] = {name: cv2.imread(os.path.join(results, 'visualization', dataset_name,
                                                       f'{name}_{suffix}.png'), cv2.IMREAD_UNCHANGED)
                         for name in names}

    print(f'\n{dataset_name}, gray, sigma {sigma * 255:g}: PSNR (dB) / SSIM of 8-bit images '
          '(BasicSR calculate_psnr / calculate_ssim, as in results/demo_*_test/*_metrics.csv)')
    print('\n'.join(build_table(names, columns)))
    print(f"\nNL-means: skimage.restoration.denoise_nl_means(sigma={sigma * 255:g}/255, h={NLM['h_over_sigma']}*sigma, "
          f"patch_size={NLM['patch_size']}, patch_distance={NLM['patch_distance']}, fast_mode={NLM['fast_mode']})")
    for lab, stem in NETWORKS:
        opt = load_yaml(option_path('train', stem))
        train = opt['datasets']['train']
        how = f", {iters[lab]} iterations of {train['batch_size_per_gpu']} crops {train['gt_size']}^2" if iters else ''
        took = f', trained in {seconds[lab]:.0f} s' if lab in seconds else ''
        print(f'{lab:<6} {count_parameters(opt["network_g"]):>7,} parameters{how}{took}')

    rows = []
    for name, (_, noisy, clean) in images.items():
        row = [(f'{name}: clean', clean), (f"noisy {columns['noisy'][name][0]:.2f} dB", noisy)]
        row += [(f'{lab} {columns[lab][name][0]:.2f} dB', restored[lab][name]) for lab in restored]
        rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'side_by_side.png')
    if not cv2.imwrite(path, side_by_side(rows)):
        raise OSError(f'cannot write {path!r}')
    print(f'\nSide by side (clean | noisy | NL-means | DnCNN | N3Net | NLRN): {path}')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--iters', type=int, default=None,
                    help='shorter run: the longest training gets N iterations, the others in proportion')
    ap.add_argument('--out', default='demo_out', help='folder of side_by_side.png (relative to --root)')
    ap.add_argument('--root', default=REPO,
                    help='working folder of datasets/, experiments/ and results/ (default: the repository)')
    ap.add_argument('--report-only', action='store_true',
                    help='only print the table and write the picture from the results of an earlier run')
    args = ap.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        ap.error(f'--iters must be >= 1, got {args.iters}')
    # OpenMP threads that wait passively: with the default busy-waiting, a machine with other work (or
    # this run's own data-loader process) stalls torch's threads; measured on 2 busy cores, an N3Net training
    # iteration took 5.4 s busy-waiting against 0.30 s waiting passively, and 0.28 s on one thread.
    os.environ.setdefault('OMP_WAIT_POLICY', 'passive')
    start = time.perf_counter()
    root = os.path.abspath(args.root)
    totals = {lab: load_yaml(option_path('train', stem))['train']['total_iter'] for lab, stem in NETWORKS}
    iters = scaled_iters(totals, args.iters)
    seconds = {} if args.report_only else train_and_test(root, iters)
    # After --report-only the iterations of the earlier run are not known.
    report(root, os.path.join(root, args.out), None if args.report_only else iters, seconds)
    print(f'Demo wall time: {time.perf_counter() - start:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
