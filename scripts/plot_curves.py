#!/usr/bin/env python
"""PSNR-vs-iteration and loss curves of a BasicSR training run, as PNG files.

The command line of ``nl_plugin.analysis.commands.plot_curves``;
``python scripts/plot_curves.py -h`` shows its usage.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nl_plugin.analysis.commands import plot_curves  # noqa: E402

if __name__ == '__main__':
    plot_curves()
