#!/usr/bin/env python
"""Convert an official N3Net denoising checkpoint into a state dict for ``N3Net()`` (default args).

    python scripts/convert_n3net_official.py --checkpoint 051_ckpt.t7 --output net_g.pth

The output ``{'params': state_dict}`` is BasicSR's ``path.pretrain_network_g`` format and loads strictly.
The key mapping is documented in :mod:`nl_plugin.convert.n3net_official`.
"""
import argparse

from nl_plugin.convert.n3net_official import convert_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help='official 051_ckpt.t7 (or similar)')
    parser.add_argument('--output', required=True, help='where to write {"params": state_dict}')
    parser.add_argument('--no-verify', action='store_true', help='skip the strict load into N3Net()')
    args = parser.parse_args(argv)
    params = convert_file(args.checkpoint, args.output, verify=not args.no_verify)
    print(f'wrote {len(params)} tensors to {args.output}')


if __name__ == '__main__':
    main()
