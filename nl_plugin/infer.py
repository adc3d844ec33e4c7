"""``basicsr infer``: run a trained network on one's own photos (no ground truth), from its weight file alone.

    basicsr infer --model net_g_latest.pth --input photos/ --output restored/
    basicsr infer --model nlrn.safetensors --input noisy.png --output out/ --color y --self-ensemble
    basicsr infer --model vdsr.pth --input small.png --output out/ --scale 3      # SR: bicubic x3 first
    python -m nl_plugin.infer ...                                                  # the same

The weight file names its architecture (``nl_plugin.weights``); ``--arch``/``--arch-opt`` cover files
that do not. Memory is bounded for any image size: NLRN's window scope streams the image by itself,
everything else runs in overlapping tiles (``nl_plugin.ops.tiling.tiled_forward``) once it is large.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import yaml

from nl_plugin import image_io
from nl_plugin.ops.tiling import self_ensemble, tiled_forward

_DESCRIPTION = __doc__.split('\n\n')[0].replace('``', "'")


class InferError(ValueError):
    """A bad option or input (one-line message naming it)."""


def _tile_arg(text):
    text = str(text).strip().lower()
    if text in ('auto', 'none', '0', 'off'):
        return text if text == 'auto' else None
    try:
        size, _, overlap = text.partition(':')
        size, overlap = int(size), int(overlap) if overlap else None
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected SIZE[:OVERLAP], auto or 0, got {text!r}') from None
    if size <= 0 or (overlap is not None and not 0 <= overlap < size):
        raise argparse.ArgumentTypeError(f'need SIZE > 0 and 0 <= OVERLAP < SIZE, got {text!r}')
    return size, overlap if overlap is not None else size // 8


def _key_value(text):
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    return key, yaml.safe_load(value)


def build_parser(parser=None):
    """The ``infer`` argument parser (also used as the ``basicsr infer`` subparser)."""
    p = parser or argparse.ArgumentParser(prog='basicsr infer', description=_DESCRIPTION)
    p.add_argument('--model', required=True, metavar='FILE', help='weight file (.pth or .safetensors)')
    p.add_argument('--input', required=True, metavar='FILE_OR_DIR', help='an image, or a folder of images')
    p.add_argument('--output', required=True, metavar='DIR', help='folder for the results (created if needed)')
    p.add_argument('--arch', metavar='TYPE', help='architecture, for files that carry none (e.g. NLRN, N3Net, DnCNN)')
    p.add_argument('--arch-opt', type=_key_value, action='append', default=[], metavar='KEY=VALUE',
                   help='constructor argument overriding the file\'s (YAML value), e.g. nl_scope=window; repeatable')
    p.add_argument('--param-key', metavar='KEY', help='state dict to use (default: params_ema if present, else params)')
    p.add_argument('--tile', type=_tile_arg, default='auto', metavar='SIZE[:OVERLAP]',
                   help='tile size and overlap in input pixels; 0 = whole image; auto (default): NLRN global '
                        'scope 45:22, window scope untiled (streams) below 2048 px, others 512:64 above 1024 px')
    p.add_argument('--tile-batch', type=int, default=1, metavar='N', help='tiles per network call (default: 1)')
    p.add_argument('--color', choices=image_io.COLOR_MODES,
                   help='colour photo into a 1-channel network: gray (output gray), y (restore Y, keep Cb/Cr) or '
                        'rgb (each channel in turn). Default: y with --scale or for a Y-trained model, else rgb')
    p.add_argument('--precision', choices=('auto', 'fp32', 'bf16'), default='auto',
                   help='bf16 autocast; auto = bf16 where the CPU has AMX/avx512_bf16 or the GPU supports it')
    p.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda or cuda:N')
    p.add_argument('--self-ensemble', action='store_true', help='mean over the 8 flips/rotations (NLRN-MV)')
    p.add_argument('--scale', type=int, default=1,
                   help='SR: upscale factor; the input is bicubic-upsampled first (NLRN/VDSR/N3Net convention)')
    p.add_argument('--suffix', default='', help='appended to each output file name (before the extension)')
    p.add_argument('--ext', default=None, help='output format, e.g. png or tif (default: the input\'s)')
    p.add_argument('--overwrite', action='store_true', help='replace existing output files')
    return p


def cpu_has_bf16():
    """Whether the CPU has native bf16 arithmetic (AMX or AVX512-BF16), from /proc/cpuinfo's flags."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
        return False
    return bool({'amx_bf16', 'avx512_bf16'} & set(flags))


def resolve_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InferError(f'--device: unknown device {name!r} (auto, cpu, cuda or cuda:N)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InferError(f'--device {name}: no CUDA device is available')
    return device


def resolve_precision(name, device):
    if name != 'auto':
        return name
    if device.type == 'cuda':
        return 'bf16' if torch.cuda.is_bf16_supported() else 'fp32'
    return 'bf16' if device.type == 'cpu' and cpu_has_bf16() else 'fp32'


def auto_tile(spec, h, w):
    """Default (size, overlap) for an image of h x w under the arch spec, or None for one pass."""
    kind = spec['type']
    if kind == 'NLRN':
        if spec.get('nl_scope') == 'window' and spec.get('border', 'exclude') == 'exclude':
            return (2048, 128) if min(h, w) > 2048 else None
        if spec.get('nl_scope') == 'window':     # circular border: no streaming, logits of the whole image
            return (512, 128) if max(h, w) > 512 else None
        return 45, 22   # global scope: the attention extent it was trained on (official protocol: 45:38)
    if max(h, w) <= 1024:
        return None
    return 512, 96 if kind == 'N3Net' else 64


class Restorer:
    """A network and how to run it on one image: colour planes, SR upsampling, tiles, ensemble, precision.

    Args:
        net (nn.Module): The network (eval mode).
        spec (dict): Its arch spec.
        pipeline (dict): ``residual_learning`` and the training ``color`` (from the weight file).
        args (argparse.Namespace): The ``infer`` options.
    """

    def __init__(self, net, spec, pipeline, args):
        self.device = resolve_device(args.device)
        self.net = net.to(self.device).eval()
        self.spec, self.args = spec, args
        self.residual = bool(pipeline.get('residual_learning'))
        self.net_scale = int(getattr(net, 'upscale', 1) or 1)
        self.net_ch = int(getattr(net, 'num_in_ch', 0) or self._first_in_channels(net))
        if getattr(net, 'num_noise_ch', 0):
            raise InferError(f'{args.model}: the network also takes {net.num_noise_ch} noise-map channels, '
                             'which basicsr infer cannot supply')
        if args.scale < 1:
            raise InferError(f'--scale must be >= 1, got {args.scale}')
        if self.net_scale > 1 and args.scale not in (1, self.net_scale):
            raise InferError(f'--scale {args.scale}: the network upscales by {self.net_scale} itself')
        self.pre_scale = args.scale if self.net_scale == 1 else 1
        self.out_scale = self.pre_scale * self.net_scale
        # a gray-trained denoiser meets a colour photo one channel at a time; Y-trained and SR models see Y
        self.color = args.color or ('y' if self.out_scale > 1 or pipeline.get('color') == 'y' else 'rgb')
        if self.net_ch == 3 and self.color != 'rgb':
            raise InferError(f'--color {self.color}: {spec["type"]} takes 3 channels (RGB); use --color rgb')
        self.precision = resolve_precision(args.precision, self.device)

    @staticmethod
    def _first_in_channels(net):
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                return m.in_channels
        return 1

    def _call(self, x):
        out = self.net(x)
        if self.residual:
            out = out + x[:, :out.shape[1]]
        return out.float()

    def _run_plane(self, x, tile):
        fn = self._call
        if tile:
            size, overlap = tile
            fn = lambda t: tiled_forward(self._call, t, size, overlap=overlap,  # noqa: E731
                                         tile_batch=self.args.tile_batch, scale=self.net_scale)
        if self.args.self_ensemble:
            return self_ensemble(fn, x)
        return fn(x)

    def _forward(self, x, tile):
        if self.precision == 'bf16':
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    out = self._run_plane(x, tile)
                if torch.isfinite(out).all():
                    return out
                reason = 'non-finite output'
            except (RuntimeError, NotImplementedError, TypeError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f'basicsr infer: warning: {self.spec["type"]} does not run under bf16 autocast ({reason}); '
                  'using fp32', file=sys.stderr)
            self.precision = 'fp32'
        return self._run_plane(x, tile)

    @torch.no_grad()
    def restore(self, img):
        """(H, W, C) BGR float image -> restored (H*s, W*s, C') BGR float image."""
        img = image_io.resize(img, self.pre_scale)
        planes, merge = image_io.to_planes(img, self.color, self.net_ch)
        h, w = img.shape[:2]
        tile = auto_tile(self.spec, h, w) if self.args.tile == 'auto' else self.args.tile
        outs = []
        for plane in planes:
            x = torch.from_numpy(np.ascontiguousarray(plane.transpose(2, 0, 1)))[None].to(self.device)
            outs.append(self._forward(x, tile)[0].permute(1, 2, 0).cpu().numpy())
        return merge(outs, self.net_scale)     # the planes were upsampled by pre_scale already


def plan_outputs(inputs, args):
    """Output path of every input; refuses existing files (unless ``--overwrite``) and name clashes."""
    ext = None if not args.ext else '.' + args.ext.lower().lstrip('.')
    if ext and ext not in image_io.IMAGE_EXTS:
        raise InferError(f'--ext: unsupported format {args.ext!r} (one of {", ".join(image_io.IMAGE_EXTS)})')
    outs, seen = [], {}
    for src in inputs:
        stem, src_ext = os.path.splitext(os.path.basename(src))
        dst = os.path.join(args.output, f'{stem}{args.suffix}{ext or src_ext.lower()}')
        if dst in seen:
            raise InferError(f'{src} and {seen[dst]} would both be written to {dst}; use --ext or separate runs')
        seen[dst] = src
        outs.append(dst)
    existing = [d for d in outs if os.path.exists(d)]
    if existing and not args.overwrite:
        more = f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''
        raise InferError(f'{existing[0]} exists{more}; nothing was written (use --overwrite to replace)')
    return outs


def run(args):
    """Restore every input image; returns the process exit status (1 if some image failed)."""
    from tqdm import tqdm

    from nl_plugin import weights
    if args.tile_batch < 1:
        raise InferError(f'--tile-batch must be >= 1, got {args.tile_batch}')
    inputs = image_io.list_images(args.input)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InferError(f'--output {args.output}: exists and is not a folder')
    outputs = plan_outputs(inputs, args)
    net, spec, loaded = weights.load_network(args.model, args.arch, dict(args.arch_opt), args.param_key)
    restorer = Restorer(net, spec, loaded.pipeline, args)
    os.makedirs(args.output, exist_ok=True)
    print(f'{weights.describe(spec)} from {args.model} on {restorer.device} ({restorer.precision}), '
          f'colour {restorer.color}, {len(inputs)} image(s)', file=sys.stderr)
    failed = 0
    bar = tqdm(list(zip(inputs, outputs)), unit='image', dynamic_ncols=True, file=sys.stderr)
    for src, dst in bar:
        start = time.perf_counter()
        try:
            img, dtype, alpha = image_io.read_image(src)
            out = restorer.restore(img)
            if alpha is not None:
                alpha = image_io.resize(alpha, restorer.out_scale)
            written = image_io.write_image(dst, out, dtype, alpha)
        except (image_io.ImageError, InferError, ValueError) as err:
            failed += 1
            bar.write(f'basicsr infer: error: {err if str(src) in str(err) else f"{src}: {err}"}', file=sys.stderr)
            continue
        secs = time.perf_counter() - start
        bar.set_postfix_str(f'{os.path.basename(src)} {secs:.2f} s')
        bar.write(f'{src} -> {dst} ({out.shape[1]}x{out.shape[0]}, {written.itemsize * 8}-bit, {secs:.2f} s)',
                  file=sys.stderr)
    bar.close()
    return 1 if failed else 0


def main(argv=None, args=None):
    """Entry point of ``basicsr infer`` and ``python -m nl_plugin.infer``; errors are one line, exit 2."""
    if args is None:
        args = build_parser().parse_args(argv)
    from nl_plugin.weights import WeightsError
    try:
        return run(args)
    except (InferError, image_io.ImageError, WeightsError) as err:
        print(f'basicsr infer: error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
