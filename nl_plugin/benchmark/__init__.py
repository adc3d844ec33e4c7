"""Speed and memory benchmark of the ops and networks (``scripts/benchmark.py`` is its command line)."""
