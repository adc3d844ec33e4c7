"""Convert weight files between BasicSR's ``.pth`` layout and ``.safetensors``, keeping the architecture.

    python scripts/convert_weights.py net_g_latest.pth net_g.safetensors
    python scripts/convert_weights.py net_g.safetensors net_g.pth
    python scripts/convert_weights.py official.pth nlrn.safetensors --arch NLRN --arch-opt num_steps=12
    python scripts/convert_weights.py ckpt.pth deploy.safetensors --param-key params_ema   # one state dict

The output format follows the output's extension. The ``arch`` entry (registry name + constructor
arguments; in a safetensors file a JSON string in ``__metadata__``) is copied, or taken from
``--arch``/``--arch-opt``, or read back from the tensors' keys and shapes; the file is read and checked
as ``basicsr infer`` reads it (:mod:`nl_plugin.weights`: no code, no NaN/Inf, an allowed ``arch``, every
state dict compared with the network on the ``meta`` device) before anything is written. Every state
dict of the input is kept unless ``--param-key`` picks one. An existing output is never replaced without
``--overwrite``.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping

from nl_plugin import weights
from nl_plugin.fileio import WriteError, atomic_write_bytes
from nl_plugin.utils import key_value_arg


def convert(src: str, dst: str, arch_type: str | None = None, arch_opt: Mapping | None = None,
            param_key: str | None = None, overwrite: bool = False,
            write: Callable[[str, bytes], object] | None = None) -> tuple[dict, list[str]]:
    """Read ``src``, check it against its network, write ``dst`` (format from the extension).

    Returns:
        tuple[dict, list[str]]: the stored arch spec and the parameter keys written.

    Raises:
        WeightsError: One line naming the file (also for a ``.safetensors`` output without the package).
        WriteError: The output cannot be written (it is written to a temporary file and renamed into place).
    """
    if os.path.exists(dst) and not overwrite:
        raise weights.WeightsError(f'{dst} exists; use --overwrite to replace it')
    dicts, arch, pipeline = weights.read_all(src)
    if param_key is not None:
        if param_key not in dicts:
            raise weights.WeightsError(f'{src}: no parameter key {param_key!r}; the file has {sorted(dicts)}')
        dicts = {param_key: dicts[param_key]}
    loaded = weights.Weights(dicts.get('params_ema', next(iter(dicts.values()))), arch, pipeline, None, src)
    spec, source = weights.resolve_arch(loaded, arch_type, dict(arch_opt or {}))
    weights.check_fits(spec, dicts, src)
    if source == 'detected':
        print(f'{src} carries no architecture; stored the one its tensors fit: {weights.describe(spec)}')
    weights.save_weights(dicts, dst, arch=spec, pipeline=pipeline, write=write or atomic_write_bytes)
    return spec, list(dicts)


def main(argv: list[str] | None = None) -> int:
    """Command line of ``scripts/convert_weights.py``; errors are one line, exit 2."""
    parser = argparse.ArgumentParser(prog='convert_weights.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('input', help='.pth or .safetensors')
    parser.add_argument('output', help='.pth or .safetensors (the format follows the extension)')
    parser.add_argument('--arch', help='architecture for files that carry none (or to replace it)')
    parser.add_argument('--arch-opt', type=key_value_arg, action='append', default=[], metavar='KEY=VALUE',
                        help='constructor argument to store (YAML value); repeatable')
    parser.add_argument('--param-key', help='keep only this state dict (e.g. params_ema)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
    args = parser.parse_args(argv)
    try:
        spec, keys = convert(args.input, args.output, args.arch, args.arch_opt, args.param_key, args.overwrite)
    except (weights.WeightsError, WriteError) as err:
        print(f'convert_weights: error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {args.output}: {weights.describe(spec)}, {", ".join(keys)}')
    return 0


__all__ = ['convert', 'main']
