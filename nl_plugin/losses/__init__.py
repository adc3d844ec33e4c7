"""Losses registered in BasicSR's ``LOSS_REGISTRY`` (every ``*_loss.py`` here)."""
from nl_plugin.utils import import_submodules

_loss_modules = import_submodules(__name__, __file__, '_loss')
