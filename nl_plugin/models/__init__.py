"""Training models registered in BasicSR's ``MODEL_REGISTRY`` (every ``*_model.py`` here)."""
from nl_plugin.utils import import_submodules

_model_modules = import_submodules(__name__, __file__, '_model')
