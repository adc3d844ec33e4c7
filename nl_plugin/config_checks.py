"""Checks of a parsed option file that must pass before BasicSR creates, or archives, any output folder.

:func:`check_options` covers what BasicSR's pipelines read directly (``train:total_iter``, the
``logger`` section, ``val:val_freq``, the loaders' batch size), the types and keys of losses and
metrics, and the files named in ``path``. :func:`check_data` compares the built datasets with the
network: crop size against the image sizes, channels against the first layer, and (``--check_data``)
decodes every file. Each problem is one line naming the key or file.
"""
import contextlib
import difflib
import inspect
import math
import os
import random
from typing import Any, Callable, Collection, Mapping, Optional

import numpy as np
import torch


def check_kwargs(fn: Callable, kwargs: Mapping[str, Any], where: str, positional: int = 0) -> None:
    """Raise ``KeyError`` naming unknown keys of ``kwargs``, or required arguments of ``fn`` it lacks.

    Args:
        fn (callable): Function or class whose signature is checked.
        kwargs (dict): Keyword arguments that will be passed.
        where (str): Option path for the message, e.g. ``'train:pixel_opt (L1Loss)'``.
        positional (int): Leading parameters supplied by the caller (e.g. the optimizer), not by the options.
    """
    renamed = {old: new for old, new in getattr(fn, 'renamed_options', {}).items() if old in kwargs}
    if renamed:  # one word for one idea: an old spelling names its replacement (nl_plugin.utils.renamed_options)
        raise KeyError(f'{where}: ' + '; '.join(f'option {o!r} is now called {n!r}' for o, n in renamed.items()))
    params = [p for n, p in inspect.signature(fn).parameters.items() if n != 'self']
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][positional:]
    valid = [p.name for p in named]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        bad = [k for k in kwargs if k not in valid]
        if bad:
            hints = ''.join(f' ({k!r}: did you mean {difflib.get_close_matches(k, valid, n=1)[0]!r}?)'
                            for k in bad if difflib.get_close_matches(k, valid, n=1))
            raise KeyError(f'{where}: unknown option key(s) {bad}{hints}. Valid keys: {valid}')
    missing = [p.name for p in named if p.default is p.empty and p.name not in kwargs]
    if missing:
        raise KeyError(f'{where}: required option key(s) {missing} missing')


def _yaml_text_hint(value):
    return ' (YAML reads a number such as 1e5 without a dot as text: write 1.0e5)' if isinstance(value, str) else ''


def positive_int(section: Mapping[str, Any], key: str, where: str, minimum: int = 1,
                 default: Optional[int] = None) -> int:
    """``section[key]`` as an int >= ``minimum`` (integral floats accepted, as BasicSR calls ``int()``)."""
    if key not in section or section[key] is None:
        if default is not None:
            return default
        raise KeyError(f'{where}:{key} is missing (an integer >= {minimum})')
    value = section[key]
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and float(value).is_integer() and value >= minimum)
    if not ok:
        raise ValueError(f'{where}:{key} must be an integer >= {minimum}, got {value!r}{_yaml_text_hint(value)}')
    return int(value)


def non_negative_number(section: Mapping[str, Any], key: str, where: str) -> float:
    """``section[key]`` as a finite float >= 0."""
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f'{where}:{key} must be a number >= 0, got {value!r}{_yaml_text_hint(value)}')
    return float(value)


def _section(opt, key, where=None):
    value = opt.get(key)
    if not isinstance(value, dict):
        what = 'is missing' if value is None else f'must be a mapping, got {value!r}'
        raise KeyError(f'{where or key} {what}')
    return value


def _check_registry_entry(registry, entry, where, positional=0):
    if not isinstance(entry, dict) or 'type' not in entry:
        raise KeyError(f'{where}: needs a "type", got {entry!r}')
    kwargs = {k: v for k, v in entry.items() if k not in ('type', 'better')}
    try:
        obj = registry.get(entry['type'])
    except KeyError as err:
        raise KeyError(f'{where}: {err.args[0]}') from None
    check_kwargs(obj, kwargs, f'{where} ({entry["type"]})', positional=positional)


def check_optimizer(optim: Any, supported: Mapping[str, Callable], ignore: Collection[str] = ()) -> None:
    """``train:optim_g``: a supported optimizer type (``supported`` maps names to classes), its keys, and a
    positive ``lr``."""
    if not isinstance(optim, dict) or optim.get('type') not in supported:
        got = optim.get('type') if isinstance(optim, dict) else optim
        hint = difflib.get_close_matches(str(got), supported, n=1)
        raise ValueError(f'train:optim_g:type must be one of {tuple(supported)}, got {got!r}'
                         + (f' (did you mean {hint[0]!r}?)' if hint else ''))
    kwargs = {k: v for k, v in optim.items() if k not in ('type', *ignore)}
    check_kwargs(supported[optim['type']], kwargs, f'train:optim_g ({optim["type"]})', positional=1)
    non_negative_number(optim, 'lr', 'train:optim_g')


def check_scheduler(sched: Any, extra: Collection[str] = ()) -> None:
    """``train:scheduler``: one of BasicSR's schedulers (or a name in ``extra``) with valid keys."""
    from basicsr.models import lr_scheduler
    classes = {'MultiStepLR': lr_scheduler.MultiStepRestartLR, 'MultiStepRestartLR': lr_scheduler.MultiStepRestartLR,
               'CosineAnnealingRestartLR': lr_scheduler.CosineAnnealingRestartLR}
    kind = sched.get('type') if isinstance(sched, dict) else None
    if kind not in classes:
        valid = sorted(classes) + list(extra)
        hint = difflib.get_close_matches(str(kind), valid, n=1)
        raise ValueError(f'train:scheduler:type must be one of {valid}, got {kind!r}'
                         + (f' (did you mean {hint[0]!r}?)' if hint else ''))
    check_kwargs(classes[kind], {k: v for k, v in sched.items() if k != 'type'}, f'train:scheduler ({kind})',
                 positional=1)


def check_options(opt: dict) -> None:
    """Check every option BasicSR reads without a default; raise ``KeyError``/``ValueError``/``FileNotFoundError``."""
    from basicsr.utils.registry import LOSS_REGISTRY, METRIC_REGISTRY
    is_train = bool(opt.get('is_train'))
    datasets = _section(opt, 'datasets')
    if is_train:
        train = _section(opt, 'train')
        positive_int(train, 'total_iter', 'train')
        logger = _section(opt, 'logger')
        positive_int(logger, 'print_freq', 'logger')
        positive_int(logger, 'save_checkpoint_freq', 'logger')
        losses = [k for k in train if k.endswith('_opt') and train[k]]
        for key in losses:
            _check_registry_entry(LOSS_REGISTRY, train[key], f'train:{key}')
        if not losses:
            raise KeyError('train: no loss given (train:pixel_opt or train:perceptual_opt)')
        optim = train.get('optim_g')
        if isinstance(optim, dict):
            non_negative_number(optim, 'lr', 'train:optim_g')
        if 'train' not in datasets:
            raise KeyError('datasets:train is missing')
        for phase, ds in datasets.items():
            if phase != 'train' and phase.split('_')[0] != 'val':
                raise KeyError(f"datasets:{phase}: a training run takes 'train' and 'val*' datasets only")
        ds = _section(datasets, 'train', 'datasets:train')
        positive_int(ds, 'batch_size_per_gpu', 'datasets:train')
        positive_int(ds, 'num_worker_per_gpu', 'datasets:train', minimum=0)
        positive_int(ds, 'dataset_enlarge_ratio', 'datasets:train', default=1)
    val = opt.get('val')
    if val is not None:
        if not isinstance(val, dict):
            raise ValueError(f'val must be a mapping, got {val!r}')
        if is_train:
            positive_int(val, 'val_freq', 'val')
        val.setdefault('save_img', False)  # BasicSR reads val:save_img without a default
        for name, metric in (val.get('metrics') or {}).items():
            _check_registry_entry(METRIC_REGISTRY, metric, f'val:metrics:{name}', positional=2)
    elif not is_train:
        raise KeyError('val is missing (a test run needs at least val: {save_img: false})')
    for key, value in (opt.get('path') or {}).items():
        if key.startswith('pretrain_network') and value is not None and not os.path.isfile(str(value)):
            raise FileNotFoundError(f'path:{key}: weights file {value!r} does not exist')


# ---------------------------------------------------------------------------------------------- data
@contextlib.contextmanager
def _rng_untouched():
    """Reading a training sample draws crops and noise; the run's random streams must not notice."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


def input_channels(net: torch.nn.Module) -> Optional[int]:
    """in_channels of the first conv / BN of ``net`` (as ``RestorationModel`` checks its inputs), or None."""
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            return m.in_channels
        if isinstance(m, torch.nn.BatchNorm2d):
            return m.num_features
    return None


def output_channels(net_opt: Mapping[str, Any], arch: Callable) -> Optional[int]:
    """``num_out_ch`` of a network's options, or its constructor default; None if the arch has no such key."""
    if 'num_out_ch' in net_opt:
        return net_opt['num_out_ch']
    param = inspect.signature(arch).parameters.get('num_out_ch')
    return None if param is None or param.default is param.empty else param.default


def _check_crop(phase, dataset):
    source, size = getattr(dataset, 'source', None), getattr(dataset, 'gt_size', None)
    if source is None or not size or getattr(dataset, 'phase', phase) != 'train':
        return
    small = [(p, hw) for p, hw in zip(source.paths, source.image_sizes()) if hw is not None and min(hw) < size]
    if small:
        path, (h, w) = small[0]
        raise ValueError(f'datasets:{phase}: gt_size {size} is larger than {len(small)} image(s), e.g. '
                         f'{source.describe(path)} ({h}x{w}); lower gt_size or remove them')


def check_data(datasets: Mapping[str, Any], net: Optional[torch.nn.Module] = None, out_ch: Optional[int] = None,
               full: bool = False) -> None:
    """Compare built datasets with the network before any folder exists.

    Args:
        datasets (dict[str, Dataset]): phase -> dataset built from the options.
        net (nn.Module | None): ``network_g`` (the meta device is fine): its first layer gives the input channels.
        out_ch (int | None): channels ``network_g`` outputs (see :func:`output_channels`).
        full (bool): ``--check_data``: decode every image of every dataset, reporting all failures at once.
    """
    in_ch = input_channels(net) if net is not None else None
    for phase, ds in datasets.items():
        _check_crop(phase, ds)
        if full and hasattr(getattr(ds, 'source', None), 'check_all'):
            ds.source.check_all()
        if in_ch is None or len(ds) == 0:
            continue
        with _rng_untouched():
            try:
                sample = ds[0]
            except (OSError, ValueError) as err:
                raise type(err)(f'datasets:{phase}: {err}') from err
        lq, gt = sample.get('lq'), sample.get('gt')
        if torch.is_tensor(lq) and lq.dim() == 3 and lq.shape[0] != in_ch:
            raise ValueError(f'datasets:{phase}: gives {lq.shape[0]}-channel inputs but network_g takes {in_ch} '
                             '(check the dataset color / noise map options and network_g:num_in_ch)')
        if torch.is_tensor(gt) and gt.dim() == 3 and out_ch is not None and gt.shape[0] != out_ch:
            raise ValueError(f'datasets:{phase}: gives {gt.shape[0]}-channel targets but '
                             f'{out_ch} output channels are set for network_g (check network_g:num_out_ch)')
