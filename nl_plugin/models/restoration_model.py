"""``RestorationModel``: BasicSR's ``SRModel`` with what NLRN's and N3Net's protocols need.

YAML (besides everything ``SRModel`` reads)::

    residual_learning: false        # output = input + net(input), for archs that do not add it
    train:
      optim_g: {type: Adam, lr: 1e-3, weight_decay: 1e-4, no_weight_decay: ['bias$']}  # TFAdam: TF1's eps
      scheduler: {type: ExponentialDecayLR, lr_end: 1e-6, decay_every: 1600}   # or any BasicSR scheduler
      grad_clip: {mode: per_tensor, max_norm: 2.5}            # global_norm | per_tensor | value
      progress_bar: true                                      # tqdm bar on rank 0
      ema_decay: 0.999              # also validate/save an EMA of the weights and BN statistics
      nan_policy: stop              # or skip: a step with a non-finite loss or gradient is not applied
    val:
      self_ensemble: false          # x8 flips/rotations (NLRN-MV)
      tile: {size: 45, stride: 7, batch: 100}                 # or {size, overlap, batch}
      metrics: {psnr: {type: calculate_psnr, crop_border: 0, test_y_channel: false}}

Device options (top level; ``nl_plugin.models.device_options``)::

    tf32: true                      # CUDA: TF32 for fp32 matmuls and convs
    channels_last: true             # CUDA: channels-last weights and inputs (default true on CUDA)
    compile: false                  # torch.compile the network (training and validation); falls back to eager

With ``logger:use_tb_logger: true``, training validation also sends degraded | restored | ground truth crops
of the first images to TensorBoard, next to BasicSR's loss and metric curves.

Validation runs on every process of a distributed job: images are split across ranks and the metrics
gathered (BasicSR's ``dist_validation`` runs rank 0 only). ``basicsr test`` also writes one CSV per
dataset with the metrics of every image (and of the degraded input, where it has the target's shape).
"""
import csv
import os
import re
from collections import OrderedDict
from copy import deepcopy
from os import path as osp

import torch
import torch.distributed as dist
from torch.utils.data import default_collate
from tqdm import tqdm

from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.color_util import ycbcr2bgr
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import MODEL_REGISTRY

from nl_plugin import weights
from nl_plugin.compat import broadcast_buffers
from nl_plugin.fileio import atomic_write
from nl_plugin.models.tf_adam import TFAdam
from nl_plugin.analysis.strips import comparison_strip
from nl_plugin.ops.tiling import self_ensemble, tiled_forward

from .device_options import CompiledNetworks, channels_last, check_device_options, set_tf32

_TRAIN_KEYS = {'total_iter', 'warmup_iter', 'ema_decay', 'optim_g', 'scheduler', 'pixel_opt', 'perceptual_opt',
               'grad_clip', 'progress_bar', 'nan_policy'}
_VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'pbar', 'metrics', 'self_ensemble', 'tile'}
_TILE_KEYS = {'size', 'stride', 'overlap', 'batch'}
_CLIP_MODES = ('global_norm', 'per_tensor', 'value')
_OPTIMIZERS = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW, 'SGD': torch.optim.SGD,
               'RMSprop': torch.optim.RMSprop, 'TFAdam': TFAdam}
_NAN_POLICIES = ('stop', 'skip')
#: nan_policy: skip gives up after this many skipped steps in a row (the run is not recovering).
MAX_SKIPPED_STEPS = 100


def _check_keys(section, allowed, where):
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise KeyError(f'{where}: unknown option key(s) {unknown}; valid keys: {sorted(allowed)}')


@MODEL_REGISTRY.register()
class RestorationModel(SRModel):
    """Single-image restoration model (denoising or SR on upsampled input) for NLRN, N3Net and baselines.

    Args:
        opt (dict): The parsed BasicSR option dict (see the module docstring for the extra keys).
    """

    def __init__(self, opt):
        self.validate_options(opt)
        self.residual_learning = bool(opt.get('residual_learning', False))
        super().__init__(opt)
        self._expected_in_ch = self._first_layer_channels(self.get_bare_model(self.net_g))
        self._pbar = None

    # ------------------------------------------------------------------ options
    @staticmethod
    def validate_options(opt):
        """Raise ``KeyError``/``ValueError`` naming any unknown or bad ``train``/``val`` option."""
        weights.check_save_format((opt.get('path') or {}).get('save_format'))
        if opt.get('is_train'):
            if 'train' not in opt:
                raise KeyError('option "train" is missing')
            _check_keys(opt['train'], _TRAIN_KEYS, 'train')
            RestorationModel._validate_solver(opt['train'])
            clip = opt['train'].get('grad_clip')
            if clip is not None:
                _check_keys(clip, {'mode', 'max_norm', 'max_value', 'divide_by_lr'}, 'train:grad_clip')
                if clip.get('mode', 'global_norm') not in _CLIP_MODES:
                    raise ValueError(f'train:grad_clip:mode must be one of {_CLIP_MODES}, got {clip.get("mode")!r}')
                key = 'max_value' if clip.get('mode') == 'value' else 'max_norm'
                if not float(clip.get(key, 0)) > 0:
                    raise ValueError(f'train:grad_clip:{key} must be > 0, got {clip.get(key)!r}')
        val = opt.get('val')
        if val is not None:
            _check_keys(val, _VAL_KEYS, 'val')
            tile = val.get('tile')
            if tile is not None:
                _check_keys(tile, _TILE_KEYS, 'val:tile')
                if int(tile.get('size', 0)) <= 0:
                    raise ValueError(f'val:tile:size must be a positive integer, got {tile.get("size")!r}')
        check_device_options(opt)

    @staticmethod
    def _validate_solver(train):
        """Optimizer, scheduler, EMA and NaN policy options: one error naming the key."""
        from nl_plugin.config_checks import check_optimizer, check_scheduler
        check_optimizer(train.get('optim_g'), _OPTIMIZERS, ignore=('no_weight_decay',))
        sched = train.get('scheduler')
        if isinstance(sched, dict) and sched.get('type') == 'ExponentialDecayLR':
            _check_keys(sched, {'type', 'lr_end', 'decay_iter', 'decay_every'}, 'train:scheduler')
            if 'lr_end' not in sched:
                raise KeyError('train:scheduler: ExponentialDecayLR needs lr_end')
        elif sched is not None:
            check_scheduler(sched, extra=('ExponentialDecayLR',))
        decay = train.get('ema_decay', 0)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f'train:ema_decay must be a number in [0, 1) (0 = no EMA), got {decay!r}')
        if train.get('nan_policy', 'stop') not in _NAN_POLICIES:
            raise ValueError(f'train:nan_policy must be one of {_NAN_POLICIES}, got {train.get("nan_policy")!r}')

    @staticmethod
    def _first_layer_channels(net):
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                return m.in_channels
            if isinstance(m, torch.nn.BatchNorm2d):
                return m.num_features
        return None

    # ------------------------------------------------------------------ optimisation
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
        if optim_type not in _OPTIMIZERS:
            raise ValueError(f'train:optim_g:type must be one of {tuple(_OPTIMIZERS)}, got {optim_type!r}')
        return _OPTIMIZERS[optim_type](params, lr, **kwargs)

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
        _check_keys(sched, {'type', 'lr_end', 'decay_iter', 'decay_every'}, 'train:scheduler')
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

    # ------------------------------------------------------------------ device: TF32, channels-last, compile
    def model_to_device(self, net):
        """TF32 and channels-last are set before BasicSR moves the network (and DDP registers its parameters)."""
        set_tf32(self.opt, self.device)
        if channels_last(self.opt, self.device):
            net = net.to(memory_format=torch.channels_last)
        return super().model_to_device(net)

    def _run_network(self, net, x):
        """``net(x)``: channels-last input where the network is; compiled with ``compile:``."""
        if channels_last(self.opt, self.device):
            x = x.contiguous(memory_format=torch.channels_last)
        return self._compiler()(net, x)

    def _compiler(self):
        if '_compiled' not in self.__dict__:
            self._compiled = CompiledNetworks(self.opt.get('compile', False), get_root_logger().warning)
        return self._compiled

    def optimize_parameters(self, current_iter):
        """One iteration; if compiling its backward fails (the forward falls back in ``_run_network``), the
        iteration reruns eagerly."""
        compiler = self._compiler()
        if not compiler.active(self.net_g):
            return self._optimize_step(current_iter)
        try:
            return self._optimize_step(current_iter)
        except Exception as err:   # noqa: BLE001
            if isinstance(err, (FloatingPointError, torch.cuda.OutOfMemoryError)) or not compiler.active(self.net_g):
                raise
            compiler.disable(self.net_g, err)
            return self._optimize_step(current_iter)

    def _forward(self, net, x):
        out = self._run_network(net, x)
        if self.residual_learning:
            out = out + x[:, :out.shape[1]]
        return out

    def feed_data(self, data):
        lq = data['lq']
        if self._expected_in_ch is not None and lq.shape[1] != self._expected_in_ch:
            src = data.get('lq_path', ['<batch>'])
            raise ValueError(f'{src[0]}: input has {lq.shape[1]} channels but network_g expects '
                             f'{self._expected_in_ch} (check the dataset colour option and num_in_ch)')
        super().feed_data(data)
        self.cbcr = data['cbcr'].to(self.device) if 'cbcr' in data else None

    def _optimize_step(self, current_iter):
        self.optimizer_g.zero_grad()
        self.output = self._forward(self.net_g, self.lq)
        l_total = 0
        loss_dict = OrderedDict()
        if self.cri_pix:
            l_pix = self.cri_pix(self.output, self.gt)
            l_total = l_total + l_pix
            loss_dict['l_pix'] = l_pix
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            for key, val in (('l_percep', l_percep), ('l_style', l_style)):
                if val is not None:
                    l_total = l_total + val
                    loss_dict[key] = val
        skip = self.opt['train'].get('nan_policy', 'stop') == 'skip'
        if not self._loss_is_finite(l_total, current_iter, stop=not skip):
            self._skip_step(current_iter, 'loss', loss_dict)
            return
        l_total.backward()
        if skip and not all(bool(torch.isfinite(p.grad).all()) for p in self.net_g.parameters() if p.grad is not None):
            self._skip_step(current_iter, 'gradient', loss_dict)  # DDP averaged them: every rank agrees
            return
        self._skipped = 0
        self._clip_gradients()
        self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        self._update_progress(current_iter)

    def _loss_is_finite(self, loss, current_iter, stop):
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
        if self.opt['dist']:
            dist.all_reduce(bad)  # every rank must stop or skip together, or the others hang in backward
        if bad.item() > 0 and stop:
            raise FloatingPointError(
                f'iter {current_iter}: the training loss is not finite ({loss.item()}) on at least one '
                f'process. Nothing was saved for this iteration; checkpoints already written in '
                f'{self.opt["path"].get("models")} are kept. Lower train:optim_g:lr, add train:grad_clip, '
                'or set train:nan_policy: skip.')
        return bad.item() == 0

    def _skip_step(self, current_iter, what, loss_dict):
        """``nan_policy: skip``: drop this step's gradients; the weights, optimizer and EMA stay as they were."""
        self.optimizer_g.zero_grad(set_to_none=True)
        self._skipped = getattr(self, '_skipped', 0) + 1
        self.log_dict = self.reduce_loss_dict(loss_dict)
        get_root_logger().warning(f'iter {current_iter}: non-finite {what}; step skipped (train:nan_policy: skip, '
                                  f'{self._skipped} in a row)')
        if self._skipped >= MAX_SKIPPED_STEPS:
            raise FloatingPointError(f'iter {current_iter}: {self._skipped} steps in a row had a non-finite loss or '
                                     'gradient (train:nan_policy: skip); stopping. Lower train:optim_g:lr.')
        self._update_progress(current_iter)

    def _update_progress(self, current_iter):
        if not self.opt['train'].get('progress_bar') or self.opt['rank'] != 0:
            return
        total = int(self.opt['train']['total_iter'])
        if self._pbar is None:
            self._pbar = tqdm(total=total, initial=current_iter - 1, unit='iter', desc='train', dynamic_ncols=True)
        self._pbar.update(1)
        if current_iter >= total:
            self._pbar.close()

    # ------------------------------------------------------------------ inference
    def _infer(self, net, x):
        val = self.opt.get('val') or {}
        fn = lambda t: self._forward(net, t)  # noqa: E731
        tile = val.get('tile')
        if tile:
            inner = fn
            fn = lambda t: tiled_forward(  # noqa: E731
                inner, t, int(tile['size']), stride=tile.get('stride'), overlap=tile.get('overlap'),
                tile_batch=int(tile.get('batch', 1)), scale=int(self.opt.get('scale', 1) or 1)
                if self._output_is_upscaled() else 1)
        if val.get('self_ensemble'):
            return self_ensemble(fn, x)
        return fn(x)

    def _output_is_upscaled(self):
        net = self.get_bare_model(self.net_g)
        return int(getattr(net, 'upscale', 1) or 1) > 1

    def test(self):
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = self._infer(net, self.lq)
        if was_training and net is self.net_g:
            net.train()

    # ------------------------------------------------------------------ validation
    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validate(dataloader, current_iter, tb_logger, save_img)

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        self._validate(dataloader, current_iter, tb_logger, save_img)

    def _result_image(self):
        """The uint8 image to save: colour when the dataset gave bicubic Cb/Cr next to a Y-only output."""
        out = self.output.detach().cpu()
        if self.cbcr is not None and out.shape[1] == 1:
            ycbcr = torch.cat([out[0], self.cbcr.detach().cpu()[0]], 0).clamp(0, 1)
            bgr = ycbcr2bgr(ycbcr.permute(1, 2, 0).numpy())
            return (bgr.clip(0, 1) * 255.0).round().astype('uint8')
        return tensor2img([out])

    def _validate(self, dataloader, current_iter, tb_logger, save_img):
        rank, world = get_dist_info() if self.opt['dist'] else (0, 1)
        if world > 1:  # every rank validates with rank 0's BN statistics (rank 0 saves them)
            broadcast_buffers(self.get_bare_model(self.net_g))
        dataset = dataloader.dataset
        dataset_name = dataset.opt['name']
        val_opt = self.opt['val']
        metrics_opt = val_opt.get('metrics') or {}
        if metrics_opt:
            self._initialize_best_metric_results(dataset_name)
        indices = range(rank, len(dataset), world)
        pbar = tqdm(total=len(indices), unit='image') if val_opt.get('pbar') and rank == 0 else None
        rows = []
        for idx in indices:
            data = default_collate([dataset[idx]])
            img_name = osp.splitext(osp.basename(data['lq_path'][0]))[0]
            self.feed_data(data)
            self.test()
            sr_img = tensor2img([self.output.detach().cpu()])
            row = {'index': idx, 'image': img_name}
            if 'gt' in data and metrics_opt:
                gt_img = tensor2img([self.gt.detach().cpu()])
                for name, m_opt in metrics_opt.items():
                    row[name] = float(calculate_metric({'img': sr_img, 'img2': gt_img}, m_opt))
                if self.lq.shape[1:] == self.gt.shape[1:]:
                    lq_img = tensor2img([self.lq.detach().cpu()])
                    for name, m_opt in metrics_opt.items():
                        row[f'{name}_input'] = float(calculate_metric({'img': lq_img, 'img2': gt_img}, m_opt))
            rows.append(row)
            if rank == 0:
                self._log_validation_images(tb_logger, dataset_name, img_name, current_iter, idx)
            if save_img:
                if self.opt['is_train']:
                    path = osp.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
                else:
                    suffix = val_opt.get('suffix') or self.opt['name']
                    path = osp.join(self.opt['path']['visualization'], dataset_name, f'{img_name}_{suffix}.png')
                imwrite(self._result_image(), path)
            for attr in ('lq', 'gt', 'output'):
                if hasattr(self, attr):
                    delattr(self, attr)
            if pbar:
                pbar.update(1)
                pbar.set_description(f'Test {img_name}')
        if pbar:
            pbar.close()
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        rows.sort(key=lambda r: r['index'])
        if metrics_opt and rows:
            self.metric_results = {m: sum(r[m] for r in rows) / len(rows) for m in metrics_opt}
            for m, v in self.metric_results.items():
                self._update_best_metric_result(dataset_name, m, v, current_iter)
            if rank == 0:
                self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
        if not self.opt['is_train'] and rank == 0 and rows:
            self._write_csv(dataset_name, rows)

    # Validation images shown in TensorBoard: the first few of each validation set, crops of this side at most.
    tb_val_images = 4
    tb_crop = 160

    def _log_validation_images(self, tb_logger, dataset_name, img_name, current_iter, index):
        """Send degraded | restored | ground truth (centre crops, side by side) to TensorBoard.

        Runs for the first ``tb_val_images`` images of a validation set when BasicSR passes a TensorBoard
        ``SummaryWriter`` (``logger:use_tb_logger: true``, training only); does nothing otherwise.
        """
        if tb_logger is None or not hasattr(tb_logger, 'add_image') or index >= self.tb_val_images:
            return
        panels = [self.lq, self.output] + ([self.gt] if hasattr(self, 'gt') else [])
        image = comparison_strip(panels, crop=self.tb_crop)
        tb_logger.add_image(f'val_images/{dataset_name}/{img_name}', image, current_iter, dataformats='CHW')

    def _write_csv(self, dataset_name, rows):
        path = osp.join(self.opt['path']['results_root'], f'{dataset_name}_metrics.csv')
        os.makedirs(osp.dirname(path), exist_ok=True)
        fields = [k for k in rows[0] if k != 'index']

        def write(f):
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f'{v:.4f}' if isinstance(v, float) else v) for k, v in r.items()})
            means = {k: sum(r[k] for r in rows) / len(rows) for k in fields if isinstance(rows[0][k], float)}
            if means:
                writer.writerow({'image': 'MEAN', **{k: f'{v:.4f}' for k, v in means.items()}})

        atomic_write(path, write, mode='w')
        get_root_logger().info(f'Per-image metrics written to {path}')

    def save(self, epoch, current_iter):
        if self._pbar is not None and current_iter == -1:
            self._pbar.close()
        super().save(epoch, current_iter)


__all__ = ['RestorationModel']
