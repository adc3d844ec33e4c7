#!/usr/bin/env python
"""Speed and memory of the non-local ops and the full networks: see :mod:`nl_plugin.benchmark.runner`.

    python scripts/benchmark.py [--quick] [--device cpu|cuda] [--json PATH] [--only SUBSTR ...]
"""
from nl_plugin.benchmark.runner import main

if __name__ == '__main__':
    main()
