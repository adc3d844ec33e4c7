"""Datasets registered in BasicSR's ``DATASET_REGISTRY`` (every ``*_dataset.py`` here)."""
from nl_plugin.utils import import_submodules

_dataset_modules = import_submodules(__name__, __file__, '_dataset')
