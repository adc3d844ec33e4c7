"""``RestorationModel``: BasicSR's ``SRModel`` with what NLRN's and N3Net's protocols need.

YAML (besides everything ``SRModel`` reads)::

    residual_learning: false        # output = input + net(input), for archs that do not add it
    train:
      optim_g: {type: Adam, lr: 1e-3, weight_decay: 1e-4, no_weight_decay: ['bias$']}  # TFAdam: TF1's eps
      precision: fp32               # or bf16 | fp16 | auto: autocast dtype (nl_plugin.models.precision)
      scheduler: {type: ExponentialDecayLR, lr_end: 1e-6, decay_every: 1600}   # or any BasicSR scheduler
      grad_clip: {mode: per_tensor, max_norm: 2.5}            # global_norm | per_tensor | value
      progress_bar: true                                      # tqdm bar on rank 0
      ema_decay: 0.999              # also validate/save an EMA of the weights and BN statistics
      nan_policy: stop              # or skip: a step with a non-finite loss or gradient is not applied
    val:
      self_ensemble: false          # x8 flips/rotations (NLRN-MV)
      tile: {size: 45, stride: 7, batch: 100}                 # or {size, overlap, batch}, or auto (arch's auto_tile)
      precision: fp32               # or bf16 | fp16 | auto, for validation and `basicsr test`
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
from collections import OrderedDict
from functools import partial

import torch
import torch.distributed as dist
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY
from tqdm import tqdm

from nl_plugin import weights
from nl_plugin.archs.arch_util import auto_tile
from nl_plugin.config_checks import input_channels
from nl_plugin.ops.tiling import self_ensemble, tiled_forward

from .device_options import CompiledNetworks, channels_last, check_device_options, set_tf32
from .precision import ModelPrecision
from .solver import CLIP_MODES, SolverMixin, check_keys
from .validation import ValidationMixin

_TRAIN_KEYS = {'total_iter', 'warmup_iter', 'ema_decay', 'optim_g', 'scheduler', 'pixel_opt', 'perceptual_opt',
               'grad_clip', 'progress_bar', 'nan_policy', 'precision'}
_VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'pbar', 'metrics', 'self_ensemble', 'tile', 'precision'}
_TILE_KEYS = {'size', 'stride', 'overlap', 'batch'}
#: nan_policy: skip gives up after this many skipped steps in a row (the run is not recovering).
MAX_SKIPPED_STEPS = 100


@MODEL_REGISTRY.register()
class RestorationModel(SolverMixin, ValidationMixin, SRModel):
    """Single-image restoration model (denoising or SR on upsampled input) for NLRN, N3Net and baselines.

    Args:
        opt (dict): The parsed BasicSR option dict (see the module docstring for the extra keys).
    """

    def __init__(self, opt):
        self.validate_options(opt)
        self.residual_learning = bool(opt.get('residual_learning', False))
        super().__init__(opt)
        self.precision = ModelPrecision(opt, self.device, get_root_logger())
        self._expected_in_ch = input_channels(self.get_bare_model(self.net_g))
        self._pbar = None

    # ------------------------------------------------------------------ options
    @staticmethod
    def validate_options(opt):
        """Raise ``KeyError``/``ValueError`` naming any unknown or bad ``train``/``val`` option."""
        weights.check_save_format((opt.get('path') or {}).get('save_format'))
        if opt.get('is_train'):
            if 'train' not in opt:
                raise KeyError('option "train" is missing')
            check_keys(opt['train'], _TRAIN_KEYS, 'train')
            RestorationModel._validate_solver(opt['train'])
            clip = opt['train'].get('grad_clip')
            if clip is not None:
                check_keys(clip, {'mode', 'max_norm', 'max_value', 'divide_by_lr'}, 'train:grad_clip')
                if clip.get('mode', 'global_norm') not in CLIP_MODES:
                    raise ValueError(f'train:grad_clip:mode must be one of {CLIP_MODES}, got {clip.get("mode")!r}')
                key = 'max_value' if clip.get('mode') == 'value' else 'max_norm'
                if not float(clip.get(key, 0)) > 0:
                    raise ValueError(f'train:grad_clip:{key} must be > 0, got {clip.get(key)!r}')
        ModelPrecision.check_options(opt)
        val = opt.get('val')
        if val is not None:
            check_keys(val, _VAL_KEYS, 'val')
            tile = val.get('tile')
            if tile is not None and tile != 'auto':
                if not isinstance(tile, dict):
                    raise ValueError(f"val:tile must be {{size, stride|overlap, batch}} or 'auto', got {tile!r}")
                check_keys(tile, _TILE_KEYS, 'val:tile')
                if int(tile.get('size', 0)) <= 0:
                    raise ValueError(f'val:tile:size must be a positive integer, got {tile.get("size")!r}')
        check_device_options(opt)

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
        out = self.precision.run(partial(self._run_network, net), x, training=torch.is_grad_enabled())
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
        self.precision.backward(l_total, self.optimizer_g)
        # fp16's loss scaler skips non-finite gradients itself (and lowers its scale); else nan_policy decides
        if skip and self.precision.scaler is None and not all(
                bool(torch.isfinite(p.grad).all()) for p in self.net_g.parameters() if p.grad is not None):
            self._skip_step(current_iter, 'gradient', loss_dict)  # DDP averaged them: every rank agrees
            return
        self._skipped = 0
        self._clip_gradients()
        self.precision.step(self.optimizer_g)
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
        if tile == 'auto':      # as the architecture declares for this input size (e.g. NLRN's global scope: 45:22)
            plan = auto_tile(self.get_bare_model(net), x.shape[-2], x.shape[-1])
            tile = {'size': plan[0], 'overlap': plan[1]} if plan else None
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

    def save(self, epoch, current_iter):
        if self._pbar is not None and current_iter == -1:
            self._pbar.close()
        super().save(epoch, current_iter)
        if current_iter == -1:      # the end of training
            self._check_ranks_agree()

    def _check_ranks_agree(self):
        """Several processes: every rank's final weights equal rank 0's (DDP keeps them in step; a difference
        means a rank trained apart), checked by one broadcast of the weights; logged, or raised naming the ranks."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        params = [p.detach().reshape(-1).float() for p in self.get_bare_model(self.net_g).parameters()]
        mine = torch.cat(params)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        differs = torch.tensor([0. if torch.equal(mine, ref) else 1.], device=mine.device)
        flags = [torch.zeros_like(differs) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, differs)
        bad = [r for r, f in enumerate(flags) if f.item()]
        if bad:
            raise RuntimeError(f'the final weights of rank(s) {bad} differ from rank 0\'s: the processes did not '
                               'train in step')
        get_root_logger().info(f'Final weights of all {dist.get_world_size()} ranks are equal '
                               f'({mine.numel()} parameters).')


__all__ = ['RestorationModel']
