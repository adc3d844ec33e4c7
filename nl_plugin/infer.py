"""``basicsr infer``: run a trained network on one's own photos (no ground truth), from its weight file alone.

    basicsr infer --model net_g_latest.pth --input photos/ --output restored/
    basicsr infer --model nlrn.safetensors --input noisy.png --output out/ --color y --self-ensemble
    basicsr infer --model vdsr.pth --input small.png --output out/ --scale 3      # SR: bicubic x3 first
    python -m nl_plugin.infer ...                                                  # the same

The weight file names its architecture (``nl_plugin.weights``); ``--arch``/``--arch-opt`` cover files
that do not. The network's memory is bounded for any image size: each architecture declares its tiles
(``auto_tile``; NLRN's window scope streams the image by itself), the others run in overlapping tiles
(``nl_plugin.ops.tiling.tiled_forward``) once large. The decoded image itself is whole (OpenCV decodes whole
images): ``--max-pixels`` refuses larger ones from their header, before decoding.

Outputs go to a hidden temporary file in the output folder and are renamed into place (``nl_plugin.fileio``);
without ``--overwrite`` the rename refuses a name that exists, also one a concurrent run made meanwhile.
The default precision is fp32, the result of ``basicsr test``; ``--precision bf16|auto`` is opt-in.
"""
import argparse
import errno
import os
import sys
import time
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from nl_plugin import fileio, image_io
from nl_plugin.archs.arch_util import auto_tile
from nl_plugin.models.precision import autocast, resolve_precision
from nl_plugin.ops.tiling import self_ensemble, tiled_forward
from nl_plugin.utils import key_value_arg

_DESCRIPTION = __doc__.split('\n\n')[0].replace('``', "'")


class InferError(ValueError):
    """A bad option or input (one-line message naming it)."""


Tile = Union[str, None, Tuple[int, int]]


def _tile_arg(text: str) -> Tile:
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


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The ``infer`` argument parser (also used as the ``basicsr infer`` subparser)."""
    p = parser or argparse.ArgumentParser(prog='basicsr infer', description=_DESCRIPTION)
    p.add_argument('--model', required=True, metavar='FILE', help='weight file (.pth or .safetensors)')
    p.add_argument('--input', required=True, metavar='FILE_OR_DIR', help='an image, or a folder of images')
    p.add_argument('--output', required=True, metavar='DIR', help='folder for the results (created if needed)')
    p.add_argument('--arch', metavar='TYPE', help='architecture, for files that carry none (e.g. NLRN, N3Net, DnCNN)')
    p.add_argument('--arch-opt', type=key_value_arg, action='append', default=[], metavar='KEY=VALUE',
                   help='constructor argument overriding the file\'s (YAML value), e.g. nl_scope=window; repeatable')
    p.add_argument('--param-key', metavar='KEY', help='state dict to use (default: params_ema if present, else params)')
    p.add_argument('--tile', type=_tile_arg, default='auto', metavar='SIZE[:OVERLAP]',
                   help='tile size and overlap in input pixels; 0 = whole image; auto (default): as the '
                        'architecture declares (auto_tile): NLRN global scope 45:22, window scope untiled (streams) '
                        'below 2048 px, others 512:64 (N3Net 512:96) above 1024 px')
    p.add_argument('--tile-batch', type=int, default=1, metavar='N', help='tiles per network call (default: 1)')
    p.add_argument('--color', choices=image_io.COLOR_MODES,
                   help='colour photo into a 1-channel network: gray (output gray), y (restore Y, keep Cb/Cr) or '
                        'rgb (each channel in turn). Default: y with --scale or for a Y-trained model, else rgb')
    p.add_argument('--precision', choices=('fp32', 'bf16', 'auto'), default='fp32',
                   help='fp32 (default: the result of basicsr test), bf16 autocast (faster, a few hundredths of '
                        'a dB lower; see the README), or auto = bf16 where the CPU has AMX/avx512_bf16 or the '
                        'GPU runs bf16 natively')
    p.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda or cuda:N')
    p.add_argument('--self-ensemble', action='store_true', help='mean over the 8 flips/rotations (NLRN-MV)')
    p.add_argument('--scale', type=int, default=1,
                   help='SR: upscale factor; the input is bicubic-upsampled first (NLRN/VDSR/N3Net convention)')
    p.add_argument('--suffix', default='', help='appended to each output file name (before the extension)')
    p.add_argument('--ext', default=None, help='output format, e.g. png or tif (default: the input\'s)')
    p.add_argument('--overwrite', action='store_true', help='replace existing output files')
    p.add_argument('--max-pixels', type=int, default=image_io.MAX_PIXELS, metavar='N',
                   help=f'refuse images of more than N pixels, read from the file header before decoding '
                        f'(default: {image_io.MAX_PIXELS}, as Pillow; 0 = no limit)')
    return p


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; one-line error otherwise."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InferError(f'--device: unknown device {name!r} (auto, cpu, cuda or cuda:N)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InferError(f'--device {name}: no CUDA device is available')
    return device


class Restorer:
    """A network and how to run it on one image: colour planes, SR upsampling, tiles, ensemble, precision.

    Args:
        net (nn.Module): The network.
        spec (dict): Its arch spec (``{'type': ..., **kwargs}``).
        pipeline (dict, optional): ``residual_learning`` and the training ``color`` (from the weight file).
        device (str | torch.device): ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision (str): ``fp32`` (default: the result of ``basicsr test``), ``bf16``, ``fp16`` or ``auto``
            (bf16 where the hardware runs it natively; ``nl_plugin.models.precision.resolve_precision``).
        color (str, optional): ``gray``, ``y`` or ``rgb`` for a colour image into a 1-channel network.
            Default: ``y`` for SR or a Y-trained model, else ``rgb``.
        scale (int): SR: bicubic upsampling of the input before a network that does not upscale itself.
        tile (str | tuple | None): ``'auto'`` (the architecture's ``auto_tile``), ``(size, overlap)`` or None.
        tile_batch (int): Tiles per network call.
        self_ensemble (bool): Mean over the 8 flips/rotations.

    Example::

        net, spec, loaded = nl_plugin.weights.load_network('net_g_latest.pth')
        restored = Restorer(net, spec, loaded.pipeline, device='cpu').restore(image_io.read_image(path)[0])
    """

    def __init__(self, net: torch.nn.Module, spec: dict, pipeline: Optional[dict] = None, *,
                 device: Union[str, torch.device] = 'auto', precision: str = 'fp32', color: Optional[str] = None,
                 scale: int = 1, tile: Tile = 'auto', tile_batch: int = 1, self_ensemble: bool = False) -> None:
        pipeline = pipeline or {}
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.net = net.to(self.device).eval()
        self.spec, self.tile, self.tile_batch, self.self_ensemble = spec, tile, int(tile_batch), bool(self_ensemble)
        if self.tile_batch < 1:
            raise InferError(f'--tile-batch must be >= 1, got {tile_batch}')
        self.residual = bool(pipeline.get('residual_learning'))
        self.net_scale = int(getattr(net, 'upscale', 1) or 1)
        self.net_ch = int(getattr(net, 'num_in_ch', 0) or self._first_in_channels(net))
        if getattr(net, 'num_noise_ch', 0):
            raise InferError(f'the network also takes {net.num_noise_ch} noise-map channels, '
                             'which basicsr infer cannot supply')
        if scale < 1:
            raise InferError(f'--scale must be >= 1, got {scale}')
        if self.net_scale > 1 and scale not in (1, self.net_scale):
            raise InferError(f'--scale {scale}: the network upscales by {self.net_scale} itself')
        self.pre_scale = scale if self.net_scale == 1 else 1
        self.out_scale = self.pre_scale * self.net_scale
        # a gray-trained denoiser meets a colour photo one channel at a time; Y-trained and SR models see Y
        self.color = color or ('y' if self.out_scale > 1 or pipeline.get('color') == 'y' else 'rgb')
        if self.color not in image_io.COLOR_MODES:
            raise InferError(f'--color must be one of {image_io.COLOR_MODES}, got {self.color!r}')
        if self.net_ch == 3 and self.color != 'rgb':
            raise InferError(f'--color {self.color}: {spec["type"]} takes 3 channels (RGB); use --color rgb')
        try:
            self.dtype, self.precision_reason = resolve_precision(precision, self.device)
        except ValueError as err:
            raise InferError(f'--precision: {err}') from None

    @classmethod
    def from_args(cls, net: torch.nn.Module, spec: dict, pipeline: Optional[dict],
                  args: argparse.Namespace) -> 'Restorer':
        """The restorer the ``infer`` command line describes."""
        return cls(net, spec, pipeline, device=args.device, precision=args.precision, color=args.color,
                   scale=args.scale, tile=args.tile, tile_batch=args.tile_batch, self_ensemble=args.self_ensemble)

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: what the network runs in now."""
        return {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[self.dtype]

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
                                         tile_batch=self.tile_batch, scale=self.net_scale)
        if self.self_ensemble:
            return self_ensemble(fn, x)
        return fn(x)

    def _forward(self, x, tile):
        if self.dtype is not None:
            try:
                with autocast(self.device, self.dtype):
                    out = self._run_plane(x, tile)
                if torch.isfinite(out).all():
                    return out
                reason = 'non-finite output'
            except (RuntimeError, NotImplementedError, TypeError) as err:
                if _out_of_memory(err):
                    raise
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f'basicsr infer: warning: {self.spec["type"]} does not run under {self.precision} autocast '
                  f'({reason}); using fp32', file=sys.stderr)
            self.dtype = None
        return self._run_plane(x, tile)

    @torch.no_grad()
    def restore(self, img: np.ndarray) -> np.ndarray:
        """(H, W, C) BGR float image -> restored (H*s, W*s, C') BGR float image."""
        img = image_io.resize(img, self.pre_scale)
        planes, merge = image_io.to_planes(img, self.color, self.net_ch)
        h, w = img.shape[:2]
        tile = auto_tile(self.net, h, w) if self.tile == 'auto' else self.tile
        outs = []
        for plane in planes:
            x = torch.from_numpy(np.ascontiguousarray(plane.transpose(2, 0, 1)))[None].to(self.device)
            outs.append(self._forward(x, tile)[0].permute(1, 2, 0).cpu().numpy())
        return merge(outs, self.net_scale)     # the planes were upsampled by pre_scale already


def _out_of_memory(err: BaseException) -> bool:
    """A failed allocation (torch raises RuntimeError on the CPU, OutOfMemoryError on CUDA)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or 'out of memory' in text)


def plan_outputs(inputs: List[str], output: str, suffix: str = '', ext: Optional[str] = None,
                 overwrite: bool = False) -> List[str]:
    """Output path of every input; refuses existing files (unless ``overwrite``) and name clashes.

    The check here only spares a run that could write nothing; whether a file is replaced is decided again
    where it is written (``nl_plugin.fileio``), so a file another run makes meanwhile is never replaced.
    """
    ext = None if not ext else '.' + ext.lower().lstrip('.')
    if ext and ext not in image_io.IMAGE_EXTS:
        raise InferError(f'--ext: unsupported format {ext[1:]!r} (one of {", ".join(image_io.IMAGE_EXTS)})')
    outs, seen = [], {}
    for src in inputs:
        stem, src_ext = os.path.splitext(os.path.basename(src))
        dst = os.path.join(output, f'{stem}{suffix}{ext or src_ext.lower()}')
        if dst in seen:
            raise InferError(f'{src} and {seen[dst]} would both be written to {dst}; use --ext or separate runs')
        seen[dst] = src
        outs.append(dst)
    existing = [d for d in outs if os.path.lexists(d)]
    if existing and not overwrite:
        more = f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''
        raise InferError(f'{existing[0]} exists{more}; nothing was written (use --overwrite to replace)')
    return outs


def check_output_folder(folder: str) -> None:
    """One-line :class:`InferError` if ``folder`` cannot receive the results; creates nothing."""
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise InferError(f'--output {folder}: exists and is not a folder')
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InferError(f'--output {folder}: not writable (permissions or a read-only filesystem)')
        return
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InferError(f'--output {folder}: cannot be created, {parent} is not a folder')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InferError(f'--output {folder}: cannot be created in {parent} (permissions or a read-only filesystem)')


def prepare_output_folder(folder: str, outputs: List[str]) -> List[str]:
    """Create ``folder``, try a write there, and remove the temporary files a killed run left for ``outputs``.

    Returns:
        list[str]: The removed temporary files.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        fileio.check_writable(folder)
    except OSError as err:
        raise InferError(f'--output {folder}: cannot be written ({err.strerror or err})') from None
    return [os.path.join(folder, n) for n in fileio.remove_stale_temp_files(folder, names=outputs)]


def _write_failure(err: fileio.WriteError, dst: str) -> Tuple[str, bool]:
    """The one-line message of a failed output and whether the batch stops (no space left for any file)."""
    cause = err.__cause__ if isinstance(err.__cause__, OSError) else None
    if cause is None:
        return str(err), False
    full = cause.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC))
    return f'{dst}: cannot be written ({cause.strerror or cause})', full


def run(args: argparse.Namespace) -> int:
    """Restore every input image; returns the process exit status (1 if some image failed)."""
    from tqdm import tqdm

    from nl_plugin import weights
    if args.tile_batch < 1:
        raise InferError(f'--tile-batch must be >= 1, got {args.tile_batch}')
    if args.max_pixels < 0:
        raise InferError(f'--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}')
    inputs = image_io.list_images(args.input)
    check_output_folder(args.output)
    outputs = plan_outputs(inputs, args.output, args.suffix, args.ext, args.overwrite)
    net, spec, loaded = weights.load_network(args.model, args.arch, dict(args.arch_opt), args.param_key)
    try:
        restorer = Restorer.from_args(net, spec, loaded.pipeline, args)
    except InferError as err:
        raise InferError(f'{args.model}: {err}') from None
    for stale in prepare_output_folder(args.output, outputs):
        print(f'basicsr infer: removed {stale}, left by an interrupted run', file=sys.stderr)
    why = '' if restorer.precision_reason == 'set in the options' else f', {restorer.precision_reason}'
    print(f'{weights.describe(spec)} from {args.model} on {restorer.device} ({restorer.precision}{why}), '
          f'colour {restorer.color}, {len(inputs)} image(s)', file=sys.stderr)
    failed = 0
    bar = tqdm(list(zip(inputs, outputs)), unit='image', dynamic_ncols=True, file=sys.stderr)
    for i, (src, dst) in enumerate(bar):
        start = time.perf_counter()
        stop = False
        try:
            if os.path.isdir(dst):
                raise InferError(f'{dst}: is a folder; not replaced')
            if not args.overwrite and os.path.lexists(dst):     # spares the work; the rename decides
                raise fileio.FileExistsWriteError(f'{dst} exists (written by another process meanwhile?); '
                                                  'this one was not written')
            img, dtype, alpha = image_io.read_image(src, args.max_pixels or None)
            out = restorer.restore(img)
            if alpha is not None:
                alpha = image_io.resize(alpha, restorer.out_scale)
            written = image_io.write_image(dst, out, dtype, alpha, overwrite=args.overwrite)
        except fileio.FileExistsWriteError as err:
            message = str(err)
        except fileio.WriteError as err:
            message, stop = _write_failure(err, dst)
        except (image_io.ImageError, InferError, ValueError) as err:
            message = str(err) if str(src) in str(err) or str(dst) in str(err) else f'{src}: {err}'
        except (MemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            message = f'{src}: out of memory (a smaller --tile, or --max-pixels to refuse such images)'
        else:
            secs = time.perf_counter() - start
            bar.set_postfix_str(f'{os.path.basename(src)} {secs:.2f} s')
            bar.write(f'{src} -> {dst} ({out.shape[1]}x{out.shape[0]}, {written.itemsize * 8}-bit, {secs:.2f} s)',
                      file=sys.stderr)
            continue
        failed += 1
        left = len(inputs) - i - 1
        if stop and left:
            message += f'; stopped, {left} more image(s) not written'
        bar.write(f'basicsr infer: error: {message}', file=sys.stderr)
        if stop:
            break
    bar.close()
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None, args: Optional[argparse.Namespace] = None) -> int:
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
