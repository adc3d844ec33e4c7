"""Export a trained network to ONNX and check it against PyTorch with onnxruntime.

    python scripts/export_onnx.py --model net_g_latest.pth --output dncnn.onnx
    python scripts/export_onnx.py --model nlrn.pth --output nlrn45.onnx --height 45 --width 45
    python scripts/export_onnx.py --model n3net.pth --output n3net.onnx --height 256 --width 256

Input ``image`` (N, C, H, W) float32 in [0, 1], output ``restored``. Needs the ``onnx`` extra
(``pip install nl_plugin[onnx]``: onnx, onnxscript, onnxruntime). What exports, as checked here:

* DnCNN, VDSR, NLRN (global scope, and window scope): dynamic N, H and W. NLRN's attention is exported
  in its dense form (an (HW)^2 matrix per step in the global scope, masked to the window in the
  window scope), so its memory grows with the square of the pixel count: export it for tiles
  (e.g. 45x45, the official test protocol) rather than whole photos.
* N3Net: fixed H and W (``--height``/``--width``): its patch search plans tiles from the image size
  in Python. Needs the torch.export-based exporter (the TorchScript one cannot translate ``fold``).

The network is traced with autograd on, so that the archs take their plain tensor paths rather
than the inference fast paths (which write into preallocated views and stream NLRN's window scope
band by band), and after one eager run, so that cached index plans are real tensors. Each exporter
is tried with dynamic H/W first; an export counts only if onnxruntime reproduces PyTorch within
``--atol`` (default 1e-4 on [0, 1] images) at the export size and, for a dynamic one, at a second size.
"""
import argparse
import os
import sys
import warnings

import numpy as np
import torch

from nl_plugin import weights
from nl_plugin.utils import key_value_arg

EXPORTERS = ('torchscript', 'dynamo')


class Pipeline(torch.nn.Module):
    """The network as RestorationModel calls it (``residual_learning`` adds the input back)."""

    def __init__(self, net, residual):
        super().__init__()
        self.net, self.residual = net, residual

    def forward(self, image):
        out = self.net(image)
        return out + image[:, :out.shape[1]] if self.residual else out


def _export(model, example, path, exporter, dynamic, opset):
    axes = {0: 'batch', 2: 'height', 3: 'width'}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if exporter == 'torchscript':
            torch.onnx.export(model, (example, ), path, dynamo=False, input_names=['image'],
                              output_names=['restored'], opset_version=opset,
                              dynamic_axes={'image': axes, 'restored': axes} if dynamic else None)
            return
        shapes = None
        if dynamic:
            shapes = ({0: torch.export.Dim('batch', max=64), 2: torch.export.Dim('height', min=8, max=8192),
                       3: torch.export.Dim('width', min=8, max=8192)}, )
        program = torch.onnx.export(model, (example, ), dynamo=True, input_names=['image'],
                                    output_names=['restored'], opset_version=opset, dynamic_shapes=shapes,
                                    verbose=False)
        program.save(path)


def check(model, path, shapes, atol):
    """Max |onnxruntime - PyTorch| at each shape (None where onnxruntime is missing); raises past ``atol``."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    errors = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.rand(*shape, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {'image': x.numpy()})[0]
        if out.shape != ref.shape:
            raise ValueError(f'{path}: output shape {out.shape} at input {tuple(shape)}, PyTorch gives {ref.shape}')
        err = float(np.abs(out - ref).max())
        if not err <= atol:
            raise ValueError(f'{path}: max |onnxruntime - PyTorch| = {err:.3g} > {atol:g} at input {tuple(shape)}')
        errors.append(err)
    return max(errors)


def export_onnx(model, path, channels, height, width, exporters=EXPORTERS, static=False, opset=18, atol=1e-4):
    """Export ``model`` with the first exporter/shape mode that onnxruntime confirms.

    Returns:
        dict: ``exporter``, ``dynamic`` (bool), ``max_error`` (None if onnxruntime is missing) and
        ``tried`` (one line per failed attempt).
    """
    example = torch.rand(1, channels, height, width)
    with torch.no_grad():
        model(example)      # eager warm-up: index plans cached as real tensors, not tracing placeholders
    tried = []
    for exporter in exporters:
        for dynamic in ([False] if static else [True, False]):
            tmp = path + '.part'
            try:
                _export(model, example, tmp, exporter, dynamic, opset)
                shapes = [(1, channels, height, width)]
                if dynamic:
                    shapes.append((2, channels, height + 7, width + 3))
                err = check(model, tmp, shapes, atol)
            except Exception as e:  # noqa: BLE001  (exporters fail in many ways; each is reported)
                lines = str(e).strip().splitlines() or [type(e).__name__]
                tried.append(f'{exporter}, {"dynamic" if dynamic else "fixed"} H/W: {lines[0][:200]}')
                if os.path.exists(tmp):
                    os.remove(tmp)
                continue
            os.replace(tmp, path)
            return {'exporter': exporter, 'dynamic': dynamic, 'max_error': err, 'tried': tried}
    raise RuntimeError(f'{path}: no exporter produced a model that matches PyTorch: ' + ' | '.join(tried))



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help='weight file (.pth or .safetensors)')
    parser.add_argument('--output', required=True, help='.onnx file to write')
    parser.add_argument('--arch', help='architecture for files that carry none')
    parser.add_argument('--arch-opt', type=key_value_arg, action='append', default=[], metavar='KEY=VALUE')
    parser.add_argument('--param-key', help='state dict to export (default: params_ema if present, else params)')
    parser.add_argument('--height', type=int, default=64, help='example height (the fixed one if not dynamic)')
    parser.add_argument('--width', type=int, default=64, help='example width (the fixed one if not dynamic)')
    parser.add_argument('--static', action='store_true', help='fixed H/W only (skip the dynamic attempts)')
    parser.add_argument('--exporter', choices=('auto', ) + EXPORTERS, default='auto',
                        help='auto: TorchScript (fast) first, then torch.export')
    parser.add_argument('--opset', type=int, default=18)
    parser.add_argument('--atol', type=float, default=1e-4, help='tolerance of the onnxruntime check')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
    args = parser.parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        print(f'export_onnx: error: {args.output} exists; use --overwrite to replace it', file=sys.stderr)
        return 2
    try:
        net, spec, loaded = weights.load_network(args.model, args.arch, dict(args.arch_opt), args.param_key)
    except weights.WeightsError as err:
        print(f'export_onnx: error: {err}', file=sys.stderr)
        return 2
    model = Pipeline(net, bool(loaded.pipeline.get('residual_learning'))).eval()
    channels = int(getattr(net, 'num_in_ch', 1)) + int(getattr(net, 'num_noise_ch', 0) or 0)
    exporters = EXPORTERS if args.exporter == 'auto' else (args.exporter, )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    try:
        info = export_onnx(model, args.output, channels, args.height, args.width, exporters, args.static,
                           args.opset, args.atol)
    except RuntimeError as err:
        print(f'export_onnx: error: {err}', file=sys.stderr)
        return 1
    shape = 'dynamic N/H/W' if info['dynamic'] else f'fixed {args.height}x{args.width}'
    checked = ('not checked (onnxruntime not installed)' if info['max_error'] is None else
               f'onnxruntime matches PyTorch within {info["max_error"]:.2g} (atol {args.atol:g})')
    print(f'wrote {args.output}: {weights.describe(spec)}, {info["exporter"]} exporter, {shape}; {checked}')
    return 0


__all__ = ['EXPORTERS', 'Pipeline', 'export_onnx', 'check', 'main']
