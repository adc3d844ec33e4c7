#!/usr/bin/env python
"""Parameters, multiply-adds, depth and receptive field of every architecture of this project, as one table.

The command line of ``nl_plugin.analysis.commands.model_stats``;
``python scripts/model_stats.py -h`` shows its usage.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nl_plugin.analysis.commands import model_stats  # noqa: E402

if __name__ == '__main__':
    model_stats()
