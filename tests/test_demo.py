"""scripts/demo.py --report-only, run as a command on a tiny stand-in of a finished demo run: the table holds
the CSVs' numbers and their means next to NL-means and the noisy input, the picture has every column in
order, and a CSV of other noisy images is refused."""
import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img

from conftest import ROOT
from nl_plugin.data.synthetic_noise_dataset import SyntheticNoiseDataset

NETS = (('DnCNN', 'dncnn'), ('N3Net', 'n3net'), ('NLRN', 'nlrn'))
SIZE = 64
GAP, CAPTION = 4, 24  # scripts/demo.py: gap between panels, caption strip above each


def _clean_images():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    square = (60 + 2 * xx).astype(np.uint8)
    square[16:48, 16:48] = 220
    disk = np.where((yy - 32)**2 + (xx - 30)**2 < 20**2, 200, 50).astype(np.uint8)
    return {'a_square': square, 'b_disk': disk}


def _restored(clean, shift):
    return np.clip(clean.astype(int) + shift, 0, 255).astype(np.uint8)


@pytest.fixture
def finished_run(tmp_path):
    """A root with datasets/demo/val and, per network, the CSV and images ``basicsr test`` writes."""
    val = tmp_path / 'datasets' / 'demo' / 'val'
    val.mkdir(parents=True)
    clean = _clean_images()
    for name, img in clean.items():
        cv2.imwrite(str(val / f'{name}.png'), img)
    ds = SyntheticNoiseDataset(dict(name='skimage_val', dataroot_gt=str(val), io_backend={'type': 'disk'},
                                    color='gray', sigma=25, phase='test'))
    noisy = {os.path.splitext(os.path.basename(ds[i]['lq_path']))[0]: tensor2img([ds[i]['lq']]) for i in range(len(ds))}
    expected = {}
    for j, (_, stem) in enumerate(NETS):
        results = tmp_path / 'results' / f'demo_{stem}_test'
        (results / 'visualization' / 'skimage_val').mkdir(parents=True)
        rows = []
        for name, img in clean.items():
            out = _restored(img, 3 * (j + 1))  # a different image per network, to find its column
            cv2.imwrite(str(results / 'visualization' / 'skimage_val' / f'{name}_restored.png'), out)
            rows.append({'image': name, 'psnr': 30.0 + j + len(rows) * 0.5, 'ssim': 0.8 + 0.01 * j,
                         'psnr_input': calculate_psnr(noisy[name], img, 0),
                         'ssim_input': calculate_ssim(noisy[name], img, 0)})
            expected[stem, name] = out
        with open(results / 'skimage_val_metrics.csv', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: f'{v:.4f}' if isinstance(v, float) else v for k, v in r.items()})
            writer.writerow({'image': 'MEAN', **{k: f'{np.mean([r[k] for r in rows]):.4f}' for k in rows[0]
                                                 if k != 'image'}})
    return tmp_path, clean, noisy, expected


def _report(root):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'demo.py'), '--report-only',
                           '--root', str(root), '--out', 'pictures'], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)


def _table(stdout):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('image'))
    header = lines[start].split()
    rows = {}
    for line in lines[start + 1:start + 4]:
        cells = line.split()
        rows[cells[0]] = [(float(cells[k]), float(cells[k + 2])) for k in range(1, len(cells), 3)]
    return header, rows


def test_report_table_and_picture(finished_run):
    root, clean, noisy, expected = finished_run
    res = _report(root)
    assert res.returncode == 0, res.stderr[-3000:]
    header, rows = _table(res.stdout)
    assert header == ['image', 'noisy', 'NL-means', 'DnCNN', 'N3Net', 'NLRN']
    assert list(rows) == ['a_square', 'b_disk', 'mean']
    for i, name in enumerate(['a_square', 'b_disk']):
        psnr_noisy, ssim_noisy = rows[name][0]
        assert psnr_noisy == pytest.approx(calculate_psnr(noisy[name], clean[name], 0), abs=0.006)
        assert ssim_noisy == pytest.approx(calculate_ssim(noisy[name], clean[name], 0), abs=6e-5)
        assert rows[name][1][0] > psnr_noisy + 3  # non-local means on piecewise-smooth images
        for j in range(3):  # the networks' columns are their CSVs' values
            assert rows[name][2 + j] == (pytest.approx(30.0 + j + i * 0.5), pytest.approx(0.8 + 0.01 * j))
    for c in range(5):
        assert rows['mean'][c][0] == pytest.approx((rows['a_square'][c][0] + rows['b_disk'][c][0]) / 2, abs=0.006)

    sheet = cv2.imread(str(root / 'pictures' / 'side_by_side.png'), cv2.IMREAD_UNCHANGED)
    assert sheet.shape == (2 * (CAPTION + SIZE + GAP), 6 * (SIZE + GAP), 3)
    for i, name in enumerate(['a_square', 'b_disk']):
        columns = [clean[name], noisy[name], None] + [expected[stem, name] for _, stem in NETS]
        for c, img in enumerate(columns):
            top, left = i * (CAPTION + SIZE + GAP) + CAPTION, c * (SIZE + GAP)
            panel = sheet[top:top + SIZE, left:left + SIZE]
            assert (panel[..., 0] == panel[..., 2]).all()  # gray images drawn as BGR
            if img is not None:
                np.testing.assert_array_equal(panel[..., 0], img)
            else:  # NL-means: closer to the clean image than the noisy one is
                err = np.abs(panel[..., 0].astype(int) - clean[name]).mean()
                assert err < np.abs(noisy[name].astype(int) - clean[name]).mean() / 2
            assert sheet[top - CAPTION:top, left:left + SIZE].max() == 255  # the caption's text


def test_report_refuses_other_noisy_images(finished_run):
    root = finished_run[0]
    path = root / 'results' / 'demo_n3net_test' / 'skimage_val_metrics.csv'
    lines = path.read_text().splitlines()
    cells = lines[1].split(',')
    cells[3] = f'{float(cells[3]) + 0.5:.4f}'  # psnr_input of the first image
    path.write_text('\n'.join([lines[0], ','.join(cells)] + lines[2:]) + '\n')
    res = _report(root)
    assert res.returncode != 0
    assert 'demo_n3net_test' in res.stderr and 'a_square' in res.stderr and 'not the same noisy image' in res.stderr
