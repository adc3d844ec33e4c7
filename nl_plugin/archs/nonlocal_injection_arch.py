"""``NonLocalInjection``: any BasicSR architecture with non-local blocks inserted after named submodules.

YAML::

    network_g:
      type: NonLocalInjection
      base: {type: EDSR, num_in_ch: 3, num_out_ch: 3, num_feat: 64, num_block: 16, upscale: 2}
      base_pretrained: ~          # a trained base's net_g_*.pth (keys without 'base.')
      blocks:
        - {after: body.7, type: N3Block, k: 7}
        - {after: body.15, type: WindowedNonLocalBlock, nl_scope: window, window_size: 15}

Every block entry names the submodule (``after``, as in ``base.named_modules()``) whose output the
block replaces by ``block(output)``, and the block's registered ``type``; all other keys go to the
block's constructor unchanged. Channel arguments left out (``num_in_ch`` or else ``num_feat``, and
``num_out_ch``) are read from the base at the insertion point.
"""
import difflib
import inspect
import os
import threading

import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from nl_plugin import weights
from nl_plugin.config_checks import check_kwargs

# Wrappers whose forward is running, per thread (DataParallel runs its replicas in threads): an insertion
# hook finds its blocks in the wrapper that is running, so replicas and deep copies use their own blocks.
_RUNNING = threading.local()


class _InsertionHook:
    """Forward hook on a base submodule: its output goes through the wrapper's inserted block ``index``.

    It holds no module (a deep copy or a DataParallel replica of the base keeps working); outside the
    wrapper's forward (``net.base(x)``) it leaves the output as it is.
    """

    def __init__(self, key, index):
        self.key, self.index = key, index

    def __call__(self, module, args, output):
        for net in reversed(getattr(_RUNNING, 'stack', ())):
            if net.injection_key == self.key:
                return net.blocks[self.index](output)
        return None


#: Largest side of the input on which a block's start as the identity is checked at construction: the check
#: is about the block's initial weights, which any size shows, and a window or global attention over a large
#: insertion shape (a big ``probe_size``, after an upsampler) would cost far more than the check is worth.
IDENTITY_CHECK_SIDE = 16


def _on_meta(module, spec, where):
    """``module`` itself if it lives on ``meta``, else the same architecture built there from ``spec`` (shapes
    only: a probe forward at any size allocates nothing); ``module`` where the architecture does not build on
    ``meta`` (then the probe runs for real, as a network the user names may need)."""
    p = next(module.parameters(), None)
    if p is None or p.is_meta:
        return module
    try:
        return weights.build_network(spec, where=where, device='meta').to(p.dtype)
    except Exception:  # noqa: BLE001  (any base: what fails on meta runs as it is)
        return module


class InsertedBlock(nn.Module):
    """A block inserted into a base network, followed by its channel adapter if it has one.

    Args:
        after (str): The base submodule whose output the block takes.
        block (nn.Module): (B, C, H, W) -> (B, C', H, W).
        adapter (nn.Module, optional): (B, C', H, W) -> (B, C, H, W), when C' != C.
    """

    def __init__(self, after, block, adapter=None):
        super().__init__()
        self.after, self.block, self.adapter = after, block, adapter

    def forward(self, x):
        if not torch.is_tensor(x) or x.dim() != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise TypeError(f'block after {self.after!r}: expects a (B, C, H, W) tensor from that submodule, '
                            f'got {shape}')
        out = self.block(x)
        return out if self.adapter is None else self.adapter(out)


def identity_adapter(in_ch, out_ch):
    """1x1 conv ``in_ch -> out_ch`` initialised to keep the first ``out_ch`` channels and drop the rest.

    N3Block's output ``[x, z_1 - x, ..., z_k - x]`` starts with its input, so after this adapter the
    block is exactly the identity at initialisation; training opens the neighbour channels.
    """
    conv = nn.Conv2d(in_ch, out_ch, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :out_ch, 0, 0].copy_(torch.eye(out_ch))
        conv.bias.zero_()
    return conv


def nearby_names(names, name, limit=8):
    """Did-you-mean matches for ``name`` and the submodules next to its deepest existing parent."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    parts = name.split('.')
    near = []
    for depth in range(len(parts) - 1, -1, -1):
        prefix = '.'.join(parts[:depth])
        near = [n for n in names if n.count('.') == depth and (not depth or n.startswith(prefix + '.'))]
        if near:
            break
    if len(near) > limit:
        near = near[:limit // 2] + ['...'] + near[-(limit // 2):]
    return close, near


def load_base_weights(base, path, param_key='params'):
    """Load a trained base network's weight file (``.pth`` or ``.safetensors``, BasicSR layout or a bare state
    dict) strictly, through :func:`nl_plugin.weights.read_state_dict`.

    Args:
        base (nn.Module): The base network.
        path (str): Weight file.
        param_key (str | None): Key of the state dict in the file (BasicSR: 'params' or 'params_ema');
            as in BasicSR's ``load_network``, 'params' is used when the key is absent.

    Raises:
        WeightsError: One line naming ``network_g:base_pretrained`` and the file.
    """
    where = 'network_g:base_pretrained'
    if next(base.parameters()).is_meta:     # option validation builds on the meta device: only check the file
        if not os.path.isfile(path):
            raise weights.WeightsError(f'{where}: {path}: no such weight file')
        return
    state, _ = weights.read_state_dict(path, param_key, where=where)
    if any(k.startswith('base.') for k in state) and not any(k.startswith('base.') for k in base.state_dict()):
        raise weights.WeightsError(f"{where}: {path!r} holds a NonLocalInjection network (keys 'base.*'); "
                                   'load it with path:pretrain_network_g instead')
    report = weights.mismatch_report(base, state)
    if report:
        raise weights.WeightsError(f'{where}: {path!r} does not fit {type(base).__name__}: {report}')
    base.load_state_dict(state, strict=True)


@ARCH_REGISTRY.register()
class NonLocalInjection(nn.Module):
    """A BasicSR network (``base``) with blocks inserted after named submodules.

    The base keeps its parameter names under ``base.`` and the blocks live under ``blocks.<i>.block``
    (adapters: ``blocks.<i>.adapter``), so checkpoints of the wrapped network load with BasicSR's
    ``path:pretrain_network_g``, and a trained base loads with ``base_pretrained``.

    Channels: a small forward of the base (``probe_size`` square input, no autograd, eval mode) gives the
    shape at each insertion point (falling back to the last conv's ``out_channels`` of that submodule);
    channel arguments a block entry leaves out are filled with it. A block whose output has more channels
    than its input (N3Block: ``C (k + 1)``) is followed by :func:`identity_adapter` (1x1 conv back to C).

    At initialisation the wrapped network computes exactly what the base computes when every block starts
    as the identity (WindowedNonLocalBlock with its zero-init ``g``; N3Block with the identity adapter); a
    warning is logged when a block does not. ``net.base(x)`` runs the base without the blocks.

    Args:
        base (dict): The base architecture: ``type`` (any ``ARCH_REGISTRY`` name) and its arguments.
        blocks (list[dict]): One entry per inserted block: ``after`` (submodule name), ``type`` and the
            block's own arguments. Default: none.
        base_pretrained (str, optional): Checkpoint of a trained base to load into ``base``. Default: None.
        base_param_key (str): State-dict key in that checkpoint ('params' or 'params_ema'). Default: 'params'.
        probe_size (int): Side of the probe input (a multiple of what the base needs). Default: 32.
    """

    def __init__(self, base: dict, blocks: list = (), base_pretrained: str = None, base_param_key: str = 'params',
                 probe_size: int = 32):
        super().__init__()
        if not isinstance(base, dict) or 'type' not in base:
            raise KeyError(f'network_g:base must be a mapping with a "type" key, got {base!r}')
        self.base = weights.build_network(base, where='network_g:base')
        if base_pretrained:
            load_base_weights(self.base, base_pretrained, base_param_key)
        specs = [self._check_spec(i, spec) for i, spec in enumerate(blocks or [])]
        self.injection_key = object()     # a deep copy gets its own key, and its hooks the same new key
        shaper = _on_meta(self.base, base, 'network_g:base')
        probe = self._probe_input(shaper, base, probe_size)
        shapes, out_shape = self._probe(shaper, probe, [s['after'] for s in specs])
        self.upscale = out_shape[-1] // probe.shape[-1] if out_shape else int(getattr(self.base, 'upscale', 1) or 1)
        self.blocks = nn.ModuleList()
        modules = dict(self.base.named_modules())
        for i, spec in enumerate(specs):
            channels = self._channels_at(i, spec['after'], shapes.get(spec['after']), modules[spec['after']])
            self.blocks.append(self._build_block(i, spec, channels, shapes.get(spec['after'])))
            modules[spec['after']].register_forward_hook(_InsertionHook(self.injection_key, i))
        if out_shape and specs:
            self._warn_unless_identity([shapes[s['after']] for s in specs])

    # ------------------------------------------------------------------ construction
    def _check_spec(self, i, spec):
        where = f'network_g:blocks[{i}]'
        if not isinstance(spec, dict) or 'after' not in spec or 'type' not in spec:
            raise KeyError(f'{where}: needs the keys "after" (submodule name) and "type", got {spec!r}')
        names = [n for n, _ in self.base.named_modules() if n]
        if spec['after'] not in names:
            close, near = nearby_names(names, str(spec['after']))
            hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
            raise KeyError(f'{where}: after: {type(self.base).__name__} has no submodule {spec["after"]!r}.{hint} '
                           f'Submodules there: {", ".join(near)}')
        return dict(spec)

    @staticmethod
    def _probe_input(base, base_opt, size):
        p = next(base.parameters(), None)
        in_ch = base_opt.get('num_in_ch')
        if in_ch is None:
            first = next((m for m in base.modules() if isinstance(m, nn.Conv2d)), None)
            in_ch = first.in_channels if first is not None else 3
        return torch.zeros(1, int(in_ch), size, size, device=p.device if p is not None else None,
                           dtype=p.dtype if p is not None else None)

    @staticmethod
    @torch.no_grad()
    def _probe(base, x, names):
        """Output shapes of the named submodules in one forward of ``base`` (a meta copy where it builds there,
        so only shapes are computed): ({name: shape}, out shape)."""
        shapes, calls, handles = {}, {}, []
        modules = dict(base.named_modules())
        for name in set(names):
            def record(module, args, output, name=name):
                calls[name] = calls.get(name, 0) + 1
                shapes[name] = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
            handles.append(modules[name].register_forward_hook(record))
        modes = {m: m.training for m in base.modules()}
        base.eval()
        try:
            out = base(x)
            out_shape = tuple(out.shape) if torch.is_tensor(out) else None
        except Exception as err:   # any base: fall back to the modules' channel counts
            get_root_logger().warning(f'NonLocalInjection: probe forward of the base failed ({err}); '
                                      'channels are read from the submodules instead')
            return {}, None
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        for i, name in enumerate(names):
            if calls.get(name, 0) != 1:
                raise ValueError(f'network_g:blocks[{i}]: after: submodule {name!r} runs {calls.get(name, 0)} times in '
                                 'one forward of the base; choose a submodule that runs exactly once')
        return shapes, out_shape

    def _channels_at(self, i, name, shape, module):
        if shape is not None:
            if isinstance(shape, str) or len(shape) != 4:
                what = f'is a {shape}' if isinstance(shape, str) else f'has shape {shape}'
                raise ValueError(f'network_g:blocks[{i}]: after: the output of {name!r} {what}, not (B, C, H, W)')
            return shape[1]
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            return convs[-1].out_channels
        for attr in ('out_channels', 'num_features', 'num_feat'):
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
        raise ValueError(f'network_g:blocks[{i}]: cannot tell the channels after {name!r}; '
                         'give num_in_ch / num_feat in the block entry')

    def _build_block(self, i, spec, channels, shape):
        where = f'network_g:blocks[{i}]'
        opt = {k: v for k, v in spec.items() if k not in ('after', 'type')}
        cls = ARCH_REGISTRY.get(spec['type'])
        check_kwargs(cls, opt, where=f'{where} ({cls.__name__})')    # before the channel defaults are added
        params = inspect.signature(cls).parameters
        in_key = next((k for k in ('num_in_ch', 'num_feat') if k in params), None)
        if in_key is not None:
            given = opt.setdefault(in_key, channels)
            if given != channels:
                raise ValueError(f'{where}: {in_key}={given} but the output of {spec["after"]!r} has '
                                 f'{channels} channels')
        if 'num_out_ch' in params:
            opt.setdefault('num_out_ch', channels)
        block = weights.build_network(dict(opt, type=spec['type']), where=where)
        out_ch = self._block_out_channels(block, channels, shape, _on_meta(block, dict(opt, type=spec['type']), where))
        adapter = None
        if out_ch != channels:
            if out_ch < channels:
                raise ValueError(f'{where}: {cls.__name__} gives {out_ch} channels, fewer than its {channels} inputs')
            adapter = identity_adapter(out_ch, channels)
        return InsertedBlock(spec['after'], block, adapter)

    def _block_out_channels(self, block, channels, shape, shaper):
        """The block's output channels: its ``num_out_ch``, else one forward of ``shaper`` (its meta copy) at the
        insertion shape, and of the block itself only where the meta copy cannot run."""
        out_ch = getattr(block, 'num_out_ch', None)
        if isinstance(out_ch, int):
            return out_ch
        if shape is None:
            return channels
        if shaper is not block:
            try:
                return self._forward_channels(shaper, shape)
            except Exception:  # noqa: BLE001  (a block that does not run on meta runs as it is)
                pass
        return self._forward_channels(block, shape)

    @torch.no_grad()
    def _forward_channels(self, block, shape):
        p = next(block.parameters(), None)
        device = p.device if p is not None else next(self.base.parameters()).device
        was = {m: m.training for m in block.modules()}
        block.eval()
        try:
            return block(torch.zeros(shape, device=device, dtype=p.dtype if p is not None else None)).shape[1]
        finally:
            for m, mode in was.items():
                m.training = mode

    @torch.no_grad()
    def _warn_unless_identity(self, shapes):
        """Each block on a random input of its insertion point's shape (sides cut to :data:`IDENTITY_CHECK_SIDE`)
        gives that input back: then the network computes what the base computes. Skipped on ``meta``."""
        p = next(self.blocks.parameters(), None)
        if p is None or p.is_meta:
            return
        same = True
        for block, shape in zip(self.blocks, shapes):
            shape = (*shape[:2], *(min(side, IDENTITY_CHECK_SIDE) for side in shape[2:]))
            modes = {m: m.training for m in block.modules()}
            block.eval()
            try:
                x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(p)
                same = same and torch.equal(block(x), x)
            finally:
                for m, mode in modes.items():
                    m.training = mode
        if not same:
            get_root_logger().warning('NonLocalInjection: the inserted blocks do not start as the identity; the '
                                      'network does not reproduce the base at initialisation')

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        """Run the base with the inserted blocks: same input and output as the base."""
        stack = _RUNNING.__dict__.setdefault('stack', [])
        stack.append(self)
        try:
            return self.base(x)
        finally:
            stack.pop()


__all__ = ['NonLocalInjection', 'InsertedBlock', 'identity_adapter', 'load_base_weights']
