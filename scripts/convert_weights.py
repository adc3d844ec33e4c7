"""Convert weight files between BasicSR's ``.pth`` layout and ``.safetensors``, keeping the architecture.

    python scripts/convert_weights.py net_g_latest.pth net_g.safetensors
    python scripts/convert_weights.py net_g.safetensors net_g.pth
    python scripts/convert_weights.py official.pth nlrn.safetensors --arch NLRN --arch-opt num_steps=12

The command line of :mod:`nl_plugin.convert.formats` (see there).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nl_plugin.convert.formats import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
