#!/usr/bin/env python
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
(``pip install -e .[viz]``). The computation lives in ``nl_plugin.analysis``.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _pixel(text):
    try:
        y, x = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'--pixels: expected y,x (e.g. 120,200), got {text!r}')
    return y, x


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('-opt', required=True, help='option file whose network_g is drawn')
    ap.add_argument('--weights', default=None, help='trained weights (BasicSR net_g_*.pth)')
    ap.add_argument('--param_key', default='params', help="'params' or 'params_ema'")
    ap.add_argument('--image', required=True, help='input image (the clean one when --sigma is given)')
    ap.add_argument('--sigma', type=float, default=0, help='add Gaussian noise of this sigma (0..255) first')
    ap.add_argument('--pixels', type=_pixel, nargs='+', default=None, help='query pixels y,x (default: centre)')
    ap.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='network_g keys to change')
    ap.add_argument('--block', type=int, default=0, help='N3Net / injected networks: which non-local block')
    ap.add_argument('--compare', default=None, help='NLRN: weights of a second model, drawn below the first')
    ap.add_argument('--compare_set', nargs='*', default=[], metavar='KEY=VALUE', help='network_g keys of it')
    ap.add_argument('--out', required=True, help='output PNG')
    ap.add_argument('--save_arrays', default=None, help='also write the drawn weights to this .npz')
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    import cv2
    import numpy as np

    import nl_plugin  # noqa: F401  (registers the architectures)
    from nl_plugin.analysis import figures
    from nl_plugin.analysis.attention_maps import network_attention
    from nl_plugin.analysis.networks import add_noise, network_from_options, parse_overrides, read_image, to_tensor

    net, net_opt = network_from_options(args.opt, parse_overrides(args.set), args.weights, args.param_key)
    channels = net_opt.get('num_in_ch') or net_opt.get('base', {}).get('num_in_ch') or 1
    image = add_noise(read_image(args.image, channels), args.sigma)
    x = to_tensor(image)
    pixels = args.pixels or [(image.shape[0] // 2, image.shape[1] // 2)]
    kind, results, z = network_attention(net, x, pixels, args.block)
    labels = ['A'] * len(results)
    if args.compare:
        if kind != 'nlrn':
            raise SystemExit('--compare draws a second NLRN; this network is not one')
        other, _ = network_from_options(args.opt, parse_overrides(args.set + args.compare_set), args.compare,
                                        args.param_key)
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


if __name__ == '__main__':
    main()
