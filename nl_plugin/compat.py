"""Every correction nl_plugin makes to BasicSR 1.4.2 on today's stack, in one place.

``import nl_plugin`` calls :func:`apply` before anything imports BasicSR's subpackages. No installed
file is edited: each fix rebinds one attribute, and the comment above it names the BasicSR behaviour
it corrects. Keep this module the only place that knows about BasicSR's quirks.
"""
import difflib
import importlib
import os
import sys

import torch

from nl_plugin import config_checks  # nl_plugin.checkpoint imports BasicSR: imported where used, after fix 1

_APPLIED = False


# --- 1. torchvision >= 0.17 removed ``torchvision.transforms.functional_tensor``, which
#        ``basicsr.data.degradations`` imports at module level, so ``import basicsr`` fails.
def _alias_functional_tensor():
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
    except ImportError:
        sys.modules[name] = importlib.import_module('torchvision.transforms._functional_tensor')


# --- 2. ``init_dist('pytorch')`` always uses NCCL and calls ``torch.cuda.set_device(rank % device_count)``,
#        which divides by zero on a CPU machine; it also uses the global RANK rather than LOCAL_RANK
#        to pick the GPU, which is wrong on more than one node.
def init_dist(launcher: str, backend: str | None = None, **kwargs) -> None:
    """BasicSR's ``init_dist`` that also works on CPU (gloo) and picks the GPU by LOCAL_RANK."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from basicsr.utils import dist_util

    if launcher != 'pytorch':
        return _ORIGINAL['init_dist'](launcher, backend=backend or 'nccl', **kwargs)
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if backend is None:      # ``dist_backend`` of the option file (fix 2b), else nccl on GPUs
        backend = _DIST['backend'] or ('nccl' if use_cuda else 'gloo')
    if use_cuda:
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', 0)))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, **kwargs)
    del dist_util  # imported only to make sure the original module is loaded


# --- 2b. ``init_dist('pytorch')`` runs before the options are read, so an option file cannot choose the process
#         group's backend. ``dist_backend`` (top level: nccl or gloo; default nccl on GPUs, gloo on the CPU) is
#         read from the option file (and --force_yml) first: gloo lets two ranks share one GPU, which NCCL refuses.
DIST_BACKENDS = ('nccl', 'gloo')
_DIST = {'backend': None}


def dist_backend_option(argv=None):
    """``dist_backend`` of the option file named by ``-opt`` in ``argv`` (default ``sys.argv``), after
    ``--force_yml``; None when unset. Raises naming the file for a value not in ``DIST_BACKENDS``."""
    import argparse

    import yaml
    from basicsr.utils.options import ordered_yaml
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', default=None)
    parser.add_argument('--force_yml', nargs='+', default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not args.opt or not os.path.isfile(args.opt):
        return None
    with open(args.opt) as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0]) or {}
    value = opt.get('dist_backend')
    for entry in args.force_yml or []:
        key, _, forced = entry.partition('=')
        if key.strip() == 'dist_backend':
            value = forced.strip()
    if value is None:
        return None
    if value not in DIST_BACKENDS:
        close = difflib.get_close_matches(str(value), DIST_BACKENDS, n=1)
        raise ValueError(f'{args.opt}: dist_backend must be one of {DIST_BACKENDS}, got {value!r}'
                         + (f' (did you mean {close[0]!r}?)' if close else ''))
    if value == 'nccl' and not torch.cuda.is_available():
        raise ValueError(f"{args.opt}: dist_backend 'nccl' needs a GPU (none is visible); use gloo")
    return value


# --- 3. ``BaseModel.model_to_device`` wraps DDP with ``device_ids=[torch.cuda.current_device()]``,
#        which fails without a GPU; DDP on CPU must be built without device ids.
def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
    """BasicSR's ``model_to_device`` that also wraps CPU (gloo) models in DDP."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    net = net.to(self.device)
    if self.opt['dist']:
        find_unused = self.opt.get('find_unused_parameters', False)
        if self.device.type == 'cuda':
            net = DistributedDataParallel(
                net, device_ids=[torch.cuda.current_device()], find_unused_parameters=find_unused)
        else:
            net = DistributedDataParallel(net, find_unused_parameters=find_unused)
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


# --- 4. ``basicsr.train.load_resume_state`` (a) looks for states in ``./experiments/<name>`` relative to
#        the working directory although they are written under ``root_path``; (b) maps every tensor to
#        ``torch.cuda.current_device()``, which fails on a CPU machine; (c) unpickles the scheduler's
#        ``collections.Counter`` which ``torch.load(weights_only=True)`` (the default) refuses; (d) takes the
#        newest ``.state`` even when it is torn, and crashes with EOFError (see fix 10).
def load_resume_state(opt: dict) -> dict | None:
    """Find (``--auto_resume``) or read (``path.resume_state``) a training state on any device."""
    from basicsr.utils import check_resume

    from nl_plugin import checkpoint
    _validate_once(opt)  # fix 8: this runs before make_exp_dirs in train_pipeline
    _apply_determinism(opt)  # fix 13: after train_pipeline switched cudnn.benchmark on
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    if opt['auto_resume']:
        state_path, state = checkpoint.find_resume_state(opt, device, report=_report)
        if state_path is None:
            return None
        opt['path']['resume_state'] = state_path
    elif opt['path'].get('resume_state'):
        state_path = opt['path']['resume_state']
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f'path.resume_state: training state {state_path!r} does not exist')
        try:
            state = checkpoint.load_state(state_path, device)
        except Exception as err:
            raise ValueError(f'path.resume_state: cannot read training state {state_path!r} '
                             f'({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}); '
                             'use --auto_resume to fall back to the newest readable one') from None
    else:
        return None
    checkpoint.check_resume_state(state, opt, state_path, report=_report)
    check_resume(opt, state['iter'])
    checkpoint.remember_resume(state, _report)
    return state


_REPORTS = []


def _report(message):
    """Messages from before BasicSR's logger exists: printed now, written to the log once it exists (fix 10)."""
    print(message, file=sys.stderr, flush=True)
    _REPORTS.append(message)


# --- 5. ``Registry.get`` prints a misleading "use name: X_basicsr!" line on every miss and its error
#        lists no alternatives; a typo in ``type:`` should say what exists.
def registry_get(self, name: str, suffix: str = 'basicsr') -> object:
    obj = self._obj_map.get(name)
    if obj is None:
        obj = self._obj_map.get(f'{name}_{suffix}')
    if obj is None:
        close = difflib.get_close_matches(str(name), list(self._obj_map), n=3)
        hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
        raise KeyError(f"type: no object named {name!r} in BasicSR's {self._name!r} registry.{hint}")
    return obj


# --- 6. ``build_network`` passes YAML keys straight to the constructor: a misspelt key ends in a bare
#        ``TypeError: __init__() got an unexpected keyword argument``. Name the key and the valid ones.
def build_network(opt: dict) -> torch.nn.Module:
    """``basicsr.archs.build_network`` with an error naming the offending ``network_*`` key."""
    from basicsr.utils import get_root_logger

    from nl_plugin.weights import build_network as build
    net = build(opt, where='network')
    get_root_logger().info(f'Network [{net.__class__.__name__}] is created.')
    return net


# --- 7. ``parse_options`` keeps ``num_gpu: 1`` (common in BasicSR option files) on a machine without a GPU,
#        and the model then fails deep inside ``.to('cuda')``. Fall back to the CPU with a clear warning.
def parse_options(root_path: str, is_train: bool = True) -> tuple[dict, object]:
    _DIST['backend'] = dist_backend_option()      # fix 2b: before the original starts the process group
    opt, args = _ORIGINAL['parse_options'](root_path, is_train=is_train)
    if opt.get('deterministic'):  # fix 13: cuBLAS reads this when it starts, before any CUDA work
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    if opt.get('num_gpu', 0) != 0 and not torch.cuda.is_available():
        print(f"num_gpu: {opt['num_gpu']} was requested but no CUDA device is available; running on the CPU "
              "(set num_gpu: 0 or auto to silence this).", flush=True)
        opt['num_gpu'] = 0
    return opt, args


# --- 8. ``train_pipeline``/``test_pipeline`` create the output folders, and archive an existing one, BEFORE
#        the datasets and the network are built, and read many options only when they are first needed: a
#        typo in the option file (a loss, optimizer, scheduler or metric type, a missing ``total_iter``, a
#        batch size of 0, a missing weights file, a crop larger than the images, a channel mismatch) moves
#        the previous run away and leaves an empty experiment behind. Check all of it first, without logging.
#: ``basicsr train --check_data``: also decode every training and validation image up front.
CHECK_DATA = {'enabled': False}
_VALIDATED = set()


def validate_options(opt: dict) -> None:
    """Check the options, build every dataset and the network once: bad keys/values fail before any folder."""
    from copy import deepcopy

    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

    from nl_plugin.weights import build_network
    model_cls = MODEL_REGISTRY.get(opt['model_type'])
    if hasattr(model_cls, 'validate_options'):
        model_cls.validate_options(opt)
    config_checks.check_options(opt)
    datasets = {}
    for phase, ds_opt in opt.get('datasets', {}).items():
        ds_opt = deepcopy(ds_opt)
        try:
            datasets[phase] = DATASET_REGISTRY.get(ds_opt.get('type'))(ds_opt)
        except (KeyError, ValueError, FileNotFoundError, OSError) as err:
            raise type(err)(f'datasets:{phase}: {err}') from err
    nets = {}
    for key in [k for k in opt if k.startswith('network_')]:
        try:
            nets[key] = build_network(opt[key], where=key, device='meta')
        except (KeyError, ValueError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise type(err)(msg if msg.startswith(key) else f'{key}: {msg}') from err
    out_ch = None
    if 'network_g' in opt:
        out_ch = config_checks.output_channels(opt['network_g'], ARCH_REGISTRY.get(opt['network_g'].get('type')))
    from basicsr.utils.dist_util import get_dist_info
    config_checks.check_data(datasets, nets.get('network_g'), out_ch,
                             full=CHECK_DATA['enabled'] and get_dist_info()[0] == 0)


def _validate_once(opt):
    if id(opt) not in _VALIDATED:
        validate_options(opt)
        _VALIDATED.add(id(opt))


def make_exp_dirs(opt: dict) -> None:
    _validate_once(opt)
    _apply_determinism(opt)
    _ORIGINAL['make_exp_dirs'](opt)


# --- 9. ``save_network``/``save_training_state`` write with plain ``torch.save`` to the final name (a kill
#        leaves a torn file that blocks --auto_resume), retry three times and then log "Just ignore it."
#        and go on (a full disk ends in exit 0 with empty checkpoints), and write NaN weights as readily as
#        any. Write atomically, refuse non-finite weights, raise naming the file; keep every process's RNG.
def save_network(self, net: torch.nn.Module, net_label: str, current_iter: int, param_key: str = 'params') -> None:
    from nl_plugin import checkpoint
    checkpoint.save_network(self, net, net_label, current_iter, param_key)


def save_training_state(self, epoch: int, current_iter: int) -> None:
    from nl_plugin import checkpoint
    checkpoint.save_training_state(self, epoch, current_iter)


# --- 10. A resumed run restarts its epoch from the first batch (samples trained on twice) with fresh RNG
#         streams. Start after the batches already done and restore the saved RNG states (see
#         ``nl_plugin.checkpoint``), and log what --auto_resume skipped.
def create_train_val_dataloader(opt: dict, logger) -> tuple:
    from nl_plugin import checkpoint
    result = _ORIGINAL['create_train_val_dataloader'](opt, logger)
    for message in _REPORTS:
        logger.warning(message)
    _REPORTS.clear()
    checkpoint.apply_pending_resume(result[0], result[1], logger)
    return result


# --- 11. ``model_ema`` averages ``named_parameters()`` only: the EMA copy keeps BatchNorm running statistics
#         of 0 and 1 and validates / is saved with untrained statistics. Average floating-point buffers with
#         the same decay (integer ones, e.g. ``num_batches_tracked``, are copied), and under several
#         processes take rank 0's buffers (DDP broadcasts rank 0's, and rank 0 saves the EMA).
def model_ema(self, decay: float = 0.999) -> None:
    net_g = self.get_bare_model(self.net_g)
    ema_params = dict(self.net_g_ema.named_parameters())
    with torch.no_grad():
        for name, p in net_g.named_parameters():
            ema_params[name].mul_(decay).add_(p, alpha=1 - decay)
        ema_buffers = dict(self.net_g_ema.named_buffers())
        for name, b in net_g.named_buffers():
            if torch.is_floating_point(b):
                ema_buffers[name].mul_(decay).add_(b, alpha=1 - decay)
            else:
                ema_buffers[name].copy_(b)
    broadcast_buffers(self.net_g_ema)


def broadcast_buffers(net: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (no-op in a single process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in net.buffers():
            dist.broadcast(b, src=0)


# --- 12. ``load_network`` reads ``pretrain_network_g`` with ``torch.load`` without ``weights_only``, which
#         ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into a full unpickler (a crafted file runs code).
#         Always ``weights_only=True``, with a one-line error naming the file.
def load_network(self, net: torch.nn.Module, load_path: str, strict: bool = True,
                 param_key: str | None = 'params') -> None:
    from nl_plugin import checkpoint
    checkpoint.load_network(self, net, load_path, strict, param_key)


# --- 13. BasicSR has no switch for deterministic algorithms and sets ``cudnn.benchmark = True`` (which picks
#         convolution algorithms by timing). ``deterministic: true`` (top level) turns on PyTorch's
#         deterministic algorithms (warning on ops that have none) and turns cuDNN benchmarking off.
def _apply_determinism(opt):
    if not opt.get('deterministic'):
        return
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


# --- 14. ``train_pipeline``/``test_pipeline`` return without destroying the process group: under torchrun a
#         finished rank then sometimes aborts at interpreter exit (gloo's threads still hold work objects:
#         "terminate called without an active exception", exit 1). Synchronise and tear it down first.
def _finish_distributed():
    import gc

    import torch.distributed as dist
    gc.collect()  # drop data loader iterators / workers before the group goes
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_pipeline(root_path: str) -> None:
    _ORIGINAL['train_pipeline'](root_path)
    _finish_distributed()


def test_pipeline(root_path: str) -> None:
    _ORIGINAL['test_pipeline'](root_path)
    _finish_distributed()



# --- 15. ``basicsr test`` builds every test set and stops at the first folder that is missing, so a test option
#         file naming several sets (Set12, BSD68, Urban100) runs none of them while one is not there. Skip each
#         missing one with one line naming it and how to get it; the others run. With none present, the usual
#         error (fix 8) names the first.
def skip_missing_test_sets(opt):
    """Drop the datasets of a test run whose ``dataroot_gt`` / ``dataroot_lq`` does not exist (one line each)."""
    from nl_plugin.data.prepare import how_to_prepare
    sets = opt.get('datasets') or {}
    missing = {}
    for phase, ds in sets.items():
        roots = [ds.get(k) for k in ('dataroot_gt', 'dataroot_lq') if isinstance(ds, dict) and ds.get(k)]
        gone = [r for r in roots if not os.path.exists(r)]
        if gone:
            missing[phase] = (ds.get('name', phase), gone[0])
    if not missing or len(missing) == len(sets):
        return opt
    for phase, (name, root) in missing.items():
        del sets[phase]
        if opt.get('rank', 0) == 0:
            parent, base = os.path.split(os.path.normpath(root))
            print(f'test set {name} skipped: {root} not found; {how_to_prepare(base, parent or ".")}',
                  file=sys.stderr, flush=True)
    return opt


def parse_test_options(root_path: str, is_train: bool = False) -> tuple[dict, object]:
    """``parse_options`` of ``basicsr test`` (fix 7), less the test sets that are not there (fix 15)."""
    opt, args = parse_options(root_path, is_train=is_train)
    return skip_missing_test_sets(opt), args


_ORIGINAL = {}


def apply() -> None:
    """Apply every fix once. Safe to call again."""
    global _APPLIED
    if _APPLIED:
        return
    _alias_functional_tensor()

    import basicsr.archs
    import basicsr.models.base_model as base_model
    import basicsr.models.sr_model as sr_model
    import basicsr.test as bsr_test
    import basicsr.train as bsr_train
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options as options
    import basicsr.utils.registry as registry

    _ORIGINAL['init_dist'] = dist_util.init_dist
    dist_util.init_dist = init_dist
    options.init_dist = init_dist  # parse_options holds its own reference
    _ORIGINAL['parse_options'] = options.parse_options
    options.parse_options = bsr_train.parse_options = bsr_test.parse_options = parse_options
    base_model.BaseModel.model_to_device = model_to_device
    bsr_train.load_resume_state = load_resume_state
    _ORIGINAL['make_exp_dirs'] = bsr_train.make_exp_dirs
    bsr_train.make_exp_dirs = bsr_test.make_exp_dirs = make_exp_dirs
    base_model.BaseModel.save_network = save_network
    base_model.BaseModel.save_training_state = save_training_state
    _ORIGINAL['create_train_val_dataloader'] = bsr_train.create_train_val_dataloader
    bsr_train.create_train_val_dataloader = create_train_val_dataloader
    from nl_plugin import checkpoint
    bsr_train.EnlargedSampler = checkpoint.ResumableSampler
    base_model.BaseModel.model_ema = model_ema
    base_model.BaseModel.load_network = load_network
    _ORIGINAL['train_pipeline'] = bsr_train.train_pipeline
    _ORIGINAL['test_pipeline'] = bsr_test.test_pipeline
    bsr_train.train_pipeline = train_pipeline
    bsr_test.test_pipeline = test_pipeline
    registry.Registry.get = registry_get
    basicsr.archs.build_network = build_network
    sr_model.build_network = build_network  # SRModel imported the name directly
    bsr_test.parse_options = parse_test_options  # fix 15 (on top of fix 7)
    _APPLIED = True
