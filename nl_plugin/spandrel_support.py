"""NLRN, N3Net and DnCNN for spandrel (the model loader behind chaiNNer), registered at run time.

    import spandrel
    from nl_plugin.spandrel_support import register
    register()                                            # into spandrel.MAIN_REGISTRY
    model = spandrel.ModelLoader().load_from_file('net_g_latest.pth')   # or .safetensors
    restored = model(image)                               # (1, C, H, W) in [0, 1]

spandrel keeps only a file's tensors, so the network is read back from their keys and shapes
(:mod:`nl_plugin.arch_detect`); options that leave no trace in the weights take their defaults,
except that NLRN runs in the window scope (every pixel attends to the 45x45 window around it, one
memory-bounded pass over the whole image; the official global scope needs the image in 45x45 tiles).
A file is claimed only if the rebuilt network has exactly its keys and shapes, so these entries are
checked before spandrel's own (whose DnCNN-like ``Compact`` detection would otherwise claim DnCNN).
Needs the ``spandrel`` extra: ``pip install nl_plugin[spandrel]``.
"""
import spandrel
from spandrel import Architecture, ArchSupport, ImageModelDescriptor, ModelTiling, SizeRequirements

from nl_plugin.arch_detect import detect_arch

_PREFIX = 'nl_plugin.'


def _unwrap(state_dict):
    """The inference weights of a training checkpoint in safetensors that holds several state dicts
    (keys prefixed by BasicSR's parameter key, see :mod:`nl_plugin.weights`): ``params_ema``, else ``params``."""
    for key in ('params_ema', 'params'):
        inner = {k[len(key) + 1:]: v for k, v in state_dict.items() if k.startswith(key + '.')}
        if inner and all(k.startswith(('params.', 'params_ema.')) for k in state_dict):
            return inner
    return state_dict


def _spec_of(state_dict, arch_type):
    spec = detect_arch(state_dict)
    return spec if spec is not None and spec['type'] == arch_type else None


class _NLPluginArch(Architecture):
    """One nl_plugin architecture: detection by exact keys/shapes, hyperparameters from the shapes."""

    arch_type = ''
    keys = ()             # keys every file of this architecture has (cheap first test)
    tiling = ModelTiling.SUPPORTED

    def __init__(self):
        super().__init__(id=_PREFIX + self.arch_type, name=self.arch_type, detect=self._detect)

    def _detect(self, state_dict):
        state_dict = _unwrap(state_dict)
        return all(k in state_dict for k in self.keys) and _spec_of(state_dict, self.arch_type) is not None

    def spec(self, state_dict):
        return _spec_of(state_dict, self.arch_type)

    def load(self, state_dict):
        from nl_plugin.weights import build_network
        state_dict = _unwrap(state_dict)
        spec = self.spec(state_dict)
        kwargs = {k: v for k, v in spec.items() if k != 'type'}
        model = build_network(spec, where='spandrel')
        tags = [f'{k}={v}' for k, v in kwargs.items() if k in ('num_feat', 'num_steps', 'depth', 'num_stages', 'k')]
        return ImageModelDescriptor(
            model, state_dict, architecture=self, purpose='Restoration', tags=tags,
            supports_half=False, supports_bfloat16=False, scale=1,
            input_channels=kwargs.get('num_in_ch', 1), output_channels=kwargs.get('num_out_ch', 1),
            size_requirements=SizeRequirements(), tiling=self.tiling)


class NLRNArch(_NLPluginArch):
    arch_type = 'NLRN'
    keys = ('bn_first.running_mean', 'conv_first.weight', 'bns.0.0.weight', 'nonlocal_blocks.0.g.weight')
    tiling = ModelTiling.DISCOURAGED   # the window attention sees the whole image in one pass

    def spec(self, state_dict):
        spec = super().spec(state_dict)
        return dict(spec, nl_scope='window') if spec else spec


class N3NetArch(_NLPluginArch):
    arch_type = 'N3Net'
    keys = ('stages.0.conv_first.weight', 'stages.0.conv_last.weight')

    def spec(self, state_dict):
        spec = super().spec(state_dict)
        if spec and spec.get('num_noise_ch'):
            return None    # noise-map inputs: spandrel passes the image alone
        return spec


class DnCNNArch(_NLPluginArch):
    arch_type = 'DnCNN'
    keys = ('conv_first.weight', 'conv_last.weight')


def register(registry=None):
    """Add NLRN, N3Net and DnCNN support to spandrel's registry (again: no-op).

    Args:
        registry (spandrel.ArchRegistry, optional): Default: ``spandrel.MAIN_REGISTRY``.

    Returns:
        list[spandrel.ArchSupport]: The entries added by this call.
    """
    registry = spandrel.MAIN_REGISTRY if registry is None else registry
    others = tuple(a.architecture.id for a in registry.architectures() if not a.architecture.id.startswith(_PREFIX))
    entries = [ArchSupport.from_architecture(cls(), before=others) for cls in (NLRNArch, N3NetArch, DnCNNArch)]
    return registry.add(*entries, ignore_duplicates=True)


__all__ = ['register', 'NLRNArch', 'N3NetArch', 'DnCNNArch']
