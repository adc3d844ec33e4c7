#!/usr/bin/env python
"""The papers' gray denoising tables through this project (see :mod:`nl_plugin.analysis.reproduce`).

    python scripts/prepare_datasets.py
    python scripts/reproduce_tables.py --n3net 25=pretrained_sigma25/checkpoint/051_ckpt.t7 \\
        --n3net 50=pretrained_sigma50/checkpoint/051_ckpt.t7 --n3net 70=pretrained_sigma70/checkpoint/051_ckpt.t7 \\
        --nlrn 25=experiments/NLRN_denoise_sigma25/models/net_g_latest.pth --json table.json

Each network runs on Set12, BSD68 and Urban100 (those present under --data) with the seeded noise of its
sigma; the table gives each mean PSNR, on the float output (the papers' metric) and on 8-bit images
(BasicSR's), next to the paper's figure. Official N3Net checkpoints (.t7) are converted in memory.
"""
import argparse
import sys

from nl_plugin.analysis.reproduce import DEFAULT_SETS, format_table, load_model, reproduce, write_json


def _spec(text):
    sigma, sep, path = text.partition('=')
    try:
        if not sep or not path:
            raise ValueError
        return float(sigma) if '.' in sigma else int(sigma), path
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected SIGMA=PATH (e.g. 25=net_g.pth), got {text!r}') from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for fam in ('n3net', 'nlrn', 'dncnn'):
        ap.add_argument(f'--{fam}', type=_spec, action='append', default=[], metavar='SIGMA=PATH',
                        help=f'{fam} weights trained for noise SIGMA (repeatable)')
    ap.add_argument('--data', default='datasets', help='folder holding the test sets (default: datasets)')
    ap.add_argument('--sets', nargs='+', default=list(DEFAULT_SETS), help='test sets (folders under --data)')
    ap.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32', help='inference precision')
    ap.add_argument('--noise-seed', type=int, default=0, help="SyntheticNoiseDataset's noise_seed (default 0)")
    ap.add_argument('--json', help='also write the rows (with per-image PSNRs) to this JSON file')
    args = ap.parse_args(argv)
    given = [(fam, sigma, path) for fam in ('n3net', 'nlrn', 'dncnn') for sigma, path in getattr(args, fam)]
    if not given:
        ap.error('give at least one network: --n3net / --nlrn / --dncnn SIGMA=PATH')
    models = []
    try:
        for fam, sigma, path in given:
            net, arch = load_model(path)
            models.append((f'{arch}', arch, sigma, net))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f'reproduce_tables: error: {e}', file=sys.stderr)
        return 2
    rows, missing = reproduce(models, args.data, args.sets, args.precision, args.noise_seed,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
    if not rows:
        print(f'reproduce_tables: error: none of the sets {args.sets} is under {args.data}', file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, precision=args.precision, noise_seed=args.noise_seed, data=args.data,
                   skipped=missing, weights=[{'family': f, 'sigma': s, 'path': p} for f, s, p in given])
    return 0


if __name__ == '__main__':
    sys.exit(main())
