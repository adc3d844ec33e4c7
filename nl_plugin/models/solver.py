"""The solver half of ``RestorationModel``: optimizers, learning-rate schedules and gradient clipping.

YAML (``train:``)::

    optim_g: {type: Adam, lr: 1e-3, weight_decay: 1e-4, no_weight_decay: ['bias$']}  # TFAdam: TF1's eps
    scheduler: {type: ExponentialDecayLR, lr_end: 1e-6, decay_every: 1600}   # or any BasicSR scheduler
    grad_clip: {mode: per_tensor, max_norm: 2.5}            # global_norm | per_tensor | value
"""
import re
from copy import deepcopy

import torch
from basicsr.utils import get_root_logger

from nl_plugin.models.tf_adam import TFAdam

CLIP_MODES = ('global_norm', 'per_tensor', 'value')
OPTIMIZERS = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD,
              'RMSprop': torch.optim.RMSprop, 'TFAdam': TFAdam}
NAN_POLICIES = ('stop', 'skip')


def check_keys(section, allowed, where):
    """Raise ``KeyError`` naming the keys of ``section`` that are not in ``allowed``."""
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise KeyError(f'{where}: unknown option key(s) {unknown}; valid keys: {sorted(allowed)}')


class SolverMixin:
    """Optimizer with per-parameter weight decay, ``ExponentialDecayLR`` and gradient clipping for a BasicSR model."""

    @staticmethod
    def _validate_solver(train):
        """Optimizer, scheduler, EMA and NaN policy options: one error naming the key."""
        from nl_plugin.config_checks import check_optimizer, check_scheduler
        check_optimizer(train.get('optim_g'), OPTIMIZERS, ignore=('no_weight_decay',))
        sched = train.get('scheduler')
        if isinstance(sched, dict) and sched.get('type') == 'ExponentialDecayLR':
            check_keys(sched, {'type', 'lr_end', 'decay_iter', 'decay_every'}, 'train:scheduler')
            if 'lr_end' not in sched:
                raise KeyError('train:scheduler: ExponentialDecayLR needs lr_end')
        elif sched is not None:
            check_scheduler(sched, extra=('ExponentialDecayLR',))
        decay = train.get('ema_decay', 0)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f'train:ema_decay must be a number in [0, 1) (0 = no EMA), got {decay!r}')
        if train.get('nan_policy', 'stop') not in NAN_POLICIES:
            raise ValueError(f'train:nan_policy must be one of {NAN_POLICIES}, got {train.get("nan_policy")!r}')

    def setup_optimizers(self):
        """Adam/AdamW/SGD/RMSprop with weight decay on all parameters but those matching ``no_weight_decay``."""
        optim_opt = deepcopy(self.opt['train']['optim_g'])
        optim_type = optim_opt.pop('type')
        no_decay = [re.compile(p) for p in optim_opt.pop('no_weight_decay', None) or []]
        decay, plain = [], []
        for name, p in self.net_g.named_parameters():
            if not p.requires_grad:
                get_root_logger().warning(f'Params {name} will not be optimized.')
                continue
            (plain if any(r.search(name) for r in no_decay) else decay).append(p)
        groups = [{'params': decay}]
        if plain:
            groups.append({'params': plain, 'weight_decay': 0.0})
        self.optimizer_g = self.get_optimizer(optim_type, groups, **optim_opt)
        self.optimizers.append(self.optimizer_g)

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        if optim_type not in OPTIMIZERS:
            raise ValueError(f'train:optim_g:type must be one of {tuple(OPTIMIZERS)}, got {optim_type!r}')
        return OPTIMIZERS[optim_type](params, lr, **kwargs)

    def setup_schedulers(self):
        """BasicSR's schedulers plus ``ExponentialDecayLR`` (N3Net: lr decays geometrically to ``lr_end``).

        ``ExponentialDecayLR`` keys: ``lr_end``, the lr after ``decay_iter`` iterations (default
        ``train:total_iter``), and ``decay_every`` (default 1): the lr changes every that many iterations,
        ``lr(i) = lr * (lr_end / lr)^(decay_every * floor((i - 1) / decay_every) / decay_iter)`` at
        iteration i (N3Net's code: ``1e-3 * 10^(-3e/50)`` in epoch e = ``lr_end: 1e-6`` with
        ``decay_every`` = iterations per epoch). ``torch.optim.lr_scheduler.StepLR`` stepped per iteration.
        """
        sched = deepcopy(self.opt['train']['scheduler'])
        if sched.get('type') != 'ExponentialDecayLR':
            saved = self.opt['train']['scheduler']
            self.opt['train']['scheduler'] = sched  # BasicSR pops 'type' from the dict it reads
            try:
                super().setup_schedulers()
            finally:
                self.opt['train']['scheduler'] = saved
            return
        check_keys(sched, {'type', 'lr_end', 'decay_iter', 'decay_every'}, 'train:scheduler')
        decay_iter = int(sched.get('decay_iter', self.opt['train']['total_iter']))
        every = int(sched.get('decay_every', 1))
        if every < 1:
            raise ValueError(f'train:scheduler:decay_every must be a positive integer, got {every}')
        for optimizer in self.optimizers:
            lr0 = optimizer.param_groups[0]['lr']
            gamma = (float(sched['lr_end']) / lr0)**(every / decay_iter)
            self.schedulers.append(torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=gamma))

    def _clip_gradients(self):
        clip = self.opt['train'].get('grad_clip')
        if not clip:
            return
        mode = clip.get('mode', 'global_norm')
        limit = float(clip['max_value' if mode == 'value' else 'max_norm'])
        if clip.get('divide_by_lr'):    # VDSR's adjustable clipping: theta / current lr
            limit /= self.optimizer_g.param_groups[0]['lr']
        params = [p for p in self.net_g.parameters() if p.grad is not None]
        if mode == 'global_norm':
            torch.nn.utils.clip_grad_norm_(params, limit)
        elif mode == 'value':   # VDSR paper: every gradient element clipped to [-limit, limit]
            torch.nn.utils.clip_grad_value_(params, limit)
        else:  # NLRN's code: tf.clip_by_norm on each variable, g * c / max(||g||, c)
            for p in params:
                norm = p.grad.norm()
                p.grad.mul_(limit / torch.clamp(norm, min=limit))
