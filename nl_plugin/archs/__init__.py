"""Architectures and blocks, registered in BasicSR's ``ARCH_REGISTRY`` and mmengine's ``MODELS``.

Every ``*_arch.py`` here is imported; classes decorated with ``@ARCH_REGISTRY.register()`` become
usable as ``network_g: {type: Name, ...}`` and as ``mmengine.registry.MODELS.build(dict(type=Name))``.
"""
from basicsr.utils.registry import ARCH_REGISTRY

from nl_plugin.utils import import_submodules

_arch_modules = import_submodules(__name__, __file__, '_arch')


def _mirror_into_mmengine():
    from mmengine.registry import MODELS
    ours = {m.__name__ for m in _arch_modules}
    for name, obj in ARCH_REGISTRY:
        if getattr(obj, '__module__', None) in ours:
            MODELS.register_module(name=name, module=obj, force=True)


_mirror_into_mmengine()
