"""The papers' denoising tables through this project: test sets, seeded noise, two PSNR conventions.

``scripts/reproduce_tables.py`` is the command line. Every network given runs on every test set found
(``Set12``, ``BSD68``, ``Urban100`` under the data folder that ``scripts/prepare_datasets.py`` writes) with
Gaussian noise of its sigma, and each mean PSNR is printed next to the paper's figure.

Protocol (N3Net's evaluation, reference notes): gray images (cv2 BGR2GRAY), ``noisy = clean + sigma/255 * n``
with ``n`` standard normal, not clipped, seeded by the image name exactly as ``SyntheticNoiseDataset`` does
for ``basicsr test`` (so both commands see the same noisy images); whole images in one pass. Two PSNRs per
image, then averaged over the set:

- ``official``: on the float output, neither clipped nor rounded, against the float clean image (peak 1);
- ``basicsr``: BasicSR's ``calculate_psnr`` on 8-bit images (output clipped to [0, 1] and rounded by
  ``tensor2img``), what ``basicsr test`` reports.
"""
import json
import math
import os.path as osp
import time
from collections import OrderedDict

import numpy as np
import torch

#: the papers' mean PSNR (dB) of gray denoising: network -> sigma -> set. N3Net: its Table 3 (released
#: weights); NLRN: its Table 3 (BSD400 protocol); DnCNN: as reported in N3Net's Table 3.
PAPER = {
    'N3Net': {25: {'Set12': 30.55, 'BSD68': 29.30, 'Urban100': 30.19},
              50: {'Set12': 27.43, 'BSD68': 26.39, 'Urban100': 26.82},
              70: {'Set12': 25.90, 'BSD68': 25.14}},
    'NLRN': {15: {'Set12': 33.16, 'BSD68': 31.88, 'Urban100': 33.45},
             25: {'Set12': 30.80, 'BSD68': 29.41, 'Urban100': 30.94},
             50: {'Set12': 27.64, 'BSD68': 26.47, 'Urban100': 27.49}},
    'DnCNN': {25: {'Set12': 30.44, 'BSD68': 29.23, 'Urban100': 29.95},
              50: {'Set12': 27.18, 'BSD68': 26.23, 'Urban100': 26.26}},
}

DEFAULT_SETS = ('Set12', 'BSD68', 'Urban100')


def load_model(path, family=None):
    """A network from ``path``: an official N3Net checkpoint (``.t7``, converted in memory) or a weight file
    of this project (BasicSR ``.pth`` / ``.safetensors``; architecture from the file or its keys).

    Returns:
        tuple[torch.nn.Module, str]: the network in eval mode and its architecture name.
    """
    from nl_plugin.weights import load_network
    if str(path).endswith('.t7') or family == 'N3Net-official':
        from nl_plugin.archs.n3net_arch import N3Net
        from nl_plugin.convert.n3net_official import convert_state_dict, load_official_checkpoint
        net = N3Net()
        net.load_state_dict(convert_state_dict(load_official_checkpoint(str(path))), strict=True)
        return net.eval(), 'N3Net'
    net, spec, _ = load_network(str(path))
    return net, spec['type']


def noisy_pairs(folder, sigma, noise_seed=0):
    """``(name, noisy, clean)`` of every image of ``folder``: (1, 1, H, W) float32 tensors, the noise
    seeded by the image name as in ``basicsr test`` (``SyntheticNoiseDataset``, phase test)."""
    from nl_plugin.data.synthetic_noise_dataset import SyntheticNoiseDataset
    ds = SyntheticNoiseDataset({'name': osp.basename(folder), 'dataroot_gt': folder, 'io_backend': {'type': 'disk'},
                                'color': 'gray', 'sigma': sigma, 'noise_seed': noise_seed, 'phase': 'test'})
    for i in range(len(ds)):
        item = ds[i]
        yield osp.splitext(osp.basename(item['gt_path']))[0], item['lq'][None], item['gt'][None]


def psnr_pair(out, clean):
    """(official, basicsr) PSNR in dB of a (1, 1, H, W) float output against its clean image."""
    from basicsr.metrics import calculate_psnr
    from basicsr.utils import tensor2img
    mse = torch.mean((out.double() - clean.double()) ** 2).item()
    official = 10 * math.log10(1.0 / mse) if mse > 0 else float('inf')
    basic = calculate_psnr(tensor2img(out), tensor2img(clean), crop_border=0, test_y_channel=False)
    return official, float(basic)


def run_model(net, folder, sigma, precision='fp32', noise_seed=0):
    """Per-image results of ``net`` on the images of ``folder`` at noise ``sigma``.

    Args:
        precision (str): ``fp32`` or ``bf16`` (``torch.autocast`` on the CPU).

    Returns:
        list[dict]: ``{'image', 'official', 'basicsr', 'input_official', 'input_basicsr', 'seconds'}`` per
        image (``input_*``: PSNR of the noisy input).
    """
    rows = []
    for name, noisy, clean in noisy_pairs(folder, sigma, noise_seed):
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16, enabled=precision == 'bf16'):
            out = net(noisy).float()
        sec = time.perf_counter() - t0
        official, basic = psnr_pair(out, clean)
        noisy_official, noisy_basic = psnr_pair(noisy, clean)
        rows.append({'image': name, 'official': official, 'basicsr': basic, 'input_official': noisy_official,
                     'input_basicsr': noisy_basic, 'seconds': sec})
    return rows


def reproduce(models, data='datasets', sets=DEFAULT_SETS, precision='fp32', noise_seed=0, log=print):
    """Run every ``(label, arch, sigma, net)`` of ``models`` on the sets of ``sets`` present under ``data``.

    Returns:
        tuple[list[dict], list[str]]: one row per network and set (means, paper figure, per-image results)
        and the sets that were skipped because their folder is missing.
    """
    torch.set_flush_denormal(True)  # the released weights hit denormals: 2.5-3x slower convs otherwise
    present = [s for s in sets if osp.isdir(osp.join(data, s))]
    missing = [s for s in sets if s not in present]
    from nl_plugin.data.prepare import how_to_prepare
    for s in missing:
        log(f'{osp.join(data, s)} not found: {s} skipped ({how_to_prepare(s, data)})')
    rows = []
    for label, arch, sigma, net in models:
        for s in present:
            per = run_model(net, osp.join(data, s), sigma, precision, noise_seed)
            row = OrderedDict(network=label, arch=arch, sigma=sigma, set=s, images=len(per),
                              official=float(np.mean([r['official'] for r in per])),
                              basicsr=float(np.mean([r['basicsr'] for r in per])),
                              paper=PAPER.get(arch, {}).get(sigma, {}).get(s),
                              seconds=float(sum(r['seconds'] for r in per)), per_image=per)
            rows.append(row)
            log(f'{label} sigma {sigma} {s}: {row["official"]:.2f} dB (official), {row["basicsr"]:.2f} dB (BasicSR), '
                f'{len(per)} images, {row["seconds"]:.0f} s')
    return rows, missing


def format_table(rows):
    """Markdown table of the rows of :func:`reproduce`."""
    lines = ['| Network | sigma | Set | images | PSNR official (dB) | PSNR BasicSR 8-bit (dB) | paper (dB) | '
             'official - paper |',
             '|---|---:|---|---:|---:|---:|---:|---:|']
    for r in rows:
        paper = '-' if r['paper'] is None else f'{r["paper"]:.2f}'
        diff = '-' if r['paper'] is None else f'{r["official"] - r["paper"]:+.2f}'
        lines.append(f'| {r["network"]} | {r["sigma"]:g} | {r["set"]} | {r["images"]} | {r["official"]:.2f} | '
                     f'{r["basicsr"]:.2f} | {paper} | {diff} |')
    return '\n'.join(lines)


def write_json(rows, path, **meta):
    from nl_plugin.fileio import atomic_write_bytes
    atomic_write_bytes(path, json.dumps({**meta, 'rows': rows}, indent=1).encode())
