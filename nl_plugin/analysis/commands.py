"""Command lines of the analysis scripts (``scripts/plot_curves.py``, ``scripts/visualize_attention.py``,
``scripts/model_stats.py``): each function parses ``argv`` (default: the process's arguments) and returns what it
computed, so that it can also be called from Python. The computations live in the other ``analysis`` modules.
"""
import argparse
import inspect
import json
import os
import sys
import time

from nl_plugin.utils import key_value_arg


def _parser(command):
    return argparse.ArgumentParser(description=inspect.cleandoc(command.__doc__),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def plot_curves(argv=None):
    """PSNR-vs-iteration and loss curves of a BasicSR training run, as PNG files.

        python scripts/plot_curves.py experiments/NLRN_denoise_sigma25             # its train_*.log files
        python scripts/plot_curves.py experiments/X/train_X_20250101_120000.log --out curves/
        python scripts/plot_curves.py --tb tb_logger/NLRN_denoise_sigma25          # TensorBoard events instead

    Writes ``loss.png`` and one ``<metric>.png`` per validation metric (``psnr.png``, ``ssim.png``; a line per
    validation set) into ``--out`` (default: ``<experiment>/curves``). Needs matplotlib (``pip install -e .[viz]``),
    and tensorboard for ``--tb``. The parsing lives in ``nl_plugin.analysis.curves``.

    Returns:
        tuple[dict, list[str]]: The curves and the names of the files written.
    """
    ap = _parser(plot_curves)
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


def _pixel(text):
    try:
        y, x = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--pixels: expected y,x (e.g. 120,200), got {text!r}')
    return y, x


def visualize_attention(argv=None):
    """Draw what a trained network's non-local modules attend to, over an image (PNG with colour bars).

        # NLRN: attention of chosen pixels at every recurrent step (paper Fig. 4), window scope at full size
        python scripts/visualize_attention.py -opt options/train_nlrn_denoise.yml --weights net_g.pth \\
            --image img.png --sigma 25 --pixels 120,200 60,80 --set nl_scope=window --out nlrn_attention.png
        # ... next to a model trained without correlation propagation
        python scripts/visualize_attention.py ... --compare other.pth --compare_set propagate_correlation=false
        # N3Net: the k neighbour weights of the patch at each pixel and the temperature map of block 0
        python scripts/visualize_attention.py -opt options/train_n3net_denoise.yml --weights n3net.pth \\
            --image img.png --sigma 25 --pixels 100,100 --block 0 --out n3_neighbours.png

    ``--pixels`` are y,x in the input image; ``--set`` changes network_g keys (same weights); ``--save_arrays``
    writes the weights drawn (one array per figure row) to an .npz file. Needs matplotlib
    (``pip install -e .[viz]``). The computation lives in ``nl_plugin.analysis.attention_maps``.

    Returns:
        dict: ``figures``' result (``size`` of the PNG, ``drawn`` weights).
    """
    ap = _parser(visualize_attention)
    ap.add_argument('-opt', required=True, help='option file whose network_g is drawn')
    ap.add_argument('--weights', default=None, help='trained weights (BasicSR net_g_*.pth)')
    ap.add_argument('--param_key', default='params', help="'params' or 'params_ema'")
    ap.add_argument('--image', required=True, help='input image (the clean one when --sigma is given)')
    ap.add_argument('--sigma', type=float, default=0, help='add Gaussian noise of this sigma (0..255) first')
    ap.add_argument('--pixels', type=_pixel, nargs='+', default=None, help='query pixels y,x (default: centre)')
    ap.add_argument('--set', type=key_value_arg, nargs='*', default=[], metavar='KEY=VALUE',
                    help='network_g keys to change')
    ap.add_argument('--block', type=int, default=0, help='N3Net / injected networks: which non-local block')
    ap.add_argument('--compare', default=None, help='NLRN: weights of a second model, drawn below the first')
    ap.add_argument('--compare_set', type=key_value_arg, nargs='*', default=[], metavar='KEY=VALUE',
                    help='network_g keys of it')
    ap.add_argument('--out', required=True, help='output PNG')
    ap.add_argument('--save_arrays', default=None, help='also write the drawn weights to this .npz')
    args = ap.parse_args(argv)
    import cv2
    import numpy as np

    import nl_plugin  # noqa: F401  (registers the architectures)
    from nl_plugin.analysis import figures
    from nl_plugin.analysis.attention_maps import network_attention
    from nl_plugin.analysis.networks import add_noise, network_from_options, read_image, to_tensor

    net, net_opt = network_from_options(args.opt, dict(args.set), args.weights, args.param_key)
    channels = net_opt.get('num_in_ch') or net_opt.get('base', {}).get('num_in_ch') or 1
    image = add_noise(read_image(args.image, channels), args.sigma)
    x = to_tensor(image)
    pixels = args.pixels or [(image.shape[0] // 2, image.shape[1] // 2)]
    kind, results, z = network_attention(net, x, pixels, args.block)
    labels = ['A'] * len(results)
    if args.compare:
        if kind != 'nlrn':
            raise SystemExit('--compare draws a second NLRN; this network is not one')
        other, _ = network_from_options(args.opt, dict(args.set + args.compare_set), args.compare, args.param_key)
        results += network_attention(other, x, pixels)[1]
        labels += ['B'] * len(pixels)
    shown = image if z.shape[-2:] == x.shape[-2:] else cv2.resize(image, z.shape[-1:-3:-1], cv2.INTER_NEAREST)
    title = f'{net_opt["type"]}: {os.path.basename(args.image)}' + (f', sigma {args.sigma:g}' if args.sigma else '')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if kind == 'n3':
        res = figures.n3_figure(shown, results, args.out, title=title)
    else:
        res = figures.attention_figure(shown, results, args.out, title=title,
                                       labels=labels if args.compare else None)
    if args.save_arrays:
        np.savez(args.save_arrays, **{f'q{i}_row{r}': a for i, rows in enumerate(res['drawn'])
                                      for r, a in enumerate(rows if isinstance(rows, list) else [rows])})
    print(f'wrote {args.out} ({res["size"][1]}x{res["size"][0]} px)')
    return res


def model_stats(argv=None):
    """Parameters, multiply-adds, depth and receptive field of every architecture of this project, as one table.

        python scripts/model_stats.py                      # the table at 481x321 (the NLRN paper's Table 3 and more)
        python scripts/model_stats.py --size 256 256 --only NLRN N3Net --json stats.json
        python scripts/model_stats.py --overhead options/train_edsr_n3.yml   # time / memory each inserted block adds

    Rows: the papers' networks and variants, every registered block with default arguments, and the networks
    of the injection option files (``options/train_edsr_n3.yml``, ``options/train_rrdb_nonlocal.yml``) next to
    their bases. Multiply-adds are counted at ``--size`` (H W), the receptive field at ``--rf_size`` ("whole
    input": it reaches every pixel of that input), the depth on a 24x24 input. See ``nl_plugin.analysis.model_stats``.

    Returns:
        list[dict]: The table's rows (or ``--overhead``'s rows).
    """
    ap = _parser(model_stats)
    ap.add_argument('--size', type=int, nargs=2, default=[321, 481], metavar=('H', 'W'), help='input for MACs')
    ap.add_argument('--rf_size', type=int, default=48, help='square input for the receptive field')
    ap.add_argument('--only', nargs='*', default=None, help='rows whose name contains one of these')
    ap.add_argument('--json', default=None, help='also write the rows to this JSON file')
    ap.add_argument('--overhead', default=None, metavar='YML', help='time/memory per inserted block instead')
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='for --overhead')
    ap.add_argument('--repeats', type=int, default=3, help='for --overhead')
    args = ap.parse_args(argv)
    import yaml

    import nl_plugin  # noqa: F401  (registers the architectures)
    from nl_plugin.analysis.model_stats import all_cases, format_overhead, format_table, injection_overhead, stats_row
    size = tuple(args.size)
    if args.overhead:
        with open(args.overhead) as f:
            rows = injection_overhead(yaml.safe_load(f)['network_g'], size, args.device, args.repeats)
        print('\n' + format_overhead(rows, size, args.device))
    else:
        rows = []
        for case in all_cases():
            if args.only and not any(s in case.label for s in args.only):
                continue
            t0 = time.perf_counter()
            rows.append(stats_row(case, size, args.rf_size))
            print(f'{case.label}: {time.perf_counter() - t0:.1f} s', file=sys.stderr, flush=True)
        print(format_table(rows, size))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'size': size, 'rows': rows}, f, indent=1)
    return rows


__all__ = ['plot_curves', 'visualize_attention', 'model_stats']
