"""A damaged LMDB is an error naming it (and the key), in the main process and in DataLoader workers, never a
SIGBUS; scripts/create_lmdb.py refuses what the datasets could not decode and never leaves a partial LMDB."""
import os
import shutil

import cv2
import numpy as np
import pytest
from torch.utils.data import DataLoader

from nl_plugin.data.lmdb_writer import create_lmdb
from nl_plugin.data.synthetic_noise_dataset import SyntheticNoiseDataset


@pytest.fixture(scope='module')
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp('guard')
    rng = np.random.default_rng(4)
    os.makedirs(root / 'imgs')
    for i in range(4):
        cv2.imwrite(str(root / 'imgs' / f'k{i}.png'), rng.integers(0, 256, (40, 48), dtype=np.uint8))
    create_lmdb(str(root / 'imgs'), str(root / 'good.lmdb'), progress=False)
    return root


def damaged(good, tmp_path, how):
    out = tmp_path / f'{how}.lmdb'
    shutil.copytree(good / 'good.lmdb', out)
    data = out / 'data.mdb'
    size = data.stat().st_size
    if how == 'truncated':
        os.truncate(data, size // 2)
    elif how == 'empty':
        os.truncate(data, 0)
    elif how == 'missing':
        data.unlink()
    elif how == 'garbage':  # everything after the two meta pages overwritten
        blob = bytearray(data.read_bytes())
        blob[8192:] = np.random.default_rng(0).integers(0, 256, size - 8192, dtype=np.uint8).tobytes()
        data.write_bytes(bytes(blob))
    return out


def dataset(path):
    return SyntheticNoiseDataset(dict(phase='val', dataroot_gt=str(path), io_backend=dict(type='lmdb')))


@pytest.mark.parametrize('how,exc,text', [
    ('truncated', ValueError, r"LMDB '{}' is truncated: data.mdb has \d+ bytes but its header uses \d+"),
    ('empty', ValueError, r"LMDB '{}': data.mdb is empty \(0 bytes\)"),
    ('missing', FileNotFoundError, r"LMDB '{}' has no data.mdb"),
])
def test_damaged_lmdb_is_named_when_the_dataset_is_built(good, tmp_path, how, exc, text):
    path = damaged(good, tmp_path, how)
    with pytest.raises(exc, match=text.format(path)):
        dataset(path)


def test_garbage_pages_name_the_lmdb_and_the_key(good, tmp_path):
    path = damaged(good, tmp_path, 'garbage')
    ds = dataset(path)
    with pytest.raises(ValueError, match=rf"'k0'.*LMDB '{path}'|LMDB '{path}'.*'k0'"):
        ds[0]


def test_lmdb_truncated_while_open_is_named_in_a_worker(good, tmp_path):
    path = tmp_path / 'late.lmdb'
    shutil.copytree(good / 'good.lmdb', path)
    ds = dataset(path)  # opened and checked here; the forked worker inherits the open handle
    os.truncate(path / 'data.mdb', 3 * 4096)
    with pytest.raises(ValueError, match=rf"LMDB '{path}' is truncated.*reading key 'k0'"):
        for _ in DataLoader(ds, batch_size=1, num_workers=1):
            pass


def test_create_lmdb_refuses_a_truncated_jpeg_and_leaves_nothing(tmp_path):
    folder = tmp_path / 'src'
    folder.mkdir()
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), (5, 5), 0)
    jpg = cv2.imencode('.jpg', img)[1].tobytes()
    (folder / 'whole.jpg').write_bytes(jpg)
    (folder / 'torn.jpg').write_bytes(jpg[:len(jpg) // 2])
    assert cv2.imread(str(folder / 'torn.jpg')) is not None  # what the script used to store, grey rows and all
    with pytest.raises(ValueError, match=r"cannot decode image '.*torn\.jpg'"):
        create_lmdb(str(folder), str(tmp_path / 'out.lmdb'), progress=False)
    assert sorted(os.listdir(tmp_path)) == ['src']
    (folder / 'torn.jpg').unlink()
    assert create_lmdb(str(folder), str(tmp_path / 'out.lmdb'), progress=False) == ['whole']
    assert sorted(os.listdir(tmp_path)) == ['out.lmdb', 'src']  # the temporary folder was renamed
    assert dataset(tmp_path / 'out.lmdb')[0]['gt'].shape == (1, 64, 64)
