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

Every weight file the project reads goes through :func:`read_all` (``infer``, ``path:pretrain_network_g``,
resumes, ``base_pretrained``, the analysis scripts, ``convert_weights``), and every network is built by
:func:`build_network`. Reading never runs code: ``torch.load(weights_only=True)`` or safetensors, NaN/Inf
tensors are refused, and a file's ``arch`` entry may only name what :func:`check_file_arch` allows (this
project's networks and blocks, no paths, sane sizes). :func:`load_network` compares the file's tensors with
the network built on the ``meta`` device before any memory is allocated for it.

Every file is written by :func:`save_weights`, which hands the bytes to a ``write(path, data)``
callable (default: a plain file write) so that the caller chooses how they reach the disk.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import pickle
import re
import reprlib
import zipfile
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy

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


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def _short(value: object) -> str:
    """``repr`` of a value a file gave, cut short: messages stay one short line whatever the file holds
    (multi-MB strings, containers nested deeper than ``repr`` can recurse)."""
    return _REPR.repr(value)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` without the ``module.`` prefix that (Distributed)DataParallel adds to every key."""
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}


def _plain(obj):
    """JSON-compatible copy of an option value (YAML's OrderedDicts and tuples become dicts and lists)."""
    return json.loads(json.dumps(obj))


def check_save_format(value: str | None, where: str = 'path:save_format') -> str:
    """Return the file extension of a ``save_format`` option (None means ``pth``); error naming the key."""
    value = 'pth' if value is None else value
    if value not in FORMATS:
        raise ValueError(f'{where}: must be one of {sorted(FORMATS)}, got {value!r}')
    return FORMATS[value]


def format_of(path: str | os.PathLike) -> str:
    """``'safetensors'`` for a ``.safetensors`` path, else ``'pth'``."""
    return 'safetensors' if str(path).lower().endswith('.safetensors') else 'pth'


def arch_from_opt(net_opt: Mapping) -> dict:
    """The ``arch`` spec stored with the weights: a network option dict (``type`` + constructor keys).

    Args:
        net_opt (dict): E.g. the ``network_g`` section of a BasicSR option file.

    Returns:
        dict: ``{'type': ..., **kwargs}`` as plain JSON-compatible values.
    """
    spec = _plain(dict(net_opt))
    if 'type' not in spec:
        raise KeyError(f'network options lack "type": {spec}')
    if spec['type'] == 'NonLocalInjection':   # the file holds the trained base: the start point is not part of it
        spec.pop('base_pretrained', None)
        spec.pop('base_param_key', None)
    return drop_runtime_args(spec)


def _registered(kind: object) -> type | None:
    """The class registered as ``kind`` (BasicSR's ``_basicsr`` suffix rule), None if none; no did-you-mean
    search over what may be a hostile multi-MB name."""
    from basicsr.utils.registry import ARCH_REGISTRY

    import nl_plugin  # noqa: F401  (registers the archs)
    if not isinstance(kind, str):
        return None
    return ARCH_REGISTRY._obj_map.get(kind) or ARCH_REGISTRY._obj_map.get(f'{kind}_basicsr')


def drop_runtime_args(spec: Mapping) -> dict:
    """``spec`` without the arguments its class declares in ``RUNTIME_ARGS`` (``attention_kernel``,
    ``logit_memory_gb``: they describe a machine, not a model), also in a ``NonLocalInjection``'s base and blocks."""
    spec = dict(spec)
    cls = _registered(spec.get('type'))
    for key in getattr(cls, 'RUNTIME_ARGS', ()):
        spec.pop(key, None)
    if cls is not None and cls.__name__ == 'NonLocalInjection':   # one level: a base is no injection network
        def drop(entry):
            if not isinstance(entry, Mapping):
                return entry
            keys = getattr(_registered(entry.get('type')), 'RUNTIME_ARGS', ())
            return {k: v for k, v in entry.items() if k not in keys}
        if 'base' in spec:
            spec['base'] = drop(spec['base'])
        if isinstance(spec.get('blocks'), (list, tuple)):
            spec['blocks'] = [drop(b) for b in spec['blocks']]
    return spec


def pipeline_from_opt(opt: Mapping) -> dict:
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
    # safetensors refuses shared storage: every tensor gets its own
    return {k: v.detach().to('cpu').contiguous().clone() for k, v in strip_module_prefix(state_dict).items()}


def _safetensors_missing(path: str, action: str) -> WeightsError:
    return WeightsError(f'{path}: {action} .safetensors needs the safetensors package: '
                        'pip install nl_plugin[safetensors]')


def to_bytes(params: Mapping, arch: Mapping | None = None, pipeline: Mapping | None = None,
             fmt: str = 'pth', path: str = '') -> bytes:
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
    try:
        from safetensors.torch import save
    except ImportError:
        raise _safetensors_missing(path or 'output', 'writing') from None
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


def save_weights(params: Mapping, path: str | os.PathLike, arch: Mapping | None = None,
                 pipeline: Mapping | None = None, fmt: str | None = None,
                 write: Callable[[str, bytes], object] | None = None) -> str:
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
    data = to_bytes(params, arch, pipeline, fmt or format_of(path), path=str(path))
    (write or _write_file)(str(path), data)
    return str(path)


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = 'cpu') -> object:
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
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic != b'PK\x03\x04' and magic[:1] != b'\x80':   # torch.save writes a zip archive (legacy: a pickle)
        raise WeightsError(f'{path}: cannot be read as a PyTorch weight file (neither a zip archive nor a pickle; '
                           f'starts with {magic!r})')
    if magic == b'PK\x03\x04':
        _check_stored(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise WeightsError(f'{path}: holds a {type(obj).__name__}, not a state dict')
    dicts = {k: v for k, v in obj.items() if isinstance(k, str) and (k in PARAM_KEYS or (isinstance(v, dict)
                                                                                          and k.startswith('params')))}
    if not dicts:
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if not tensors:
            raise WeightsError(f'{path}: no state dict found (top-level keys: {_short(sorted(map(str, obj)))})')
        dicts = {'params': tensors}
    return dicts, obj.get(ARCH_KEY), obj.get(PIPELINE_KEY) or {}


def _check_stored(path):
    """torch.save stores a zip's records uncompressed; torch.load also inflates deflated ones, so a few KB could
    unpack to GBs before any check runs: refuse compressed records, reading only the zip's directory."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise WeightsError(f'{path}: cannot be read as a PyTorch weight file ({err})') from None
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise WeightsError(f'{path}: record {_short(packed[0])} is compressed, which torch.save never writes; '
                           'the file is refused (it could unpack to far more memory than it holds)')


def _view(t: torch.Tensor) -> tuple:
    """What makes two tensors the same memory: storage, offset, shape, strides, dtype."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


def _check_backed(dicts: Mapping[str, Mapping[str, torch.Tensor]], path: str) -> None:
    """Every element of every tensor is backed by its own bytes of the file: a tensor with stride 0, or views
    that overlap, keep their full shape and would pass the shape check, and the network built for them would
    allocate GBs for a file of KBs. The same view under two names (tied weights) counts once here;
    :func:`check_fits` refuses it where the network does not tie those weights."""
    views, storages = {}, {}
    for sd in dicts.values():
        for t in sd.values():
            views[_view(t)] = t.numel() * t.element_size()
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    claimed = sum(views.values())
    held = sum(storages.values())
    if claimed > held:
        raise WeightsError(f'{path}: its tensors claim {claimed} bytes but the file holds {held} of them (tensors '
                           'with stride 0 or overlapping views); the file is refused')


def _read_safetensors(path):
    try:
        from safetensors import safe_open
    except ImportError:
        raise _safetensors_missing(path, 'reading') from None
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
    except Exception as err:  # noqa: BLE001
        raise WeightsError(f'{path}: cannot be read as a safetensors file ({err})') from None
    arch, pipeline, keys = (_header_json(path, meta, k) for k in (ARCH_KEY, PIPELINE_KEY, 'param_keys'))
    if keys is not None:
        if not (isinstance(keys, list) and keys and len(keys) <= _MAX_LIST and all(map(_is_param_key, keys))):
            raise WeightsError(f'{path}: param_keys={_short(keys)} is not a list of parameter keys (params, '
                               'params_ema, params_*) in the safetensors header')
        dicts = {pk: {k[len(pk) + 1:]: v for k, v in tensors.items() if k.startswith(pk + '.')} for pk in keys}
    else:
        key = meta.get('param_key', 'params')
        if not _is_param_key(key):
            raise WeightsError(f'{path}: param_key={_short(key)} is not a parameter key (params, params_ema, '
                               'params_*) in the safetensors header')
        dicts = {key: tensors}
    return dicts, arch, {} if pipeline is None else pipeline


def _is_param_key(key: object) -> bool:
    return isinstance(key, str) and (key in PARAM_KEYS or key.startswith('params')) and len(key) <= _MAX_STR


def _header_json(path, meta, key):
    """The JSON value of a safetensors header entry (None when absent); one line for what is no JSON or is
    nested deeper than Python's parser recurses."""
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except RecursionError:
        raise WeightsError(f'{path}: bad JSON in the safetensors header ({key}: nested too deep)') from None
    except ValueError as err:
        raise WeightsError(f'{path}: bad JSON in the safetensors header ({key}: {err})') from None


def _check_finite(dicts: Mapping[str, Mapping[str, torch.Tensor]], path: str) -> None:
    """A NaN/Inf weight gives a network that writes black images: refuse the file, naming the first such tensor."""
    for pk, sd in dicts.items():
        for name, t in sd.items():
            if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                where = name if len(dicts) == 1 else f'{pk}.{name}'
                raise WeightsError(f'{path}: tensor {_short(where)} holds NaN or Inf values; the file is refused '
                                   '(a diverged or damaged training run?)')


def read_all(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict | None, dict]:
    """Every state dict of a weight file with its metadata: the one reader of weight files.

    Returns:
        tuple[dict[str, dict], dict | None, dict]: ``{param_key: state_dict}`` (``module.`` prefixes
        removed), the arch spec (None if the file has none) and the pipeline options.

    Raises:
        WeightsError: One line naming the file: missing, unreadable, pickled objects, NaN/Inf tensors.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise WeightsError(f'{path}: no such weight file')
    reader = _read_safetensors if format_of(path) == 'safetensors' else _read_pth
    dicts, arch, pipeline = reader(path)
    if arch is not None and not (isinstance(arch, dict) and isinstance(arch.get('type'), str)):
        raise WeightsError(f'{path}: bad "{ARCH_KEY}" entry {_short(arch)} (expected {{"type": NAME, ...}})')
    bad = [pk for pk, sd in dicts.items() if not isinstance(sd, dict) or not all(map(torch.is_tensor, sd.values()))
           or not all(isinstance(k, str) for k in sd)]
    if bad:
        raise WeightsError(f'{path}: entry {_short(bad[0])} is not a state dict of tensors named by text')
    dicts = {pk: strip_module_prefix(sd) for pk, sd in dicts.items()}
    _check_backed(dicts, path)
    _check_finite(dicts, path)
    return dicts, arch, dict(pipeline) if isinstance(pipeline, dict) else {}


def read_weights(path: str | os.PathLike, param_key: str | None = None) -> Weights:
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
        raise WeightsError(f'{path}: no parameter key {param_key!r}; the file has {_short(sorted(dicts))}')
    return Weights(dicts[param_key], arch, pipeline, param_key, str(path))


def read_state_dict(path: str | os.PathLike, param_key: str | None = 'params',
                    where: str = '') -> tuple[dict[str, torch.Tensor], str]:
    """One state dict of a weight file by BasicSR's rule: ``param_key``, else ``params`` where the file lacks it.

    Args:
        path (str): ``.pth`` or ``.safetensors``.
        param_key (str | None): ``params`` / ``params_ema``; None: the file's first state dict.
        where (str): Option that named the file (e.g. ``network_g:base_pretrained``), prefixed to errors.

    Returns:
        tuple[dict, str]: the state dict and the parameter key it came from.
    """
    prefix = f'{where}: ' if where else ''
    try:
        dicts, _, _ = read_all(path)
    except WeightsError as err:
        raise WeightsError(f'{prefix}{err}') from None
    key = next(iter(dicts)) if param_key is None else param_key
    if key not in dicts and 'params' in dicts:
        key = 'params'
    if key not in dicts:
        raise WeightsError(f'{prefix}{path}: no {param_key!r} entry (the file has {_short(sorted(dicts))})')
    return dicts[key], key


def existing_weight_file(path: str | os.PathLike, prefer: str | None = None) -> str:
    """``path``, or its sibling in the other weight format where only that one exists (a run that changed
    ``path:save_format``); ``path`` itself when neither exists. ``prefer``: the extension tried first."""
    stem, ext = os.path.splitext(str(path))
    exts = [ext] if ext in FORMATS.values() else [str(path)[len(stem):]]
    exts += [e for e in FORMATS.values() if e not in exts]
    if prefer in exts:
        exts.remove(prefer)
        exts.insert(0, prefer)
    return next((stem + e for e in exts if os.path.isfile(stem + e)), str(path))


def mismatch_report(net: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], limit: int = 8) -> str:
    """One line listing missing, unexpected and wrongly shaped keys of ``state_dict`` for ``net`` ('' if it fits).

    ``net`` may live on the ``meta`` device: only names and shapes are compared.
    """
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


def describe(spec: Mapping) -> str:
    """``NLRN(num_feat=8, num_steps=2)`` for an arch spec."""
    args = ', '.join(f'{k}={v!r}' for k, v in spec.items() if k != 'type')
    return f'{spec["type"]}({args})'


# ---------------------------------------------------------------------------------------------- what a file may ask for
#: Architectures a weight file's ``arch`` entry may name: this project's networks and blocks. Any other
#: registered architecture is built only when the user names it (``--arch``).
FILE_ARCHS = ('NLRN', 'N3Net', 'DnCNN', 'VDSR', 'N3Block', 'N3SetBlock', 'WindowedNonLocalBlock', 'NonLocalInjection')
#: Bases a file's ``NonLocalInjection`` may wrap: this project's networks and BasicSR's image networks whose
#: constructors take no path (SpyNet, BasicVSR, IconVSR, DFDNet load files, VGGFeatureExtractor downloads
#: its weights, SwinIR passes ``**kwargs`` on unchecked: none of them is listed).
INJECTION_BASES = ('NLRN', 'N3Net', 'DnCNN', 'VDSR', 'EDSR', 'RCAN', 'MSRResNet', 'RRDBNet', 'RIDNet', 'ECBSR',
                   'SRVGGNetCompact')
#: Blocks a file's ``NonLocalInjection`` may insert.
INJECTION_BLOCKS = ('N3Block', 'N3SetBlock', 'WindowedNonLocalBlock')
#: Range of the integer arguments a file may give, by name: generous for any trained model, small enough that
#: building the network to compare its shapes with the file's tensors stays cheap.
ARG_LIMITS = {
    **dict.fromkeys(('num_in_ch', 'num_out_ch', 'in_channels', 'out_channels', 'in_chans'), (1, 64)),
    **dict.fromkeys(('num_noise_ch', 'embed_out_ch'), (0, 64)),
    **dict.fromkeys(('num_feat', 'num_embed', 'embed_feat', 'num_inter_ch', 'mid_channels', 'num_channel',
                     'num_grow_ch', 'embed_dim'), (1, 1024)),
    **dict.fromkeys(('depth', 'num_steps', 'num_stages', 'num_block', 'num_group', 'num_conv', 'nonlocal_every'),
                    (1, 256)),
    **dict.fromkeys(('k', 'patch_size', 'stride', 'squeeze_factor'), (1, 64)),
    **dict.fromkeys(('search_size', 'window_size'), (1, 512)),
    'probe_size': (1, 128),
    **dict.fromkeys(('upscale', 'scale'), (1, 16)),
}
_OTHER_INT_LIMIT = 4096
_MAX_STR, _MAX_LIST = 64, 16
#: Argument names that hold a path, URL or file (their value, if not None, is refused).
_PATH_NAME = re.compile(r'path|file|dir|url|pretrain|load|ckpt|checkpoint', re.IGNORECASE)
#: String values that look like a path or URL.
_PATH_VALUE = re.compile(r'[/\\]|://|^[~.]|\.(pth?|pt|safetensors|bin|ckpt|npy|npz|pkl|t7|onnx|h5|yml|yaml|json)$',
                         re.IGNORECASE)
_HINT = 'to build anything else, name it yourself: --arch TYPE [--arch-opt KEY=VALUE ...]'


def _registry_name(name: str) -> str:
    return name[:-len('_basicsr')] if name.endswith('_basicsr') else name


def _names_allowed(name: str, allowed: tuple) -> bool:
    """``name`` is one of ``allowed`` or its ``NAME_basicsr`` spelling, and the registry gives the same class for
    both (another class registered under ``NAME_basicsr`` is not the allowed one)."""
    plain = _registry_name(name)
    return plain in allowed and _registered(name) in (None, _registered(plain))


def _check_value(key: str, value: object, default: object, where: str) -> None:
    """One constructor argument from a file: a plain value of the default's kind, in range, not a path."""
    def refuse(why):
        raise WeightsError(f'{where}: {key}={_short(value)} {why}; {_HINT}')

    if _PATH_NAME.search(key) and value is not None:
        hint = ' (the file holds the trained base: add --arch-opt base_pretrained=null)' \
            if key == 'base_pretrained' else ''
        refuse(f'names a path, URL or file, which a weight file may not give{hint}')
    if isinstance(value, bool):
        if default is not inspect.Parameter.empty and default is not None and not isinstance(default, bool):
            refuse(f'is a bool but the constructor expects {type(default).__name__}')
        return
    if value is None:
        return
    if isinstance(value, int):
        low, high = ARG_LIMITS.get(key, (-_OTHER_INT_LIMIT, _OTHER_INT_LIMIT))
        if isinstance(default, (bool, str, list, tuple)):
            refuse(f'is a number but the constructor expects {type(default).__name__}')
        if not low <= value <= high:
            refuse(f'is outside the range a weight file may give ({low}..{high})')
        return
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > 1e6:
            refuse('is not a finite number of sane size')
        if key in ARG_LIMITS:
            refuse('is a float but must be an integer')
        if isinstance(default, (bool, str, list, tuple)):   # an int default also takes floats (EDSR's res_scale)
            refuse(f'is a float but the constructor expects {type(default).__name__}')
        return
    if isinstance(value, str):
        if len(value) > _MAX_STR or _PATH_VALUE.search(value):
            refuse('looks like a path, URL or file, which a weight file may not give')
        if default is not inspect.Parameter.empty and default is not None and not isinstance(default, str):
            refuse(f'is text but the constructor expects {type(default).__name__}')
        return
    if isinstance(value, (list, tuple)) and len(value) <= _MAX_LIST:
        for item in value:
            if isinstance(item, (dict, list, tuple)):
                refuse('nests containers, which no allowed constructor takes')
            _check_value(key, item, inspect.Parameter.empty, where)
        return
    refuse(f'is a {type(value).__name__}, not a plain value')


def _check_args(cls: type, spec: Mapping, where: str, skip: tuple = ()) -> None:
    """Every argument the file gives (not in ``skip``) is a named parameter of ``cls`` with a sane value."""
    params = {n: p for n, p in inspect.signature(cls).parameters.items()
              if n != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in spec.items():
        if key == 'type' or key in skip:
            continue
        if key not in params:
            raise WeightsError(f'{where}: {_short(key)} is not an argument of {cls.__name__} '
                               f'(its arguments: {", ".join(params)}); {_HINT}')
        _check_value(key, value, params[key].default, where)


def check_file_arch(spec: Mapping, where: str, check_type: bool = True, trusted: tuple = ()) -> None:
    """Refuse what a weight file's ``arch`` entry may not ask for, before anything is built.

    A file may name the architectures in :data:`FILE_ARCHS` (a ``NonLocalInjection`` only over
    :data:`INJECTION_BASES` with :data:`INJECTION_BLOCKS`), with arguments its constructor takes, of the
    kind of their defaults, in the ranges of :data:`ARG_LIMITS`, and none that is a path, URL or file.

    Args:
        spec (dict): ``{'type': ..., **kwargs}``.
        where (str): The file, for the message.
        check_type (bool): Whether the type came from the file (False: the user named it with ``--arch``).
        trusted (tuple[str]): Keys the user gave (``--arch-opt``): not checked.

    Raises:
        WeightsError: One line naming the file, the argument and ``--arch`` as the way to build anything else.
    """
    from basicsr.utils.registry import ARCH_REGISTRY

    import nl_plugin  # noqa: F401  (registers the archs)
    kind = str(spec['type'])
    if check_type and not _names_allowed(kind, FILE_ARCHS):
        raise WeightsError(f'{where}: the file asks for architecture {_short(kind)}, which a weight file may not name '
                           f'(allowed: {", ".join(FILE_ARCHS)}); {_HINT}')
    try:
        cls = ARCH_REGISTRY.get(kind)
    except KeyError as err:
        raise WeightsError(f'{where}: {err.args[0]}') from None
    args = {k: v for k, v in spec.items() if k not in trusted}
    nested = ('base', 'blocks') if cls.__name__ == 'NonLocalInjection' else ()
    _check_args(cls, args, f'{where}: {kind}', skip=nested + tuple(trusted))
    if not nested:
        return
    if args.get('base_param_key', 'params') not in (None, 'params', 'params_ema'):
        raise WeightsError(f'{where}: base_param_key={_short(args["base_param_key"])} must be params or params_ema')
    if 'base' in args and not isinstance(args['base'], dict):
        raise WeightsError(f'{where}: NonLocalInjection base={_short(args["base"])} is not a mapping '
                           f'{{"type": NAME, ...}}; {_HINT}')
    blocks = args.get('blocks') or []
    if not isinstance(blocks, (list, tuple)) or len(blocks) > _MAX_LIST:
        raise WeightsError(f'{where}: NonLocalInjection blocks={_short(blocks)} is not a list of at most {_MAX_LIST} '
                           f'blocks; {_HINT}')
    for key, allowed, entries in (('base', INJECTION_BASES, [args['base']] if 'base' in args else []),
                                  ('blocks', INJECTION_BLOCKS, blocks)):
        for i, entry in enumerate(entries):
            at = f'{where}: NonLocalInjection {key}' + (f'[{i}]' if key == 'blocks' else '')
            if not isinstance(entry, dict) or not isinstance(entry.get('type'), str):
                raise WeightsError(f'{at}: {_short(entry)} is not {{"type": NAME, ...}}; {_HINT}')
            if not _names_allowed(entry['type'], allowed):
                raise WeightsError(f'{at}: type {_short(entry["type"])} may not be named by a weight file '
                                   f'(allowed: {", ".join(allowed)}); {_HINT}')
            try:
                entry_cls = ARCH_REGISTRY.get(entry['type'])
            except KeyError as err:
                raise WeightsError(f'{at}: {err.args[0]}') from None
            _check_args(entry_cls, {k: v for k, v in entry.items() if k != 'after'}, at)
            if key == 'blocks' and not (isinstance(entry.get('after'), str) and len(entry['after']) <= 256):
                raise WeightsError(f'{at}: after={_short(entry.get("after"))} is not a submodule name')


def resolve_arch(weights: Weights, arch_type: str | None = None, arch_opt: Mapping | None = None,
                 detect: bool = True) -> tuple[dict, str]:
    """The arch spec to build: the file's, or ``arch_type`` (+ the file's keys if the type matches), updated
    by ``arch_opt``; if neither is given, detected from the state dict's keys and shapes. What the file
    contributed is checked by :func:`check_file_arch` (the type only when the user did not name it).

    Returns:
        tuple[dict, str]: the spec and where it came from (``'file'``, ``'option'`` or ``'detected'``).
    """
    # a file's run-time choices (an older writer stored them) are ignored: the user's --arch-opt or the default
    spec, source = (drop_runtime_args(weights.arch), 'file') if weights.arch else (None, None)
    if arch_type:
        spec = dict(spec) if spec and spec['type'] == arch_type else {}
        spec['type'], source = arch_type, 'option'
    if spec is None and detect:
        from nl_plugin.arch_detect import detect_arch
        spec, source = detect_arch(weights.state_dict), 'detected'
    if spec is None:
        raise WeightsError(f'{weights.path}: the file carries no architecture and its keys match none known; '
                           'give --arch TYPE [--arch-opt KEY=VALUE ...]')
    check_file_arch(spec, weights.path, check_type=source != 'option', trusted=('type', *(arch_opt or {})))
    spec.update(arch_opt or {})
    return spec, source


@contextlib.contextmanager
def _creation_budget(limit: int | None, what: str) -> Iterator[None]:
    """Stop a constructor once it has registered more than ``limit`` modules, parameters and buffers together:
    a network that big cannot fit a file with fewer tensors, and building it (even on ``meta``) takes time."""
    if limit is None:
        yield
        return
    from torch.nn.modules import module as nn_module
    count = [0]

    def hook(module, name, value):
        if value is not None:
            count[0] += 1
            if count[0] > limit:
                raise WeightsError(f'{what}: it has more than {limit} modules, parameters and buffers, far more than '
                                   'the file has tensors; not built further')
    handles = [nn_module.register_module_parameter_registration_hook(hook),
               nn_module.register_module_buffer_registration_hook(hook),
               nn_module.register_module_module_registration_hook(hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """Skip the in-place operations on ``meta`` tensors that only set values (``normal_``, ``kaiming_uniform_``,
    ``copy_``, ...): they keep no values there, and torch decomposes them op by op, many times slower than the
    real ones. Those that change a shape or a flag still run. A ``meta`` build then costs what its modules cost."""

    _KEEP = frozenset(('resize_', 'resize_as_', 'set_', 'squeeze_', 'unsqueeze_', 'transpose_', 't_', 'swapdims_',
                       'swapaxes_', 'as_strided_', 'requires_grad_', 'share_memory_', 'detach_', 'unflatten_'))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        if name.endswith('_') and not name.startswith('_') and name not in self._KEEP and args \
                and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def build_network(spec: Mapping, where: str = 'network', device: str | torch.device | None = None,
                  max_objects: int | None = None, budget_what: str | None = None) -> torch.nn.Module:
    """The one network builder: a registered architecture from ``{'type': NAME, **constructor kwargs}``.

    Args:
        spec (dict): Registry name and constructor arguments (e.g. a ``network_g`` section).
        where (str): Option path for messages, e.g. ``'network_g'`` or a file.
        device (str | torch.device, optional): Build on this device (``'meta'``: shapes only, no memory).
        max_objects (int, optional): Stop building once this many modules, parameters and buffers exist.
        budget_what (str, optional): Start of that error's message. Default: ``where``.

    Returns:
        torch.nn.Module: The network.

    Raises:
        KeyError: No ``type``, an unknown type (with did-you-mean), unknown or missing constructor keys.
        ValueError / TypeError: Whatever the constructor refuses.
    """
    from basicsr.utils.registry import ARCH_REGISTRY

    import nl_plugin  # noqa: F401  (registers the archs and the compat error messages)
    from nl_plugin.config_checks import check_kwargs
    opt = deepcopy(dict(spec))
    if 'type' not in opt:
        raise KeyError(f'{where}: the option "type" is missing in {opt}')
    cls = ARCH_REGISTRY.get(opt.pop('type'))
    check_kwargs(cls, opt, where=f'{where} ({cls.__name__})')
    meta = device is not None and torch.device(device).type == 'meta'
    with torch.device(device) if device is not None else contextlib.nullcontext(), \
            _SkipMetaInit() if meta else contextlib.nullcontext(), _creation_budget(max_objects, budget_what or where):
        return cls(**opt)


def _build_for(spec: Mapping, path: str, **kwargs) -> torch.nn.Module:
    try:
        return build_network(spec, where=path, **kwargs)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, WeightsError):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise WeightsError(f'{msg}' if msg.startswith(path) else f'{path}: {msg}') from None


def check_fits(spec: Mapping, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], path: str) -> None:
    """Build ``spec`` on the ``meta`` device (no memory) and compare every parameter and buffer name and shape
    with each state dict's tensors; a network that cannot fit is stopped while it is being built.

    Raises:
        WeightsError: One line listing the missing, unexpected and wrongly shaped keys.
    """
    n = max(len(sd) for sd in state_dicts.values())
    meta = _build_for(spec, path, device='meta', max_objects=8 * n + 256, budget_what=f'{path} does not fit '
                      f'{describe(spec)}')
    own = {id(t): t.numel() for t in meta.state_dict(keep_vars=True).values()}   # tied weights count once
    for key, sd in state_dicts.items():
        label = f' ({key})' if len(state_dicts) > 1 else ''
        report = mismatch_report(meta, sd)
        if report:
            raise WeightsError(f'{path}{label} does not fit {describe(spec)}: {report}')
        held = sum(t.numel() for t in {_view(t): t for t in sd.values()}.values())
        if sum(own.values()) > held:   # one view of the file under several names the network does not tie
            raise WeightsError(f'{path}{label}: {describe(spec)} has {sum(own.values())} distinct weights but the '
                               f'file holds {held}; the file is refused')


def load_network(path: str | os.PathLike, arch_type: str | None = None, arch_opt: Mapping | None = None,
                 param_key: str | None = None) -> tuple[torch.nn.Module, dict, Weights]:
    """Rebuild the network stored in a weight file and load its weights strictly.

    The file's ``arch`` entry is checked (:func:`check_file_arch`) and the network is built on the ``meta``
    device and compared with the file's tensors (:func:`check_fits`) before it is allocated.

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
    check_fits(spec, {weights.param_key: weights.state_dict}, str(path))
    net = _build_for(spec, str(path))
    net.load_state_dict(weights.state_dict, strict=True)
    return net.eval(), spec, weights


__all__ = ['save_weights', 'read_weights', 'read_all', 'read_state_dict', 'existing_weight_file', 'load_network',
           'build_network', 'check_fits', 'check_file_arch', 'resolve_arch', 'arch_from_opt', 'mismatch_report',
           'strip_module_prefix', 'check_save_format', 'drop_runtime_args', 'to_bytes', 'Weights', 'WeightsError',
           'FILE_ARCHS']
