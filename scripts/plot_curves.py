#!/usr/bin/env python
"""PSNR-vs-iteration and loss curves of a BasicSR training run, as PNG files.

    python scripts/plot_curves.py experiments/NLRN_denoise_sigma25             # its train_*.log files
    python scripts/plot_curves.py experiments/X/train_X_20250101_120000.log --out curves/
    python scripts/plot_curves.py --tb tb_logger/NLRN_denoise_sigma25          # TensorBoard events instead

Writes ``loss.png`` and one ``<metric>.png`` per validation metric (``psnr.png``, ``ssim.png``; a line per
validation set) into ``--out`` (default: ``<experiment>/curves``). Needs matplotlib (``pip install -e .[viz]``),
and tensorboard for ``--tb``. The parsing lives in ``nl_plugin.analysis.curves``.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('log', nargs='?', default=None, help='train_*.log file or experiment folder')
    ap.add_argument('--tb', default=None, help='TensorBoard folder (tb_logger/<name>) to read instead of a log')
    ap.add_argument('--out', default=None, help='output folder')
    ap.add_argument('--prefix', default='', help='file-name prefix')
    args = ap.parse_args(argv)
    if (args.log is None) == (args.tb is None):
        ap.error('give a training log (or experiment folder) or --tb, one of them')
    from nl_plugin.analysis.curves import parse_train_log, read_tensorboard
    from nl_plugin.analysis.figures import curve_figures
    source = args.log or args.tb
    curves = parse_train_log(args.log) if args.log else read_tensorboard(args.tb)
    if not curves['loss'] and not curves['metric']:
        raise SystemExit(f'{source}: no loss or validation lines found')
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    out = args.out or os.path.join(folder, 'curves')
    written = curve_figures(curves, out, args.prefix)
    for name in written:
        print(os.path.join(out, name))
    return curves, written


if __name__ == '__main__':
    main()
