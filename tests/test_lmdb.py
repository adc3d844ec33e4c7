"""scripts/create_lmdb.py and scripts/prepare_demo_data.py, run as commands: BasicSR LMDB round trip, refusal to
overwrite, errors naming the file, and the datasets reading the same pixels from a folder and from an LMDB."""
import os
import re
import subprocess
import sys

import cv2
import lmdb
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nl_plugin.data.bicubic_degradation_dataset import BicubicDegradationDataset
from nl_plugin.data.synthetic_noise_dataset import SyntheticNoiseDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'scripts')


def _run_script(name, *args):
    """Run ``scripts/<name>.py`` with ``args`` in a fresh interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, f'{name}.py'), *map(str, args)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)


def create_lmdb(folder, out, *flags):
    """``create_lmdb.py FOLDER OUT [flags]``, which must succeed."""
    res = _run_script('create_lmdb', folder, out, *flags)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def create_lmdb_error(folder, out, *flags):
    """``create_lmdb.py FOLDER OUT [flags]``, which must fail; returns its last stderr line (the error)."""
    res = _run_script('create_lmdb', folder, out, *flags)
    assert res.returncode != 0, res.stdout
    return res.stderr.strip().splitlines()[-1]


def lmdb_keys(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        keys = [k.decode() for k, _ in txn.cursor()]
    env.close()
    return keys


@pytest.fixture
def mixed(tmp_path):
    """Mixed sizes and channel counts, including a JPEG and a 16-bit-free RGBA PNG."""
    rng = np.random.default_rng(5)
    folder = tmp_path / 'imgs'
    folder.mkdir()
    imgs = {
        'big': rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
        'gray': rng.integers(0, 256, (20, 33), dtype=np.uint8),
        'small': rng.integers(0, 256, (9, 7, 3), dtype=np.uint8),
        'alpha': rng.integers(0, 256, (16, 12, 4), dtype=np.uint8),
    }
    for k, v in imgs.items():
        assert cv2.imwrite(str(folder / f'{k}.png'), v)
    assert cv2.imwrite(str(folder / 'photo.jpg'), imgs['big'][:40, :50])
    (folder / 'notes.txt').write_text('not an image')
    return folder


def test_lmdb_round_trip_mixed_sizes(mixed, tmp_path):
    out = str(tmp_path / 'imgs.lmdb')
    res = create_lmdb(mixed, out, '--compress-level', '3')
    assert 'Wrote 5 images' in res.stdout
    assert lmdb_keys(out) == ['alpha', 'big', 'gray', 'photo', 'small']
    meta = open(os.path.join(out, 'meta_info.txt')).read().splitlines()
    assert meta == ['alpha.png (16,12,3) 3', 'big.png (64,80,3) 3', 'gray.png (20,33,1) 3',
                    'photo.png (40,50,3) 3', 'small.png (9,7,3) 3']
    env = lmdb.open(out, readonly=True, lock=False)
    with env.begin() as txn:
        for name in ('big', 'gray', 'small', 'photo', 'alpha'):
            ext = 'jpg' if name == 'photo' else 'png'
            ref = cv2.imread(str(mixed / f'{name}.{ext}'), cv2.IMREAD_UNCHANGED)
            got = cv2.imdecode(np.frombuffer(txn.get(name.encode()), np.uint8), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(got, ref[:, :, :3] if ref.ndim == 3 else ref), name
    env.close()


def test_datasets_read_identical_pixels_from_lmdb(mixed, tmp_path):
    out = str(tmp_path / 'imgs.lmdb')
    create_lmdb(mixed, out)
    base = dict(phase='val', color='rgb', sigma=15)
    disk = SyntheticNoiseDataset(dict(base, dataroot_gt=str(mixed), io_backend=dict(type='disk')))
    db = SyntheticNoiseDataset(dict(base, dataroot_gt=out, io_backend=dict(type='lmdb')))
    assert len(disk) == len(db) == 5
    for i in range(5):
        a, b = disk[i], db[i]
        assert os.path.splitext(os.path.basename(a['gt_path']))[0] == b['gt_path']
        assert torch.equal(a['gt'], b['gt'])
        assert torch.equal(a['lq'], b['lq'])  # validation noise depends on the name only
    # a second dataset on the same LMDB in this process, and forked workers after the parent has read it
    loader = DataLoader(SyntheticNoiseDataset(dict(base, dataroot_gt=out, io_backend=dict(type='lmdb'))),
                        batch_size=1, num_workers=2)
    for i, batch in enumerate(loader):
        assert torch.equal(batch['lq'][0], db[i]['lq'])
    sr = dict(phase='val', scale=2, y_only=True, upsample=True)
    disk = BicubicDegradationDataset(dict(sr, dataroot_gt=str(mixed)))
    db = BicubicDegradationDataset(dict(sr, dataroot_gt=out, io_backend=dict(type='lmdb')))
    for i in range(5):
        a, b = disk[i], db[i]
        assert torch.equal(a['gt'], b['gt']) and torch.equal(a['lq'], b['lq'])
    train = BicubicDegradationDataset(dict(sr, phase='train', gt_size=8, dataroot_gt=out,
                                           io_backend=dict(type='lmdb')))
    assert train[1]['gt'].shape == (1, 8, 8)


def test_lmdb_meta_info_file_and_missing_key(mixed, tmp_path):
    out = str(tmp_path / 'imgs.lmdb')
    create_lmdb(mixed, out)
    meta = tmp_path / 'sub.txt'
    meta.write_text('big.png (64,80,3) 1\nghost.png (8,8,3) 1\n')
    ds = SyntheticNoiseDataset(dict(phase='val', dataroot_gt=out, io_backend=dict(type='lmdb'),
                                    meta_info_file=str(meta)))
    assert ds[0]['gt'].shape == (1, 64, 80)
    with pytest.raises(FileNotFoundError, match=r"'ghost'.*imgs\.lmdb"):
        ds[1]
    with pytest.raises(FileNotFoundError, match='not a BasicSR LMDB'):
        SyntheticNoiseDataset(dict(phase='val', dataroot_gt=str(mixed), io_backend=dict(type='lmdb')))


def test_refuses_to_overwrite_and_gray_option(mixed, tmp_path):
    out = str(tmp_path / 'g.lmdb')
    create_lmdb(mixed, out, '--gray')
    meta = open(os.path.join(out, 'meta_info.txt')).read()
    assert '(64,80,1)' in meta and '(3)' not in meta and ',3)' not in meta
    before = open(os.path.join(out, 'data.mdb'), 'rb').read()
    assert 'already exists' in create_lmdb_error(mixed, out)
    assert open(os.path.join(out, 'data.mdb'), 'rb').read() == before  # left untouched
    assert re.search(r"must end with '\.lmdb'", create_lmdb_error(mixed, tmp_path / 'x.db'))
    assert not os.path.exists(tmp_path / 'x.db')


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'ok.png').write_bytes(cv2.imencode('.png', np.zeros((4, 4), np.uint8))[1].tobytes())
    (bad / 'broken.png').write_bytes(b'garbage bytes')
    assert re.search(r'broken\.png', create_lmdb_error(bad, tmp_path / 'b.lmdb'))
    assert not os.path.exists(tmp_path / 'b.lmdb')  # nothing half-written
    dotted = tmp_path / 'dotted'
    dotted.mkdir()
    (dotted / 'img.v2.png').write_bytes((bad / 'ok.png').read_bytes())
    assert re.search(r"img\.v2\.png.*'\.'", create_lmdb_error(dotted, tmp_path / 'd.lmdb'))
    assert not os.path.exists(tmp_path / 'd.lmdb')


def test_prepare_demo_data_is_offline_and_idempotent(tmp_path):
    out = tmp_path / 'demo'
    res = _run_script('prepare_demo_data', '--out', out)
    assert res.returncode == 0, res.stderr[-2000:]
    paths = dict(line.strip().split(': ', 1) for line in res.stdout.splitlines() if ': ' in line)
    assert paths == {'train': str(out / 'train'), 'val': str(out / 'val'), 'train_lmdb': str(out / 'train.lmdb'),
                     'val_lmdb': str(out / 'val.lmdb')}
    train = sorted(os.listdir(paths['train']))
    val = sorted(os.listdir(paths['val']))
    assert val == ['astronaut.png', 'camera.png', 'coins.png']
    assert len(train) >= 10 and not set(train) & set(val)
    for name in val:
        img = cv2.imread(os.path.join(paths['val'], name), cv2.IMREAD_UNCHANGED)
        assert max(img.shape[:2]) <= 256
    for name in train:
        img = cv2.imread(os.path.join(paths['train'], name), cv2.IMREAD_UNCHANGED)
        assert max(img.shape[:2]) <= 512 and min(img.shape[:2]) >= 100
    for split in ('train', 'val'):
        lines = open(os.path.join(paths[f'{split}_lmdb'], 'meta_info.txt')).read().splitlines()
        assert [ln.split(' ')[0] for ln in lines] == sorted(os.listdir(paths[split]))
    stamp = {os.path.join(r, p): os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(out) for p in fs}
    assert _run_script('prepare_demo_data', '--out', out).returncode == 0
    assert stamp == {os.path.join(r, p): os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(out) for p in fs}
    ds = SyntheticNoiseDataset(dict(phase='train', dataroot_gt=paths['train_lmdb'], io_backend=dict(type='lmdb'),
                                    gt_size=80))
    assert all(ds[i]['lq'].shape == (1, 80, 80) for i in range(len(ds)))
