"""Checkpoints that survive kills and full disks: atomic saves, RNG capture, and the choice of a state to resume.

Networks (``models/net_g_<iter>.pth`` or ``.safetensors``, through :func:`nl_plugin.weights.save_weights`) and
training states (``training_states/<iter>.state``) are written atomically (:mod:`nl_plugin.fileio`). A
training state also holds every process's RNG states (torch, CUDA, NumPy, ``random``), and a resumed run
restores them and starts its first epoch after the batches already trained on (:class:`ResumableSampler`), so
that with ``num_worker_per_gpu: 0`` an interrupted and resumed run trains on the same samples with the same
noise as an uninterrupted one.
"""
import collections
import os
import random

import numpy as np
import torch
from basicsr.data.data_sampler import EnlargedSampler

from nl_plugin import weights
from nl_plugin.fileio import atomic_torch_save, atomic_write_bytes, remove_stale_temp_files

#: What a resumed run still has to apply once its data loader starts (set by :func:`find_resume_state`).
PENDING = {}


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


# ---------------------------------------------------------------------------------------------- saving
def bare_state_dict(net: torch.nn.Module) -> collections.OrderedDict:
    """CPU state dict of ``net`` without DDP's ``module.`` prefix (BasicSR's ``save_network`` layout)."""
    net = net.module if hasattr(net, 'module') else net
    return collections.OrderedDict((k, v.detach().cpu())
                                   for k, v in weights.strip_module_prefix(net.state_dict()).items())


def check_finite(save_dict: dict, path: str, current_iter: int) -> None:
    """Raise ``FloatingPointError`` naming ``path`` and the tensors if any weight or buffer is NaN/Inf."""
    bad = [f'{group}.{name}' for group, sd in save_dict.items() for name, t in sd.items()
           if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(
            f'iter {current_iter}: not writing {path!r}: {len(bad)} tensor(s) hold NaN/Inf (first: {bad[:3]}); '
            'the checkpoints already written are kept. Lower train:optim_g:lr or add train:grad_clip.')


def _weights_ext(opt):
    return weights.check_save_format(opt['path'].get('save_format'))


def save_network(model, net, net_label: str, current_iter: int, param_key: str | list = 'params') -> None:
    """BasicSR's ``save_network`` (rank 0 writes): atomic, refusing non-finite weights, raising on failure,
    as ``.pth`` or ``path:save_format: safetensors``, with the network's ``arch`` spec so the file alone
    rebuilds it (:mod:`nl_plugin.weights`)."""
    if rank_and_world()[0] != 0:
        return
    name = 'latest' if current_iter == -1 else current_iter
    path = os.path.join(model.opt['path']['models'], f'{net_label}_{name}{_weights_ext(model.opt)}')
    nets = net if isinstance(net, list) else [net]
    keys = param_key if isinstance(param_key, list) else [param_key]
    if len(nets) != len(keys):
        raise ValueError(f'save_network: {len(nets)} networks but {len(keys)} param keys')
    save_dict = {key: bare_state_dict(n) for n, key in zip(nets, keys)}
    check_finite(save_dict, path, current_iter)
    net_opt = model.opt.get(net_label.replace('net_', 'network_', 1))
    weights.save_weights(save_dict, path, arch=weights.arch_from_opt(net_opt) if net_opt else None,
                         pipeline=weights.pipeline_from_opt(model.opt), write=atomic_write_bytes)


def rng_state() -> dict:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'random': random.getstate(),
             'numpy': [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state['torch'])
    version, internal, gauss = state['random']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def run_identity(opt: dict) -> dict:
    """What a training state records of its run, to be compared on resume: the experiment's name and the
    spec of every network (``network_*``: ``type`` and constructor arguments, less the run-time ones that
    ``weights.arch_from_opt`` drops: a resume may switch the attention kernel)."""
    nets = {k: weights.arch_from_opt(v) for k, v in sorted(opt.items())
            if k.startswith('network_') and isinstance(v, dict) and 'type' in v}
    return {'experiment': opt.get('name'), 'networks': nets}


def save_training_state(model, epoch: int, current_iter: int) -> None:
    """BasicSR's ``save_training_state`` plus every process's RNG states, written atomically by rank 0.

    Called on every process (``model.save`` is): the RNG states are gathered before rank 0 writes.
    """
    if current_iter == -1:
        return
    rank, world = rank_and_world()
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        _dist().all_gather_object(rngs, rng_state())
    if rank != 0:
        return
    state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in model.optimizers],
             'schedulers': [s.state_dict() for s in model.schedulers], 'rng': rngs, **run_identity(model.opt)}
    atomic_torch_save(state, os.path.join(model.opt['path']['training_states'], f'{current_iter}.state'))


# ---------------------------------------------------------------------------------------------- loading
def load_network(model, net: torch.nn.Module, load_path: str, strict: bool = True,
                 param_key: str | None = 'params') -> None:
    """BasicSR's ``load_network`` through :func:`nl_plugin.weights.read_state_dict` (``.pth`` with
    ``weights_only=True``, or ``.safetensors``); where a resume names ``net_g_N.pth`` and only its other
    format exists, that one is read."""
    from basicsr.utils import get_root_logger
    logger = get_root_logger()
    net = model.get_bare_model(net)
    resume = model.opt['path'].get('resume_state')
    where = f'path:resume_state ({resume})' if resume else 'path:pretrain_network_g'
    load_path = weights.existing_weight_file(load_path)
    state, used = weights.read_state_dict(load_path, param_key, where=where)
    if param_key is not None and used != param_key:
        logger.info(f'Loading: {param_key} does not exist, use {used}.')
    logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{used}].')
    model._print_different_keys_loading(net, state, strict)
    net.load_state_dict(state, strict=strict)


# ---------------------------------------------------------------------------------------------- resuming
def load_state(path: str, device: torch.device | str) -> dict:
    """Read a training state (``weights_only``; the schedulers' ``Counter`` allowed) and check its layout."""
    with torch.serialization.safe_globals([collections.Counter]):
        state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or not {'iter', 'epoch', 'optimizers', 'schedulers'} <= set(state):
        raise ValueError('not a BasicSR training state (keys iter, epoch, optimizers, schedulers expected)')
    return state


def check_resume_state(state: dict, opt: dict, path: str, report=print) -> None:
    """Refuse a training state of another experiment, or of another network, in one line naming both.

    States without the record (plain BasicSR, or written before it existed) resume with a warning through
    ``report``. Then every network file of the state's iteration must exist (named as the resume's).

    Raises:
        ValueError: Another experiment or network.
        FileNotFoundError: A network file of that iteration is missing.
    """
    where = f'path:resume_state: {path!r}'
    mine = run_identity(opt)
    if 'experiment' not in state and 'networks' not in state:
        report(f'resume: {path!r} records no experiment name or network spec (written by plain BasicSR or an '
               'older nl_plugin); it is not checked against this run')
    elif state.get('experiment') != mine['experiment']:
        theirs = ', '.join(weights.describe(v) for v in (state.get('networks') or {}).values())
        raise ValueError(f'{where} is a state of experiment {state.get("experiment")!r} ({theirs}), this run is '
                         f'{mine["experiment"]!r}; resume only a run\'s own states (to start from another run\'s '
                         'weights, use path:pretrain_network_g)')
    else:   # an older state may record run-time choices (attention_kernel, ...): not part of the network
        theirs = {k: weights.drop_runtime_args(v) if isinstance(v, dict) else v
                  for k, v in (state.get('networks') or {}).items()}
        for key in sorted(set(theirs) | set(mine['networks'])):
            if theirs.get(key) != mine['networks'].get(key):
                was = weights.describe(theirs[key]) if key in theirs else 'none'
                now = weights.describe(mine['networks'][key]) if key in mine['networks'] else 'none'
                raise ValueError(f'{where} was written for {key}: {was}, this run has {key}: {now}; to change the '
                                 'network, start a new experiment from its weights with path:pretrain_network_g')
    it = int(state['iter'])
    for f in _network_files(opt, it):
        if not os.path.isfile(f):
            raise FileNotFoundError(f'{where} is iteration {it}, but the network saved with it, {f!r}, does not '
                                    'exist')


def _network_files(opt, it):
    ignored = opt['path'].get('ignore_resume_networks') or []
    files = []
    for key in opt:
        if key.startswith('network_') and key not in ignored:
            # the run may have changed path:save_format since the state was written: either format resumes
            stem = os.path.join(opt['path']['models'], f'net_{key[len("network_"):]}_{it}')
            files.append(weights.existing_weight_file(stem + _weights_ext(opt)))
    return files


def _move_aside(path):
    target = f'{path}.corrupt'
    n = 1
    while os.path.exists(target):
        n += 1
        target = f'{path}.corrupt{n}'
    os.replace(path, target)
    return target


def _choose_state(opt, device, report):
    """Rank 0: the iteration of the newest state that loads (and whose networks load), or None."""
    state_dir = opt['path']['training_states']
    if not os.path.isdir(state_dir):
        return None
    for folder in (state_dir, opt['path']['models']):
        for name in remove_stale_temp_files(folder):
            report(f'--auto_resume: removed {os.path.join(folder, name)!r}, left by an interrupted save')
    iters = sorted((int(n[:-len('.state')]) for n in os.listdir(state_dir)
                    if n.endswith('.state') and n[:-len('.state')].isdigit()), reverse=True)
    for it in iters:
        path = os.path.join(state_dir, f'{it}.state')
        files = [path] + _network_files(opt, it)
        try:
            for f in files:
                if not os.path.isfile(f):
                    raise FileNotFoundError(f'{f!r} is missing')
                if f == path:
                    if load_state(f, device)['iter'] != it:
                        raise ValueError(f'{f!r} holds another iteration')
                else:
                    weights.read_all(f)
        except Exception as err:  # a torn or unreadable file must never stop a resume
            moved = [f'{f!r} -> {_move_aside(f)!r}' for f in files if os.path.isfile(f)]
            report(f'--auto_resume: skipped the state of iteration {it}: {type(err).__name__}: {err}; '
                   f'moved aside: {", ".join(moved) or "nothing"}')
            continue
        return it
    return None


def find_resume_state(opt: dict, device: torch.device | str, report=print) -> tuple[str | None, dict | None]:
    """``--auto_resume``: the newest complete training state in ``path.training_states`` (or None).

    Torn or unreadable states (and states whose network files are missing or unreadable) are reported
    through ``report`` and renamed to ``<name>.corrupt``; leftover temporary files are deleted. Under
    several processes rank 0 chooses and the others load the same file.
    """
    dist = _dist()
    chosen = [_choose_state(opt, device, report) if rank_and_world()[0] == 0 else None]
    if dist:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None, None
    path = os.path.join(opt['path']['training_states'], f'{chosen[0]}.state')
    return path, load_state(path, device)


def remember_resume(state: dict, report) -> None:
    """Keep what the data loader must apply when the resumed training starts (see ResumableSampler)."""
    rank, world = rank_and_world()
    rngs = state.get('rng')
    PENDING.clear()
    PENDING.update(iter=int(state['iter']), epoch=int(state['epoch']), rng=None)
    if rngs is None:
        report('resume: this training state holds no RNG states (written by plain BasicSR); '
               'the resumed run draws different random crops and noise than an uninterrupted one')
    elif len(rngs) != world:
        report(f'resume: the state was written by {len(rngs)} process(es), this run has {world}; '
               'RNG states are not restored')
    else:
        PENDING['rng'] = rngs[rank]


class ResumableSampler(EnlargedSampler):
    """BasicSR's ``EnlargedSampler`` whose first epoch after a resume skips the samples already trained on.

    It also restores the saved RNG states when that epoch's first batch is drawn, i.e. after the data
    loader drew its base seed, at the same point of the random stream as the uninterrupted run.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = 0
        self._rng = None

    def resume_at(self, skip_samples, rng):
        self._skip, self._rng = int(skip_samples), rng

    def __iter__(self):
        indices = list(super().__iter__())
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def apply_pending_resume(train_loader, sampler, logger) -> None:
    """Point the sampler of a resumed run at the first batch it has not trained on yet."""
    if not PENDING or not isinstance(sampler, ResumableSampler):
        return
    per_epoch = len(train_loader)
    done = PENDING['iter'] - PENDING['epoch'] * per_epoch
    if 0 <= done <= per_epoch:
        sampler.resume_at(done * train_loader.batch_size, PENDING['rng'])
        logger.info(f'Resume: epoch {PENDING["epoch"]} continues after its first {done} batch(es).')
    else:
        logger.warning(f'Resume: iter {PENDING["iter"]} / epoch {PENDING["epoch"]} do not match {per_epoch} '
                       'batches per epoch (batch size or data changed?); the epoch restarts from its first batch')
    PENDING.clear()
