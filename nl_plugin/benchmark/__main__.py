"""``python -m nl_plugin.benchmark``: the benchmark's command line (also its per-case worker)."""
from .runner import main

main()
