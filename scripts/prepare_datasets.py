#!/usr/bin/env python
"""Put the papers' data sets where the option files look for them (see :mod:`nl_plugin.data.prepare`).

    python scripts/prepare_datasets.py                       # download (public archive), write datasets/
    python scripts/prepare_datasets.py --source ~/DnCNN      # use a local copy, in any layout
    python scripts/prepare_datasets.py --sets BSD68 Set12 --out /data/datasets

Every file is checked against the SHA-256 manifest kept in the package; running it again checks what is
there and writes only what is missing.
"""
import argparse
import sys

from nl_plugin.data.prepare import LMDB_SETS, MANIFEST, SOURCES, PrepareError, prepare, read_manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--source', help='folder holding the files in any layout (searched recursively, files '
                                     'recognised by SHA-256); without it the files are downloaded')
    ap.add_argument('--out', default='datasets', help='output folder (default: datasets)')
    ap.add_argument('--sets', nargs='+', help='sets to prepare (default: all of the manifest)')
    ap.add_argument('--manifest', default=MANIFEST, help='SHA-256 manifest (default: the package\'s)')
    ap.add_argument('--url', action='append', dest='urls',
                    help='zip archive to download instead of the built-in ones (repeatable; a mirror). Built-in: '
                         + ', '.join(s['url'] for s in SOURCES.values()))
    ap.add_argument('--no-lmdb', action='store_true', help='write the folders only, no LMDB')
    ap.add_argument('--list', action='store_true', help='list the sets of the manifest and exit')
    args = ap.parse_args(argv)
    try:
        if args.list:
            for name, files in read_manifest(args.manifest).items():
                print(f'{name}: {len(files)} files')
            return 0
        done = prepare(args.out, args.sets, args.source, args.manifest, args.urls,
                       lmdb_sets=() if args.no_lmdb else LMDB_SETS)
    except (PrepareError, OSError) as e:
        print(f'prepare_datasets: error: {e}', file=sys.stderr)
        return 2
    print(f'ready in {args.out}: {", ".join(done)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
