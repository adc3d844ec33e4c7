#!/usr/bin/env python
"""Pack an image folder into a BasicSR LMDB (see :mod:`nl_plugin.data.lmdb_writer`).

Usage: python scripts/create_lmdb.py INPUT_FOLDER OUTPUT.lmdb [--compress-level N] [--gray]
"""
import argparse
import os.path as osp
import sys

from nl_plugin.data.lmdb_writer import __doc__ as _LIB_DOC
from nl_plugin.data.lmdb_writer import create_lmdb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__ + '\n' + _LIB_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('input_folder')
    ap.add_argument('output', help='output LMDB folder, ending in .lmdb; must not exist')
    ap.add_argument('--compress-level', type=int, default=1, help='PNG compression level 0-9 (default 1)')
    ap.add_argument('--gray', action='store_true', help='store colour images as gray (cv2 BGR2GRAY)')
    args = ap.parse_args(argv)
    try:
        keys = create_lmdb(args.input_folder, args.output, args.compress_level, args.gray)
    except (OSError, ValueError) as e:  # FileExistsError is an OSError
        print(f'create_lmdb: error: {e}', file=sys.stderr)
        return 2
    print(f'Wrote {len(keys)} images to {args.output} (keys listed in {osp.join(args.output, "meta_info.txt")})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
