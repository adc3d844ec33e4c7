"""The papers' test protocol end to end on tiny data: prepare_datasets, ``basicsr test`` with the shipped
N3Net test options (a set that was not prepared is skipped with one line), and reproduce_tables with a
converted random-weight official N3Net checkpoint, whose PSNRs must be those of ``basicsr test``
(same seeded noise) and of the official network computed independently."""
import csv
import json
import math
import os
import os.path as osp
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from nl_plugin.convert import n3net_official
from nl_plugin.data import prepare as prep
from test_convert_n3net import official_forward, official_state_dict

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
BIN = osp.dirname(sys.executable)

pytestmark = pytest.mark.usefixtures('one_thread')


def run(cmd, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """datasets/Set12 (2 images) and datasets/BSD68 (1) prepared from a tiny manifest; an official-layout
    checkpoint with random weights (.t7) and its conversion (.pth)."""
    tmp = tmp_path_factory.mktemp('tables')
    rng = np.random.default_rng(1)
    src = tmp / 'src'
    src.mkdir()
    yy, xx = np.mgrid[0:80, 0:88]
    for name, n in (('Set12', 2), ('BSD68', 1)):
        (tmp / 'ref' / name).mkdir(parents=True)
        for i in range(n):
            img = 128 + 60 * np.sin(xx / (5 + 3 * i)) * np.cos(yy / 7) + rng.normal(0, 10, xx.shape)
            cv2.imwrite(str(tmp / 'ref' / name / f'{i + 1:02d}.png'), np.clip(img, 0, 255).astype(np.uint8))
            cv2.imwrite(str(src / f'{name}_{i}.png'), np.clip(img, 0, 255).astype(np.uint8))
    manifest = tmp / 'm.sha256'
    prep.write_manifest({n: str(tmp / 'ref' / n) for n in ('Set12', 'BSD68')}, str(manifest))
    prep.prepare_from_source(str(src), str(tmp / 'datasets'), manifest=str(manifest), log=lambda m: None)
    sd = official_state_dict(seed=3)
    for i in range(3):  # small residuals: output = input + a little, so that the noise decides the PSNR and fp32
        sd[f'blocks.{i}.conv2.weight'] *= 0.01  # rounding in random layers does not (they amplify it ~1e3)
        sd[f'blocks.{i}.conv2.bias'] *= 0.01
    torch.save({'net': sd, 'epoch': 51}, str(tmp / '051_ckpt.t7'))
    n3net_official.convert_file(str(tmp / '051_ckpt.t7'), str(tmp / 'n3net.pth'))
    return tmp, sd


def test_basicsr_test_runs_the_prepared_sets_and_names_the_missing_one(work):
    tmp, _ = work
    r = run([osp.join(BIN, 'basicsr'), 'test', '-opt', osp.join(ROOT, 'options', 'test_n3net_denoise.yml'),
             '--force_yml', f'path:pretrain_network_g={tmp / "n3net.pth"}'], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [line for line in r.stderr.splitlines() if 'skipped' in line]
    assert skipped == ['test set Urban100 skipped: datasets/Urban100 not found; no checksummed public copy of '
                       'Urban100 is known: put its images into datasets/Urban100'], r.stderr[-3000:]
    res = tmp / 'results' / 'N3Net_denoise_sigma25_test'
    assert sorted(p for p in os.listdir(res) if p.endswith('.csv')) == ['BSD68_metrics.csv', 'Set12_metrics.csv']


def test_reproduce_tables_matches_basicsr_test_and_the_official_network(work):
    tmp, sd = work
    from nl_plugin.archs.dncnn_arch import DnCNN
    from nl_plugin.weights import save_weights
    dncnn = DnCNN(num_feat=8, depth=3)
    save_weights(dncnn.state_dict(), str(tmp / 'dncnn.pth'), arch={'type': 'DnCNN', 'num_feat': 8, 'depth': 3})
    r = run([sys.executable, osp.join(ROOT, 'scripts', 'reproduce_tables.py'), '--n3net', f'25={tmp / "n3net.pth"}',
             '--n3net', f'50={tmp / "051_ckpt.t7"}', '--dncnn', f'25={tmp / "dncnn.pth"}', '--json', 'table.json'], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'datasets/Urban100 not found: Urban100 skipped' in r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith('| N3Net') or line.startswith('| DnCNN')]
    assert len(table) == 6 and '| N3Net | 25 | BSD68 | 1 |' in r.stdout and '| 29.30 |' in r.stdout
    rows = json.load(open(tmp / 'table.json'))['rows']
    assert [(x['arch'], x['sigma'], x['set']) for x in rows] == [
        ('N3Net', 25, 'Set12'), ('N3Net', 25, 'BSD68'), ('N3Net', 50, 'Set12'), ('N3Net', 50, 'BSD68'),
        ('DnCNN', 25, 'Set12'), ('DnCNN', 25, 'BSD68')]
    # the noisy inputs of ``basicsr test`` (same seeded noise) and its per-image 8-bit PSNR on the same weights
    res = tmp / 'results' / 'N3Net_denoise_sigma25_test'
    if not res.is_dir():  # when this test runs alone
        test_basicsr_test_runs_the_prepared_sets_and_names_the_missing_one(work)
    for row in rows[:2]:
        with open(res / f'{row["set"]}_metrics.csv') as f:
            ref = [x for x in csv.DictReader(f) if x['image'] != 'MEAN']
        assert [x['image'] for x in row['per_image']] == [x['image'] for x in ref]
        for got, want in zip(row['per_image'], ref):
            assert got['input_basicsr'] == pytest.approx(float(want['psnr_input']), abs=1e-4)
            assert got['basicsr'] == pytest.approx(float(want['psnr']), abs=1e-3)
    # official metric: float output of the official network (computed from the official dict), unclipped
    from nl_plugin.data.data_util import name_seed
    for row in rows[2:4]:  # sigma 50, from the .t7 converted in memory
        for img in row['per_image']:
            path = str(tmp / 'datasets' / row['set'] / f'{img["image"]}.png')
            clean = torch.from_numpy(cv2.imread(path, 0).astype(np.float32) / 255)[None, None]
            noise = torch.randn(clean.shape[2:] + (1,), generator=torch.Generator().manual_seed(name_seed(path, 0)))
            noisy = clean + noise.permute(2, 0, 1)[None] * np.float32(50 / 255)
            with torch.no_grad():
                out = official_forward(sd, noisy).double()
            want = 10 * math.log10(1 / torch.mean((out - clean.double()) ** 2).item())
            assert img['official'] == pytest.approx(want, abs=1e-3)
            assert abs(img['official'] - img['basicsr']) > 1e-3  # random weights leave [0, 1]: the metrics differ
