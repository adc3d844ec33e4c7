"""Atomic writes: permissions as a plain open() gives, no-overwrite at the rename, and cleanup of torn files."""
import os
import stat
import subprocess
import sys

import pytest
import torch

from nl_plugin import fileio
from nl_plugin.fileio import FileExistsWriteError, atomic_torch_save, atomic_write, atomic_write_bytes


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after it)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize('mask', [0o022, 0o077, 0o002, 0o027])
def test_written_files_honour_the_umask_like_open(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / 'plain', 'wb') as f:
        f.write(b'x')
    atomic_torch_save({'w': torch.ones(2)}, tmp_path / 'net.pth')                     # checkpoints, states
    atomic_write(tmp_path / 'metrics.csv', lambda f: f.write('a,b\n'), mode='w')      # test CSVs
    atomic_write_bytes(tmp_path / 'out.png', b'png', overwrite=False)                # basicsr infer outputs
    expected = 0o666 & ~mask
    assert stat.S_IMODE(os.stat(tmp_path / 'plain').st_mode) == expected
    for name in ('net.pth', 'metrics.csv', 'out.png'):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == expected, name


def test_no_overwrite_is_decided_at_the_rename(tmp_path):
    path = tmp_path / 'a.png'

    def write_and_meanwhile_another_process_wins(f):
        f.write(b'mine')
        path.write_bytes(b'theirs')            # appears after any check before the write

    with pytest.raises(FileExistsWriteError, match=f'{path} exists'):
        atomic_write(path, write_and_meanwhile_another_process_wins, overwrite=False)
    assert path.read_bytes() == b'theirs' and os.listdir(tmp_path) == ['a.png']
    atomic_write(path, lambda f: f.write(b'mine'), overwrite=True)
    assert path.read_bytes() == b'mine'


_KILLED_WRITER = '''
import sys
from nl_plugin.fileio import atomic_write_bytes
atomic_write_bytes(sys.argv[1], b'x' * 1000)
'''


def test_a_killed_writer_leaves_a_temp_file_that_cleanup_removes_but_a_live_one_is_kept(tmp_path):
    env = dict(os.environ, NL_PLUGIN_FAULT='kill_during_save:1')
    r = subprocess.run([sys.executable, '-c', _KILLED_WRITER, str(tmp_path / 'a.png')], env=env, timeout=120)
    assert r.returncode == -9
    (torn,) = os.listdir(tmp_path)
    assert torn.startswith('.a.png.') and torn.endswith('.tmp') and os.path.getsize(tmp_path / torn) == 500
    (tmp_path / '.user.tmp').write_bytes(b'not ours')

    def write_while_cleanup_runs(f):
        f.write(b'live')
        live = [n for n in os.listdir(tmp_path) if n.startswith('.b.png.')]
        assert len(live) == 1
        # the dead writer's file goes; this live one (locked) and a file of another name stay
        assert fileio.remove_stale_temp_files(tmp_path, names=['a.png', 'b.png']) == [torn]
        assert sorted(os.listdir(tmp_path)) == sorted(['.user.tmp', live[0]])

    atomic_write(tmp_path / 'b.png', write_while_cleanup_runs, overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ['.user.tmp', 'b.png']


def test_a_cleanup_between_creating_and_locking_the_temp_file_does_not_break_the_write(tmp_path, monkeypatch):
    """A cleanup that runs after the writer created its temporary file but before it took the lock removes that
    (still unlocked) file; the writer must notice and take a new one, not write into an unlinked file."""
    real_lock, removed = fileio._lock, []

    def cleanup_first(fd):
        if not removed:                 # once, at the writer's lock; the cleanup's own lock is the real one
            removed.append(None)
            removed[:] = fileio.remove_stale_temp_files(tmp_path)
        return real_lock(fd)

    monkeypatch.setattr(fileio, '_lock', cleanup_first)
    atomic_write_bytes(tmp_path / 'a.png', b'data')
    assert len(removed) == 1 and removed[0].startswith('.a.png.')      # the interleaving did happen
    assert (tmp_path / 'a.png').read_bytes() == b'data' and os.listdir(tmp_path) == ['a.png']


def test_no_overwrite_succeeds_when_the_temporary_name_cannot_be_removed_after_the_link(tmp_path, monkeypatch):
    """Once the link made the complete file, a failing removal of the temporary name is no failed write."""
    real_remove = os.remove

    def remove(path, *a, **kw):
        if fileio.is_temp_name(os.path.basename(path), of='a.png'):
            raise PermissionError(13, 'Permission denied', path)
        return real_remove(path, *a, **kw)

    monkeypatch.setattr(os, 'remove', remove)
    atomic_write_bytes(tmp_path / 'a.png', b'data', overwrite=False)
    monkeypatch.undo()
    assert (tmp_path / 'a.png').read_bytes() == b'data'
    assert fileio.remove_stale_temp_files(tmp_path) != []     # the left-over name goes at the next cleanup
    assert os.listdir(tmp_path) == ['a.png']
