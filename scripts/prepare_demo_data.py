#!/usr/bin/env python
"""Write the photographs bundled with scikit-image into a small demo data set (nothing is downloaded).

Usage: python scripts/prepare_demo_data.py [--out datasets/demo]

Layout written under --out:
    train/       PNG files (gray or colour as stored), longest side capped at 512 px
    val/         3 PNG files (camera, coins, astronaut), at most 256 x 256 px so CPU validation is quick
    train.lmdb   the same images as BasicSR LMDBs (scripts/create_lmdb.py)
    val.lmdb
Re-running skips everything that already exists. Also importable: ``prepare_demo_data(out)``.
"""
import argparse
import os
import os.path as osp
import shutil
import sys

import cv2
import numpy as np

#: name -> skimage.data loader (all files ship inside the scikit-image wheel)
TRAIN = ('coffee', 'chelsea', 'rocket', 'moon', 'brick', 'grass', 'gravel', 'hubble_deep_field',
         'immunohistochemistry', 'retina', 'motorcycle_left', 'motorcycle_right', 'page', 'text', 'clock')
VAL = ('camera', 'coins', 'astronaut')
TRAIN_MAX_SIDE = 512
VAL_MAX_SIDE = 256


def _load(name):
    import skimage.data as sd
    if name in ('motorcycle_left', 'motorcycle_right'):
        left, right = sd.stereo_motorcycle()[:2]
        img = left if name == 'motorcycle_left' else right
    else:
        img = getattr(sd, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f'skimage.data.{name}: expected an 8-bit image, got {img.dtype}')
    if img.ndim == 3:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2BGR)
    return img


def _fit(img, max_side, square=False):
    """Centre-crop to a square (val) and shrink with area averaging so the longest side is <= max_side."""
    if square:
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top:top + s, left:left + s]
    h, w = img.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return img


def prepare_demo_data(out='datasets/demo', progress=True):
    """Write the demo data set (idempotent). Returns a dict of the four paths (train, val, train_lmdb, val_lmdb)."""
    out = str(out)
    paths = {}
    for split, names, max_side in (('train', TRAIN, TRAIN_MAX_SIDE), ('val', VAL, VAL_MAX_SIDE)):
        folder = osp.join(out, split)
        os.makedirs(folder, exist_ok=True)
        for name in names:
            path = osp.join(folder, f'{name}.png')
            if osp.isfile(path):
                continue
            img = _fit(_load(name), max_side, square=(split == 'val'))
            tmp = osp.join(folder, f'.{name}.tmp.png')
            if not cv2.imwrite(tmp, img):
                raise OSError(f'cannot write {tmp!r}')
            os.replace(tmp, path)
        lmdb_path = osp.join(out, f'{split}.lmdb')
        if not osp.isfile(osp.join(lmdb_path, 'meta_info.txt')):
            if osp.exists(lmdb_path):
                raise FileExistsError(f'{lmdb_path!r} exists but has no meta_info.txt (an interrupted run?); '
                                      'delete it and run again')
            tmp = osp.join(out, f'.{split}.tmp.lmdb')
            if osp.exists(tmp):
                shutil.rmtree(tmp)
            from nl_plugin.data.lmdb_writer import create_lmdb  # imports torch/BasicSR: only when needed
            create_lmdb(folder, tmp, progress=progress)
            os.replace(tmp, lmdb_path)
        paths[split], paths[f'{split}_lmdb'] = folder, lmdb_path
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default='datasets/demo', help='output folder (default datasets/demo)')
    args = ap.parse_args(argv)
    paths = prepare_demo_data(args.out)
    for k, v in paths.items():
        print(f'{k:>10}: {v}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
