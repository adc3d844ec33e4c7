"""``RestorationModel``: BasicSR's ``SRModel`` with what NLRN's and N3Net's protocols need.

YAML (besides everything ``SRModel`` reads)::

    residual_learning: false        # output = input + net(input), for archs that do not add it
    train:
      optim_g: {type: Adam, lr: 1e-3, weight_decay: 1e-4, no_weight_decay: ['bias$']}
      precision: fp32               # or bf16 | fp16 | auto: autocast dtype (nl_plugin.models.precision)
      scheduler: {type: ExponentialDecayLR, lr_end: 1e-8}     # or any BasicSR scheduler
      grad_clip: {mode: per_tensor, max_norm: 2.5}            # or mode: global_norm
      progress_bar: true                                      # tqdm bar on rank 0
    val:
      self_ensemble: false          # x8 flips/rotations (NLRN-MV)
      tile: {size: 45, stride: 7, batch: 100}                 # or {size, overlap, batch}
      precision: fp32               # or bf16 | fp16 | auto, for validation and `basicsr test`
      metrics: {psnr: {type: calculate_psnr, crop_border: 0, test_y_channel: false}}

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

from nl_plugin.ops.tiling import self_ensemble, tiled_forward

from .precision import ModelPrecision

_TRAIN_KEYS = {'total_iter', 'warmup_iter', 'ema_decay', 'optim_g', 'scheduler', 'pixel_opt', 'perceptual_opt',
               'grad_clip', 'progress_bar', 'precision'}
_VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'pbar', 'metrics', 'self_ensemble', 'tile', 'precision'}
_TILE_KEYS = {'size', 'stride', 'overlap', 'batch'}
_CLIP_MODES = ('global_norm', 'per_tensor')


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
        self.precision = ModelPrecision(opt, self.device, get_root_logger())
        self._expected_in_ch = self._first_layer_channels(self.get_bare_model(self.net_g))
        self._pbar = None

    # ------------------------------------------------------------------ options
    @staticmethod
    def validate_options(opt):
        """Raise ``KeyError``/``ValueError`` naming any unknown or bad ``train``/``val`` option."""
        if opt.get('is_train'):
            if 'train' not in opt:
                raise KeyError('option "train" is missing')
            _check_keys(opt['train'], _TRAIN_KEYS, 'train')
            clip = opt['train'].get('grad_clip')
            if clip is not None:
                _check_keys(clip, {'mode', 'max_norm'}, 'train:grad_clip')
                if clip.get('mode', 'global_norm') not in _CLIP_MODES:
                    raise ValueError(f'train:grad_clip:mode must be one of {_CLIP_MODES}, got {clip.get("mode")!r}')
                if not float(clip.get('max_norm', 0)) > 0:
                    raise ValueError(f'train:grad_clip:max_norm must be > 0, got {clip.get("max_norm")!r}')
        ModelPrecision.check_options(opt)
        val = opt.get('val')
        if val is not None:
            _check_keys(val, _VAL_KEYS, 'val')
            tile = val.get('tile')
            if tile is not None:
                _check_keys(tile, _TILE_KEYS, 'val:tile')
                if int(tile.get('size', 0)) <= 0:
                    raise ValueError(f'val:tile:size must be a positive integer, got {tile.get("size")!r}')

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
        supported = ('Adam', 'AdamW', 'SGD', 'RMSprop')
        if optim_type not in supported:
            raise ValueError(f'train:optim_g:type must be one of {supported}, got {optim_type!r}')
        return getattr(torch.optim, optim_type)(params, lr, **kwargs)

    def setup_schedulers(self):
        """BasicSR's schedulers plus ``ExponentialDecayLR`` (N3Net: lr decays geometrically to ``lr_end``).

        ``ExponentialDecayLR`` keys: ``lr_end`` (reached after ``decay_iter`` iterations; default
        ``train:total_iter``). Implemented as ``torch.optim.lr_scheduler.ExponentialLR`` stepped per iteration.
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
        _check_keys(sched, {'type', 'lr_end', 'decay_iter'}, 'train:scheduler')
        decay_iter = int(sched.get('decay_iter', self.opt['train']['total_iter']))
        for optimizer in self.optimizers:
            lr0 = optimizer.param_groups[0]['lr']
            gamma = (float(sched['lr_end']) / lr0)**(1.0 / max(decay_iter - 1, 1))
            self.schedulers.append(torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma))

    def _clip_gradients(self):
        clip = self.opt['train'].get('grad_clip')
        if not clip:
            return
        max_norm = float(clip['max_norm'])
        params = [p for p in self.net_g.parameters() if p.grad is not None]
        if clip.get('mode', 'global_norm') == 'global_norm':
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:  # NLRN's code: tf.clip_by_norm on each variable, g * c / max(||g||, c)
            for p in params:
                norm = p.grad.norm()
                p.grad.mul_(max_norm / torch.clamp(norm, min=max_norm))

    def _forward(self, net, x):
        out = self.precision.run(net, x, training=torch.is_grad_enabled())
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

    def optimize_parameters(self, current_iter):
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
        self._check_finite(l_total, current_iter)
        self.precision.backward(l_total, self.optimizer_g)
        self._clip_gradients()
        self.precision.step(self.optimizer_g)
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        self._update_progress(current_iter)

    def _check_finite(self, loss, current_iter):
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
        if self.opt['dist']:
            dist.all_reduce(bad)  # every rank must stop together, or the others hang in backward
        if bad.item() > 0:
            raise FloatingPointError(
                f'iter {current_iter}: the training loss is not finite ({loss.item()}) on at least one '
                f'process. Nothing was saved for this iteration; checkpoints already written in '
                f'{self.opt["path"].get("models")} are kept. Lower train:optim_g:lr or add train:grad_clip.')

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

    def _write_csv(self, dataset_name, rows):
        path = osp.join(self.opt['path']['results_root'], f'{dataset_name}_metrics.csv')
        os.makedirs(osp.dirname(path), exist_ok=True)
        fields = [k for k in rows[0] if k != 'index']
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f'{v:.4f}' if isinstance(v, float) else v) for k, v in r.items()})
            means = {k: sum(r[k] for r in rows) / len(rows) for k in fields if isinstance(rows[0][k], float)}
            if means:
                writer.writerow({'image': 'MEAN', **{k: f'{v:.4f}' for k, v in means.items()}})
        get_root_logger().info(f'Per-image metrics written to {path}')

    def save(self, epoch, current_iter):
        if self._pbar is not None and current_iter == -1:
            self._pbar.close()
        super().save(epoch, current_iter)


__all__ = ['RestorationModel']
