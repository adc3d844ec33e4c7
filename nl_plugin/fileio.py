"""Crash-safe file writes: every checkpoint, training state, CSV and ``basicsr infer`` output goes through here.

A file is written to a temporary name in its own folder (hidden: ``.<name>.<8 hex digits>.tmp``), flushed
and fsync'ed, then renamed over the final name, and the folder is fsync'ed. A reader (or a resumed run)
therefore sees either the previous complete file or the new complete one, never a torn file, whatever kills
the process. Any failure (a full disk, a missing folder, a permission error) removes the temporary file and
raises :class:`WriteError` naming the file: nothing is retried and nothing is ignored.

The temporary file is created with mode 0666 as a plain ``open()`` does, so the kernel applies the umask (and
a folder's default ACL): the final file has the permissions any other program's file would have there
(``mkstemp``'s 0600 would survive the rename). While it is being written, the writer holds an ``flock`` on it;
:func:`remove_stale_temp_files` removes only temporary files nobody holds, i.e. those of a process that died,
so a cleanup never breaks another process writing into the same folder.

``overwrite=False`` makes the final step a hard link (``link(2)`` fails if the name exists) followed by the
removal of the temporary name: whichever of two concurrent writers links first wins, the other gets
:class:`FileExistsWriteError` and its file is not written. On filesystems without hard links (FAT, some FUSE
mounts) the existence check and the rename are two steps.

Fault injection for tests: ``NL_PLUGIN_FAULT=kill_during_save:<n>`` makes the process SIGKILL itself
halfway through writing the n-th file of :func:`atomic_write_bytes` (checkpoints, weight files, training
states and ``basicsr infer`` outputs; counted from 1 in each process), after half of its bytes reached the
temporary file.
"""
from __future__ import annotations

import errno
import io
import os
import re
import secrets
import signal
from typing import IO, Any, Callable

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; a cleanup there removes every temporary file it finds
    fcntl = None

FAULT_ENV = 'NL_PLUGIN_FAULT'
TMP_SUFFIX = '.tmp'
_TMP_NAME = re.compile(r'^\.(?P<name>.+)\.[0-9a-z_]{8}' + re.escape(TMP_SUFFIX) + '$')
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
_SAVES = [0]  # files written by atomic_write_bytes in this process (for fault injection)


class WriteError(OSError):
    """A file could not be written completely; the message names it. The previous version is intact."""


class FileExistsWriteError(WriteError):
    """``overwrite=False`` and the final name exists (made by another process while this one wrote)."""


def temp_prefix(path: str | os.PathLike) -> str:
    """Prefix of the temporary files :func:`atomic_write` makes for ``path`` (hidden, in the same folder)."""
    return f'.{os.path.basename(os.fspath(path))}.'


def is_temp_name(name: str, of: str | None = None) -> bool:
    """Whether the file name ``name`` is a temporary file of :func:`atomic_write` (for the final name ``of``)."""
    m = _TMP_NAME.match(name)
    return bool(m) and (of is None or m.group('name') == of)


def _lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if another open file holds one."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock: nothing to coordinate with
        return True
    return True


def _create_temp(path: str) -> tuple[int, str]:
    """Create and lock a new temporary file for ``path``; returns (fd, name)."""
    folder = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_BINARY', 0)
    for _ in range(100):
        tmp = os.path.join(folder, f'{temp_prefix(path)}{secrets.token_hex(4)}{TMP_SUFFIX}')
        try:
            fd = os.open(tmp, flags, 0o666)    # 0666 & ~umask, as open() would
        except FileExistsError:
            continue
        # A cleanup may have locked and removed the new file before this lock: then start again. The name is
        # checked after the lock, so a removal before it is seen and none can follow it.
        if _lock(fd):
            now = _stat(tmp)
            if now is not None and os.path.samestat(os.fstat(fd), now):
                return fd, tmp
        os.close(fd)
    raise FileExistsError(errno.EEXIST, 'no free temporary file name', os.path.join(folder, temp_prefix(path)))


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsWriteError(f'{path} exists (written by another process meanwhile?); '
                                   'this one was not written') from None
    except OSError as err:
        if err.errno not in _NO_LINK:
            raise
        if os.path.lexists(path):
            raise FileExistsWriteError(f'{path} exists (written by another process meanwhile?); '
                                       'this one was not written') from None
        os.rename(tmp, path)
        return
    # the link made the complete file: a temporary name that stays is a cleanup's (remove_stale_temp_files)
    _remove(tmp)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[Any]], Any], mode: str = 'wb',
                 overwrite: bool = True) -> None:
    """Write ``path`` atomically: ``write_fn(f)`` fills a temporary file that is then renamed over ``path``.

    Args:
        path (str | os.PathLike): Final file name. Its folder must exist.
        write_fn (Callable[[file], None]): Writes the whole content to the open file object it receives.
        mode (str): ``'wb'`` (default) or ``'w'`` (text, ``newline=''``).
        overwrite (bool): Replace an existing ``path`` (default). If False, an existing ``path`` is kept, also
            one that another process makes while this one writes, and :class:`FileExistsWriteError` is raised.

    Raises:
        WriteError: the content could not be written, synced or renamed; the temporary file is removed and
            ``path`` keeps its previous content (or stays absent).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = _create_temp(path)
        kwargs = {'newline': ''} if 'b' not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:    # closing it releases the lock, after the rename
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
            _publish(tmp, path, overwrite)
        tmp = None
        fsync_path(folder)
    except FileExistsWriteError:
        _remove(tmp)
        raise
    except Exception as err:
        _remove(tmp)
        raise WriteError(f'cannot write {path!r}: {type(err).__name__}: {err}') from err


def _remove(path: str | None) -> None:
    if path is not None:
        try:
            os.remove(path)
        except OSError:
            pass


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder by name (a folder makes a rename durable on POSIX); a path that cannot be opened
    for it (a folder on Windows) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fault_index():
    spec = os.environ.get(FAULT_ENV, '')
    kind, _, n = spec.partition(':')
    if kind != 'kill_during_save':
        return None
    try:
        return int(n)
    except ValueError:
        raise ValueError(f'{FAULT_ENV}: expected kill_during_save:<n>, got {spec!r}') from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write the bytes ``data`` to ``path`` through :func:`atomic_write` (the one place fault injection
    counts files, see the module docstring); usable as ``nl_plugin.weights.save_weights(write=...)``."""
    _SAVES[0] += 1
    if _fault_index() == _SAVES[0]:
        def write_half_and_die(f):
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(path, write_half_and_die, overwrite=overwrite)
        return
    atomic_write(path, lambda f: f.write(data), overwrite=overwrite)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write_bytes`: serialized in memory first, so a full
    disk surfaces as the ``OSError`` of the write itself (torch's zip writer would report "unexpected pos")."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def remove_stale_temp_files(folder: str | os.PathLike, names: list[str] | None = None) -> list[str]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folder``; return their names.

    A temporary file still locked by its writer (another process writing now) is left alone.

    Args:
        folder (str): The folder.
        names (list[str], optional): Only the temporary files of these final file names (default: all).
    """
    if not os.path.isdir(folder):
        return []
    wanted = None if names is None else {os.path.basename(n) for n in names}
    stale = []
    for name in sorted(os.listdir(folder)):
        m = _TMP_NAME.match(name)
        if not (m if wanted is not None else name.startswith('.') and name.endswith(TMP_SUFFIX)):
            continue
        if wanted is not None and m.group('name') not in wanted:
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_CLOEXEC', 0))
        except OSError:
            continue
        try:
            now = _stat(path)
            if not _lock(fd) or now is None or not os.path.samestat(os.fstat(fd), now):
                continue            # its writer is alive (or the name went meanwhile)
            os.remove(path)
            stale.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return stale


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temporary file in ``folder``; raises the ``OSError`` of a folder that takes none."""
    fd, tmp = _create_temp(os.path.join(os.fspath(folder), 'write-check'))
    os.close(fd)
    os.remove(tmp)
