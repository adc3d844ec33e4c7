#!/usr/bin/env python
"""The demo behind ``make demo``: prepare the embedded photographs, train a small network on the CPU,
test it, print a noisy-vs-restored table and write a side-by-side PNG.

Usage: python scripts/demo.py [--train-opt options/demo_train.yml] [--test-opt options/demo_test.yml]
                              [--iters N] [--out demo_out]
"""
import argparse
import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def run(cmd):
    print('\n$ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def load_yaml(path):
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


def noisy_images(test_opt):
    """The exact degraded inputs the test saw (validation noise is seeded by the image name)."""
    import nl_plugin  # noqa: F401
    from basicsr.data import build_dataset
    from basicsr.utils import tensor2img
    for key, ds_opt in test_opt['datasets'].items():
        ds_opt = dict(ds_opt, phase='test')
        dataset = build_dataset(ds_opt)
        for i in range(len(dataset)):
            item = dataset[i]
            name = os.path.splitext(os.path.basename(item['lq_path']))[0]
            yield ds_opt['name'], name, tensor2img([item['lq']]), tensor2img([item['gt']])


def label(img, text):
    img = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    img = img.copy()
    cv2.putText(img, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--train-opt', default='options/demo_train.yml')
    ap.add_argument('--test-opt', default='options/demo_test.yml')
    ap.add_argument('--iters', type=int, default=None, help='override train:total_iter')
    ap.add_argument('--out', default='demo_out')
    args = ap.parse_args()

    run([sys.executable, 'scripts/prepare_demo_data.py', '--out', 'datasets/demo'])
    train_cmd = [os.path.join(BIN, 'basicsr'), 'train', '-opt', args.train_opt]
    if args.iters:
        train_cmd += ['--force_yml', f'train:total_iter={args.iters}']
    run(train_cmd)
    run([os.path.join(BIN, 'basicsr'), 'test', '-opt', args.test_opt])

    test_opt = load_yaml(args.test_opt)
    results = os.path.join(ROOT, 'results', test_opt['name'])
    out_dir = os.path.join(ROOT, args.out)
    os.makedirs(out_dir, exist_ok=True)
    panels = []
    for dataset_name, name, noisy, clean in noisy_images(test_opt):
        suffix = test_opt['val'].get('suffix') or test_opt['name']
        restored = cv2.imread(os.path.join(results, 'visualization', dataset_name, f'{name}_{suffix}.png'),
                              cv2.IMREAD_UNCHANGED)
        if restored is None:
            continue
        row = [label(clean, f'{name}: clean'), label(noisy, 'noisy'), label(restored, 'restored')]
        h = max(p.shape[0] for p in row)
        panels.append(np.concatenate([np.pad(p, ((0, h - p.shape[0]), (0, 4), (0, 0))) for p in row], 1))
    if panels:
        w = max(p.shape[1] for p in panels)
        sheet = np.concatenate([np.pad(p, ((0, 4), (0, w - p.shape[1]), (0, 0))) for p in panels], 0)
        cv2.imwrite(os.path.join(out_dir, 'side_by_side.png'), sheet)

    for dataset_name in test_opt['datasets'].values():
        csv_path = os.path.join(results, f"{dataset_name['name']}_metrics.csv")
        with open(csv_path) as f:
            rows = list(csv.DictReader(f))
        print(f"\n{dataset_name['name']}: noisy vs restored (from {os.path.relpath(csv_path, ROOT)})")
        print(f"{'image':<24}{'noisy PSNR':>12}{'PSNR':>10}{'noisy SSIM':>12}{'SSIM':>10}")
        for r in rows:
            print(f"{r['image']:<24}{r.get('psnr_input', ''):>12}{r.get('psnr', ''):>10}"
                  f"{r.get('ssim_input', ''):>12}{r.get('ssim', ''):>10}")
    print(f'\nSide-by-side images: {os.path.join(args.out, "side_by_side.png")}')


if __name__ == '__main__':
    main()
