"""nl_plugin: NLRN and N3Net for BasicSR.

``import nl_plugin`` first applies the BasicSR compatibility fixes (:mod:`nl_plugin.compat`), then
registers the architectures, blocks, datasets, losses and the training model into BasicSR's
registries (and the architectures into mmengine's ``MODELS``).
"""
from . import compat

compat.apply()

from . import archs, data, losses, models  # noqa: E402,F401  (registration side effects)

__version__ = '0.1.0'
