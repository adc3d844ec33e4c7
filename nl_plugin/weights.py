"""Weight files that rebuild their network: BasicSR's ``.pth`` layout or ``.safetensors``, with the architecture.

Layout of a ``.pth`` file (what BasicSR's ``load_network`` reads; it ignores the extra keys)::

    {'params': state_dict, ['params_ema': state_dict,]
     'arch': {'type': 'NLRN', 'num_feat': 128, ...},        # registry name + constructor arguments
     'pipeline': {'residual_learning': False}}              # how RestorationModel called the network

A ``.safetensors`` file holds the tensors of one state dict under their own names, and the same
information as JSON strings in its header (``__metadata__``: ``arch``, ``pipeline``). A training
checkpoint with an EMA copy holds both: names are then prefixed by BasicSR's parameter key
(``params.conv_first.weight``, ``params_ema.conv_first.weight``) and ``__metadata__['param_keys']``
lists the keys.

Reading is safe for both formats: ``torch.load(weights_only=True)`` (no code runs) or safetensors.
Every file is written by :func:`save_weights`, which hands the bytes to a ``write(path, data)``
callable (default: a plain file write) so that the caller chooses how they reach the disk.
"""
import io
import json
import os
import pickle
from collections import namedtuple

import torch

ARCH_KEY = 'arch'
PIPELINE_KEY = 'pipeline'
PARAM_KEYS = ('params', 'params_ema')
FORMATS = {'pth': '.pth', 'safetensors': '.safetensors'}

Weights = namedtuple('Weights', 'state_dict arch pipeline param_key path')
Weights.__doc__ = """A read weight file: the chosen state dict, the architecture spec (or None), the pipeline
options (dict), the parameter key it came from and the file's path."""


class WeightsError(ValueError):
    """A weight file that cannot be read or does not fit the network (one-line message naming the file)."""


def _plain(obj):
    """JSON-compatible copy of an option value (YAML's OrderedDicts and tuples become dicts and lists)."""
    return json.loads(json.dumps(obj))


def check_save_format(value, where='path:save_format'):
    """Return the file extension of a ``save_format`` option (None means ``pth``); error naming the key."""
    value = 'pth' if value is None else value
    if value not in FORMATS:
        raise ValueError(f'{where}: must be one of {sorted(FORMATS)}, got {value!r}')
    return FORMATS[value]


def format_of(path):
    """``'safetensors'`` for a ``.safetensors`` path, else ``'pth'``."""
    return 'safetensors' if str(path).lower().endswith('.safetensors') else 'pth'


def arch_from_opt(net_opt):
    """The ``arch`` spec stored with the weights: a network option dict (``type`` + constructor keys).

    Args:
        net_opt (dict): E.g. the ``network_g`` section of a BasicSR option file.

    Returns:
        dict: ``{'type': ..., **kwargs}`` as plain JSON-compatible values.
    """
    spec = _plain(dict(net_opt))
    if 'type' not in spec:
        raise KeyError(f'network options lack "type": {spec}')
    return spec


def pipeline_from_opt(opt):
    """How RestorationModel calls the network, from a BasicSR option dict: ``residual_learning`` and, where
    a dataset names it, the colour mode the network was trained on (``gray``, ``y`` or ``rgb``)."""
    out = {'residual_learning': bool(opt.get('residual_learning', False))}
    for ds in (opt.get('datasets') or {}).values():
        color = 'y' if ds.get('y_only') else ds.get('color')
        if color in ('gray', 'y', 'rgb'):
            out['color'] = color
            break
    return out


def _write_file(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def _param_dicts(params):
    """``{param_key: state_dict}`` from a state dict or from such a mapping (BasicSR's keys)."""
    if params and all(isinstance(v, dict) for v in params.values()):
        return {k: dict(v) for k, v in params.items()}
    return {'params': dict(params)}


def _cpu_tensors(state_dict):
    out = {}
    for k, v in state_dict.items():
        k = k[len('module.'):] if k.startswith('module.') else k
        out[k] = v.detach().to('cpu').contiguous().clone()   # safetensors refuses shared storage
    return out


def to_bytes(params, arch=None, pipeline=None, fmt='pth'):
    """Serialize weights (see :func:`save_weights`) to the bytes of a ``pth`` or ``safetensors`` file."""
    dicts = {k: _cpu_tensors(sd) for k, sd in _param_dicts(params).items()}
    if fmt == 'pth':
        obj = dict(dicts)
        if arch is not None:
            obj[ARCH_KEY] = _plain(arch)
        if pipeline:
            obj[PIPELINE_KEY] = _plain(pipeline)
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    if fmt != 'safetensors':
        raise ValueError(f'weights format must be one of {sorted(FORMATS)}, got {fmt!r}')
    from safetensors.torch import save
    meta = {'format': 'pt'}
    if arch is not None:
        meta[ARCH_KEY] = json.dumps(_plain(arch))
    if pipeline:
        meta[PIPELINE_KEY] = json.dumps(_plain(pipeline))
    if len(dicts) == 1:
        meta['param_key'] = next(iter(dicts))
        tensors = next(iter(dicts.values()))
    else:
        meta['param_keys'] = json.dumps(list(dicts))
        tensors = {f'{pk}.{k}': v for pk, sd in dicts.items() for k, v in sd.items()}
    return save(tensors, metadata=meta)


def save_weights(params, path, arch=None, pipeline=None, fmt=None, write=None):
    """Write a weight file that rebuilds its network (the one function every writer of weights calls).

    Args:
        params (dict): A state dict, or ``{param_key: state_dict}`` (BasicSR: ``params``, ``params_ema``).
        path (str): Output file.
        arch (dict, optional): ``{'type': registry name, **constructor kwargs}``.
        pipeline (dict, optional): How the network is called, e.g. ``{'residual_learning': True}``.
        fmt (str, optional): ``'pth'`` or ``'safetensors'``. Default: from the extension of ``path``.
        write (callable, optional): ``write(path, data: bytes)``. Default: a plain file write.

    Returns:
        str: ``path``.
    """
    data = to_bytes(params, arch, pipeline, fmt or format_of(path))
    (write or _write_file)(str(path), data)
    return str(path)


def safe_torch_load(path, map_location='cpu'):
    """``torch.load(path, weights_only=True)``, passed explicitly so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
    cannot turn it off; a refused or unreadable file is a :class:`WeightsError` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln for ln in lines if 'unsupported' in ln.lower()), lines[0] if lines else 'refused')
        raise WeightsError(f'{path!r} is not a plain weights file and is refused (it holds Python objects that '
                           f'torch.load(weights_only=True) does not unpickle: {why})') from None
    except Exception as err:  # noqa: BLE001  (zip/EOF errors of a torn or foreign file come in many types)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f'{path}: cannot be read as a PyTorch weight file ({first})') from None


def _read_pth(path):
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise WeightsError(f'{path}: holds a {type(obj).__name__}, not a state dict')
    dicts = {k: v for k, v in obj.items() if k in PARAM_KEYS or (isinstance(v, dict) and k.startswith('params'))}
    if not dicts:
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if not tensors:
            raise WeightsError(f'{path}: no state dict found (top-level keys: {sorted(obj)[:10]})')
        dicts = {'params': tensors}
    return dicts, obj.get(ARCH_KEY), obj.get(PIPELINE_KEY) or {}


def _read_safetensors(path):
    try:
        from safetensors import safe_open
    except ImportError:
        raise WeightsError(f'{path}: reading .safetensors needs `pip install safetensors` '
                           '(extra: pip install nl_plugin[safetensors])') from None
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    except Exception as err:  # noqa: BLE001
        raise WeightsError(f'{path}: cannot be read as a safetensors file ({err})') from None
    try:
        arch = json.loads(meta[ARCH_KEY]) if ARCH_KEY in meta else None
        pipeline = json.loads(meta[PIPELINE_KEY]) if PIPELINE_KEY in meta else {}
        keys = json.loads(meta['param_keys']) if 'param_keys' in meta else None
    except json.JSONDecodeError as err:
        raise WeightsError(f'{path}: bad JSON in the safetensors header ({err})') from None
    if keys:
        dicts = {pk: {k[len(pk) + 1:]: v for k, v in tensors.items() if k.startswith(pk + '.')} for pk in keys}
    else:
        dicts = {meta.get('param_key', 'params'): tensors}
    return dicts, arch, pipeline


def read_all(path):
    """Every state dict of a weight file with its metadata.

    Returns:
        tuple[dict[str, dict], dict | None, dict]: ``{param_key: state_dict}`` (``module.`` prefixes
        removed), the arch spec (None if the file has none) and the pipeline options.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise WeightsError(f'{path}: no such weight file')
    reader = _read_safetensors if format_of(path) == 'safetensors' else _read_pth
    dicts, arch, pipeline = reader(path)
    if arch is not None and not (isinstance(arch, dict) and isinstance(arch.get('type'), str)):
        raise WeightsError(f'{path}: bad "{ARCH_KEY}" entry {arch!r} (expected {{"type": NAME, ...}})')
    dicts = {pk: {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in sd.items()}
             for pk, sd in dicts.items()}
    return dicts, arch, dict(pipeline)


def read_weights(path, param_key=None):
    """Read a weight file of either format.

    Args:
        path (str): ``.pth`` (BasicSR layout or a bare state dict) or ``.safetensors``.
        param_key (str, optional): Which state dict to take. Default: ``params_ema`` when the file has
            one (the weights BasicSR averages for inference), else ``params``.

    Returns:
        Weights: the state dict, arch spec (None if the file has none), pipeline options, parameter
        key and path.
    """
    dicts, arch, pipeline = read_all(path)
    if param_key is None:
        param_key = 'params_ema' if 'params_ema' in dicts else next(iter(dicts))
    if param_key not in dicts:
        raise WeightsError(f'{path}: no parameter key {param_key!r}; the file has {sorted(dicts)}')
    return Weights(dicts[param_key], arch, pipeline, param_key, str(path))


def mismatch_report(net, state_dict, limit=8):
    """One line listing missing, unexpected and wrongly shaped keys of ``state_dict`` for ``net`` ('' if it fits)."""
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f'{k}: file {tuple(state_dict[k].shape)} vs network {tuple(v.shape)}'
              for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatch', shapes)):
        if items:
            more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
            parts.append(f'{label} ({len(items)}): {", ".join(items[:limit])}{more}')
    return '; '.join(parts)


def describe(spec):
    """``NLRN(num_feat=8, num_steps=2)`` for an arch spec."""
    args = ', '.join(f'{k}={v!r}' for k, v in spec.items() if k != 'type')
    return f'{spec["type"]}({args})'


def resolve_arch(weights, arch_type=None, arch_opt=None, detect=True):
    """The arch spec to build: the file's, or ``arch_type`` (+ the file's keys if the type matches), updated
    by ``arch_opt``; if neither is given, detected from the state dict's keys and shapes.

    Returns:
        tuple[dict, str]: the spec and where it came from (``'file'``, ``'option'`` or ``'detected'``).
    """
    spec, source = (dict(weights.arch), 'file') if weights.arch else (None, None)
    if arch_type:
        spec = dict(spec) if spec and spec['type'] == arch_type else {}
        spec['type'], source = arch_type, 'option'
    if spec is None and detect:
        from nl_plugin.arch_detect import detect_arch
        spec, source = detect_arch(weights.state_dict), 'detected'
    if spec is None:
        raise WeightsError(f'{weights.path}: the file carries no architecture and its keys match none known; '
                           'give --arch TYPE [--arch-opt KEY=VALUE ...]')
    spec.update(arch_opt or {})
    return spec, source


def build_network(spec, where=''):
    """Build a registered architecture from an arch spec (unknown type/keys give one-line errors)."""
    from basicsr.archs import build_network as _build

    import nl_plugin  # noqa: F401  (registers the archs and the compat error messages)
    try:
        return _build(dict(spec))
    except (KeyError, TypeError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise WeightsError(f'{where}{": " if where else ""}{msg}') from None


def load_network(path, arch_type=None, arch_opt=None, param_key=None):
    """Rebuild the network stored in a weight file and load its weights strictly.

    Args:
        path (str): Weight file (``.pth`` or ``.safetensors``).
        arch_type (str, optional): Registry name, for files that carry no architecture (or to override it).
        arch_opt (dict, optional): Constructor arguments that override the file's.
        param_key (str, optional): See :func:`read_weights`.

    Returns:
        tuple[torch.nn.Module, dict, Weights]: the network (eval mode), its arch spec and the read file.

    Raises:
        WeightsError: One line naming the file; for weights that do not fit the network it lists the
            missing, unexpected and wrongly shaped keys.
    """
    weights = read_weights(path, param_key)
    spec, _ = resolve_arch(weights, arch_type, arch_opt)
    net = build_network(spec, where=str(path))
    report = mismatch_report(net, weights.state_dict)
    if report:
        raise WeightsError(f'{path} does not fit {describe(spec)}: {report}')
    net.load_state_dict(weights.state_dict, strict=True)
    return net.eval(), spec, weights


__all__ = ['save_weights', 'read_weights', 'read_all', 'load_network', 'build_network', 'resolve_arch', 'arch_from_opt',
           'mismatch_report', 'check_save_format', 'to_bytes', 'Weights', 'WeightsError']
