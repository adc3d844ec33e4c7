#!/usr/bin/env python
"""Convert an official NLRN TensorFlow checkpoint into a BasicSR ``net_g.pth`` for ``NLRN()``.

    python scripts/convert_nlrn_tf.py --checkpoint PREFIX --output net_g.pth

The mapping lives in ``nl_plugin.convert.nlrn_tf`` (weights copied one-to-one: ``NLRN()`` works at
the official 0..255 scale inside). Reading the checkpoint needs TensorFlow: ``pip install -e .[convert]``.
"""
import sys

from nl_plugin.convert.nlrn_tf import main

if __name__ == '__main__':
    sys.exit(main())
