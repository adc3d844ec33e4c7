#!/usr/bin/env python
"""Draw what a trained network's non-local modules attend to, over an image (PNG with colour bars).

The command line of ``nl_plugin.analysis.commands.visualize_attention``;
``python scripts/visualize_attention.py -h`` shows its usage.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nl_plugin.analysis.commands import visualize_attention  # noqa: E402

if __name__ == '__main__':
    visualize_attention()
