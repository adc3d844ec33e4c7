"""``python -m nl_plugin.test -opt X.yml [...]``: same as ``basicsr test``."""
import sys

from nl_plugin.cli import main

if __name__ == '__main__':
    sys.exit(main(['test', *sys.argv[1:]]))
