"""scripts/prepare_datasets.py on a small generated tree: files found by checksum in any layout, the output
folders and LMDB that BasicSR reads, idempotence, and refusal of a changed byte or a missing file."""
import importlib.util
import os
import os.path as osp
import shutil
import subprocess
import sys
import zipfile

import cv2
import numpy as np
import pytest

from nl_plugin.data import prepare as prep

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SCRIPT = osp.join(ROOT, 'scripts', 'prepare_datasets.py')


def run(*args):
    """The command line in a subprocess (as a user runs it)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env)


def _load_script():
    spec = importlib.util.spec_from_file_location('prepare_datasets_cli', SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CLI = _load_script()


@pytest.fixture
def main(capsys):
    """The same command line in this process (no interpreter start-up): returns (code, stdout, stderr)."""
    def call(*args):
        code = CLI.main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call


@pytest.fixture
def tree(tmp_path):
    """A manifest of three tiny sets (made from generated images) and a source copy in another layout."""
    rng = np.random.default_rng(0)
    ref = tmp_path / 'ref'
    sets = {'BSD400': 4, 'BSD68': 2, 'Set12': 2}
    for name, n in sets.items():
        (ref / name).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(ref / name / f'{name.lower()}_{i:02d}.png'), rng.integers(0, 256, (12, 10), np.uint8))
    manifest = tmp_path / 'manifest.sha256'
    prep.write_manifest({name: str(ref / name) for name in sets}, str(manifest))
    # the source: other names, nested folders, unrelated files beside them
    src = tmp_path / 'src'
    for k, path in enumerate(sorted(ref.rglob('*.png'))):
        dst = src / f'deep{k % 2}' / 'x' / f'img{k}.png'
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
    (src / 'README.txt').write_text('not an image')
    return tmp_path, ref, src, str(manifest)


def test_manifest_of_the_package_lists_the_papers_sets():
    table = prep.read_manifest()
    assert {k: len(v) for k, v in table.items()} == {'BSD400': 400, 'BSD68': 68, 'Set12': 12, 'Set5': 5, 'Set14': 14}
    digests = [d for files in table.values() for d in files.values()]
    assert len(set(digests)) == len(digests) and all(len(d) == 64 for d in digests)


def test_prepare_from_source_any_layout_then_idempotent(tree):
    tmp, ref, src, manifest = tree
    out = tmp / 'datasets'
    r = run('--source', str(src), '--out', str(out), '--manifest', manifest)
    assert r.returncode == 0, r.stderr
    for name in ('BSD400', 'BSD68', 'Set12'):
        assert sorted(os.listdir(out / name)) == sorted(os.listdir(ref / name))
        for f in os.listdir(ref / name):
            assert (out / name / f).read_bytes() == (ref / name / f).read_bytes()
    assert not [n for n in os.listdir(out) if n.startswith('.')]  # no temporary folder left
    # the LMDB the option files name, read by the dataset BasicSR builds from it
    from basicsr.data import build_dataset
    ds = build_dataset({'name': 'lmdb', 'type': 'SyntheticNoiseDataset', 'dataroot_gt': str(out / 'BSD400.lmdb'),
                        'io_backend': {'type': 'lmdb'}, 'color': 'gray', 'sigma': 25, 'phase': 'val'})
    assert len(ds) == 4
    gt = ds[0]['gt'][0].numpy()
    first = sorted(os.listdir(ref / 'BSD400'))[0]
    np.testing.assert_array_equal(np.round(gt * 255), cv2.imread(str(ref / 'BSD400' / first), 0))
    stamp = {p: os.stat(p).st_mtime_ns for p in out.rglob('*')}
    r = run('--source', str(src), '--out', str(out), '--manifest', manifest)
    assert r.returncode == 0 and 'present' in r.stdout, r.stderr
    assert {p: os.stat(p).st_mtime_ns for p in out.rglob('*')} == stamp  # nothing rewritten


def test_changed_byte_is_refused_and_nothing_written(tree, main):
    tmp, ref, src, manifest = tree
    victim = sorted(src.rglob('*.png'))[3]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 1
    victim.write_bytes(bytes(data))
    out = tmp / 'datasets'
    r = main('--source', str(src), '--out', str(out), '--manifest', manifest)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'is missing: no file under' in lines[0] and 'SHA-256' in lines[0], r.stderr
    assert not out.exists() or not os.listdir(out)
    # under its manifest name, the altered file itself is named
    shutil.copyfile(victim, src / 'deep0' / lines[0].split(' is missing')[0].split('/')[-1])
    r = main('--source', str(src), '--out', str(out), '--manifest', manifest)
    assert r.returncode == 2 and 'differs from the manifest' in r.stderr and str(src / 'deep0') in r.stderr
    # an output altered after preparing is reported, never overwritten
    shutil.rmtree(src / 'deep0')
    shutil.copytree(ref, src / 'deep0')
    assert main('--source', str(src), '--out', str(out), '--manifest', manifest).returncode == 0
    bad = out / 'Set12' / 'set12_01.png'
    bad.write_bytes(bad.read_bytes() + b'\0')
    r = main('--source', str(src), '--out', str(out), '--manifest', manifest)
    assert r.returncode == 2 and f'{bad} differs from the manifest' in r.stderr


def test_unknown_set_and_download_from_archive(tree, main):
    tmp, ref, src, manifest = tree
    r = main('--sets', 'bsd68', '--manifest', manifest, '--source', str(src), '--out', str(tmp / 'o'))
    assert r.returncode == 2 and "did you mean 'BSD68'" in r.stderr
    r = main('--sets', 'Urban100', '--manifest', manifest, '--source', str(src), '--out', str(tmp / 'o'))
    assert r.returncode == 2 and 'datasets/Urban100 yourself' in r.stderr
    # the download path, on a file:// archive (the built-in URLs need a network)
    archive = tmp / 'mirror.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        for p in src.rglob('*'):
            if p.is_file():
                z.write(p, osp.join('DnCNN-main', osp.relpath(p, src)))
    out = tmp / 'dl'
    r = main('--url', archive.as_uri(), '--sets', 'BSD68', 'Set12', '--manifest', manifest, '--out', str(out),
            '--no-lmdb')
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ['BSD68', 'Set12']  # the download's temporary folder is gone
