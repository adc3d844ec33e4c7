"""scripts/create_lmdb.py and scripts/prepare_demo_data.py: BasicSR LMDB round trip, refusal to overwrite,
and the datasets reading the same pixels from a folder and from an LMDB."""
import importlib.util
import os
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


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, SCRIPTS)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(SCRIPTS)
    return mod


create_lmdb = _load_script('create_lmdb').create_lmdb


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
    keys = create_lmdb(str(mixed), out, compress_level=3, progress=False)
    assert keys == ['alpha', 'big', 'gray', 'photo', 'small']
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
    create_lmdb(str(mixed), out, progress=False)
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
    create_lmdb(str(mixed), out, progress=False)
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
    create_lmdb(str(mixed), out, gray=True, progress=False)
    meta = open(os.path.join(out, 'meta_info.txt')).read()
    assert '(64,80,1)' in meta and '(3)' not in meta and ',3)' not in meta
    before = open(os.path.join(out, 'data.mdb'), 'rb').read()
    with pytest.raises(FileExistsError, match='already exists'):
        create_lmdb(str(mixed), out, progress=False)
    # the command line says so and exits non-zero, leaving the LMDB untouched
    res = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'create_lmdb.py'), str(mixed), out],
                         capture_output=True, text=True)
    assert res.returncode != 0 and 'already exists' in res.stderr
    assert open(os.path.join(out, 'data.mdb'), 'rb').read() == before
    with pytest.raises(ValueError, match=r"must end with '\.lmdb'"):
        create_lmdb(str(mixed), str(tmp_path / 'x.db'), progress=False)


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'ok.png').write_bytes(cv2.imencode('.png', np.zeros((4, 4), np.uint8))[1].tobytes())
    (bad / 'broken.png').write_bytes(b'garbage bytes')
    with pytest.raises(ValueError, match=r'broken\.png'):
        create_lmdb(str(bad), str(tmp_path / 'b.lmdb'), progress=False)
    assert not os.path.exists(tmp_path / 'b.lmdb')  # nothing half-written
    dotted = tmp_path / 'dotted'
    dotted.mkdir()
    (dotted / 'img.v2.png').write_bytes((bad / 'ok.png').read_bytes())
    with pytest.raises(ValueError, match=r"img\.v2\.png.*'\.'"):
        create_lmdb(str(dotted), str(tmp_path / 'd.lmdb'), progress=False)


def test_prepare_demo_data_is_offline_and_idempotent(tmp_path):
    prepare = _load_script('prepare_demo_data')
    out = tmp_path / 'demo'
    paths = prepare.prepare_demo_data(str(out), progress=False)
    train = sorted(os.listdir(paths['train']))
    val = sorted(os.listdir(paths['val']))
    assert len(train) == len(prepare.TRAIN) and val == ['astronaut.png', 'camera.png', 'coins.png']
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
    prepare.prepare_demo_data(str(out), progress=False)
    assert stamp == {os.path.join(r, p): os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(out) for p in fs}
    ds = SyntheticNoiseDataset(dict(phase='train', dataroot_gt=paths['train_lmdb'], io_backend=dict(type='lmdb'),
                                    gt_size=80))
    assert all(ds[i]['lq'].shape == (1, 80, 80) for i in range(len(ds)))
