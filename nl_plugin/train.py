"""``python -m nl_plugin.train -opt X.yml [...]``: same as ``basicsr train``."""
import sys

from nl_plugin.cli import main

if __name__ == '__main__':
    sys.exit(main(['train', *sys.argv[1:]]))
