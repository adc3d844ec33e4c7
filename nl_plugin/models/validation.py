"""The validation half of ``RestorationModel``: every process validates its share of the images, the metrics
are gathered, ``basicsr test`` writes a per-image CSV, and TensorBoard gets comparison strips.

Validation runs on every process of a distributed job: images are split across ranks and the metrics
gathered (BasicSR's ``dist_validation`` runs rank 0 only). ``basicsr test`` also writes one CSV per
dataset with the metrics of every image (and of the degraded input, where it has the target's shape).
"""
import csv
import os
from os import path as osp

import torch
import torch.distributed as dist
from basicsr.metrics import calculate_metric
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.color_util import ycbcr2bgr
from basicsr.utils.dist_util import get_dist_info
from torch.utils.data import default_collate
from tqdm import tqdm

from nl_plugin.analysis.strips import comparison_strip
from nl_plugin.compat import broadcast_buffers
from nl_plugin.fileio import atomic_write


class ValidationMixin:
    """``nondist_validation``/``dist_validation`` of a BasicSR model whose ``test()`` fills ``self.output``."""

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
