"""Every correction nl_plugin makes to BasicSR 1.4.2 on today's stack, in one place.

``import nl_plugin`` calls :func:`apply` before anything imports BasicSR's subpackages. No installed
file is edited: each fix rebinds one attribute, and the comment above it names the BasicSR behaviour
it corrects. Keep this module the only place that knows about BasicSR's quirks.
"""
import collections
import difflib
import importlib
import inspect
import os
import sys

import torch

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
def init_dist(launcher, backend=None, **kwargs):
    """BasicSR's ``init_dist`` that also works on CPU (gloo) and picks the GPU by LOCAL_RANK."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from basicsr.utils import dist_util

    if launcher != 'pytorch':
        return _ORIGINAL['init_dist'](launcher, backend=backend or 'nccl', **kwargs)
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if backend is None:
        backend = 'nccl' if use_cuda else 'gloo'
    if use_cuda:
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', 0)))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, **kwargs)
    del dist_util  # imported only to make sure the original module is loaded


# --- 3. ``BaseModel.model_to_device`` wraps DDP with ``device_ids=[torch.cuda.current_device()]``,
#        which fails without a GPU; DDP on CPU must be built without device ids.
def model_to_device(self, net):
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
#        ``collections.Counter`` which ``torch.load(weights_only=True)`` (the default) refuses.
def load_resume_state(opt):
    """Find (``--auto_resume``) or read (``path.resume_state``) a training state on any device."""
    from basicsr.utils import check_resume, scandir
    state_path = None
    if opt['auto_resume']:
        state_dir = opt['path']['training_states']
        if os.path.isdir(state_dir):
            iters = [int(v[:-len('.state')]) for v in scandir(state_dir, suffix='.state', recursive=False)
                     if v[:-len('.state')].isdigit()]
            if iters:
                state_path = os.path.join(state_dir, f'{max(iters)}.state')
                opt['path']['resume_state'] = state_path
    elif opt['path'].get('resume_state'):
        state_path = opt['path']['resume_state']
    if state_path is None:
        return None
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f'path.resume_state: training state {state_path!r} does not exist')
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    with torch.serialization.safe_globals([collections.Counter]):
        state = torch.load(state_path, map_location=device, weights_only=True)
    check_resume(opt, state['iter'])
    return state


# --- 5. ``Registry.get`` prints a misleading "use name: X_basicsr!" line on every miss and its error
#        lists no alternatives; a typo in ``type:`` should say what exists.
def registry_get(self, name, suffix='basicsr'):
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
def build_network(opt):
    """``basicsr.archs.build_network`` with an error naming the offending ``network_*`` key."""
    from copy import deepcopy

    from basicsr.utils import get_root_logger
    from basicsr.utils.registry import ARCH_REGISTRY
    opt = deepcopy(opt)
    if 'type' not in opt:
        raise KeyError(f'network: the option "type" is missing in {dict(opt)}')
    arch = ARCH_REGISTRY.get(opt.pop('type'))
    check_kwargs(arch, opt, where=f'network {arch.__name__}')
    net = arch(**opt)
    get_root_logger().info(f'Network [{net.__class__.__name__}] is created.')
    return net


def check_kwargs(fn, kwargs, where):
    """Raise a ``KeyError`` naming every key in ``kwargs`` that ``fn`` does not accept."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k, p in params.items() if k != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    bad = [k for k in kwargs if k not in valid]
    if bad:
        hints = ''.join(f' ({k!r}: did you mean {difflib.get_close_matches(k, valid, n=1)[0]!r}?)'
                        for k in bad if difflib.get_close_matches(k, valid, n=1))
        raise KeyError(f'{where}: unknown option key(s) {bad}{hints}. Valid keys: {valid}')


# --- 7. ``parse_options`` keeps ``num_gpu: 1`` (common in BasicSR option files) on a machine without a GPU,
#        and the model then fails deep inside ``.to('cuda')``. Fall back to the CPU with a clear warning.
def parse_options(root_path, is_train=True):
    opt, args = _ORIGINAL['parse_options'](root_path, is_train=is_train)
    if opt.get('num_gpu', 0) != 0 and not torch.cuda.is_available():
        print(f"num_gpu: {opt['num_gpu']} was requested but no CUDA device is available; running on the CPU "
              "(set num_gpu: 0 or auto to silence this).", flush=True)
        opt['num_gpu'] = 0
    return opt, args


# --- 8. ``train_pipeline``/``test_pipeline`` create the output folders, and archive an existing one, BEFORE
#        the datasets and the network are built: a typo in the option file moves the previous run away
#        and leaves an empty experiment behind. Build (and so validate) them first, without logging.
def validate_options(opt):
    """Build every dataset and the network once so that bad keys/values fail before any folder is touched."""
    from copy import deepcopy

    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY
    model_cls = MODEL_REGISTRY.get(opt['model_type'])
    if hasattr(model_cls, 'validate_options'):
        model_cls.validate_options(opt)
    for phase, ds_opt in opt.get('datasets', {}).items():
        ds_opt = deepcopy(ds_opt)
        try:
            DATASET_REGISTRY.get(ds_opt.get('type'))(ds_opt)
        except (KeyError, ValueError, FileNotFoundError, OSError) as err:
            raise type(err)(f'datasets:{phase}: {err}') from err
    for key in [k for k in opt if k.startswith('network_')]:
        net_opt = deepcopy(opt[key])
        arch = ARCH_REGISTRY.get(net_opt.pop('type', None))
        check_kwargs(arch, net_opt, where=f'{key} ({arch.__name__})')
        try:
            with torch.device('meta'):
                arch(**net_opt)
        except (KeyError, ValueError) as err:
            raise type(err)(f'{key}: {err}') from err


def make_exp_dirs(opt):
    validate_options(opt)
    _ORIGINAL['make_exp_dirs'](opt)


_ORIGINAL = {}


def apply():
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
    registry.Registry.get = registry_get
    basicsr.archs.build_network = build_network
    sr_model.build_network = build_network  # SRModel imported the name directly
    _APPLIED = True
