"""Crash-safe file writes: every checkpoint, training state and CSV nl_plugin writes goes through here.

A file is written to a temporary name in its own folder, flushed and fsync'ed, then renamed over the
final name, and the folder is fsync'ed. A reader (or a resumed run) therefore sees either the previous
complete file or the new complete one, never a torn file, whatever kills the process. Any failure (a
full disk, a missing folder, a permission error) removes the temporary file and raises
:class:`WriteError` naming the file: nothing is retried and nothing is ignored.

Fault injection for tests: ``NL_PLUGIN_FAULT=kill_during_save:<n>`` makes the process SIGKILL itself
halfway through writing the n-th file of :func:`atomic_write_bytes` (checkpoints, weight files and
training states; counted from 1 in each process), after half of its bytes reached the temporary file.
"""
import io
import os
import signal
import tempfile

import torch

FAULT_ENV = 'NL_PLUGIN_FAULT'
TMP_SUFFIX = '.tmp'
_SAVES = [0]  # files written by atomic_torch_save in this process (for fault injection)


class WriteError(OSError):
    """A file could not be written completely; the message names it. The previous version is intact."""


def temp_prefix(path):
    """Prefix of the temporary files :func:`atomic_write` makes for ``path`` (hidden, in the same folder)."""
    return f'.{os.path.basename(path)}.'


def atomic_write(path, write_fn, mode='wb'):
    """Write ``path`` atomically: ``write_fn(f)`` fills a temporary file that is then renamed over ``path``.

    Args:
        path (str | os.PathLike): Final file name. Its folder must exist.
        write_fn (Callable[[file], None]): Writes the whole content to the open file object it receives.
        mode (str): ``'wb'`` (default) or ``'w'`` (text, ``newline=''``).

    Raises:
        WriteError: the content could not be written, synced or renamed; the temporary file is removed and
            ``path`` keeps its previous content (or stays absent).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TMP_SUFFIX, dir=folder)
        kwargs = {'newline': ''} if 'b' not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(folder)
    except Exception as err:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        raise WriteError(f'cannot write {path!r}: {type(err).__name__}: {err}') from err


def _fsync_folder(folder):
    """Make the rename durable (POSIX); folders cannot be opened for syncing on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
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


def atomic_write_bytes(path, data):
    """Write the bytes ``data`` to ``path`` through :func:`atomic_write` (the one place fault injection
    counts files, see the module docstring); usable as ``nl_plugin.weights.save_weights(write=...)``."""
    _SAVES[0] += 1
    if _fault_index() == _SAVES[0]:
        def write_half_and_die(f):
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(path, write_half_and_die)
        return
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)`` through :func:`atomic_write_bytes`: serialized in memory first, so a full
    disk surfaces as the ``OSError`` of the write itself (torch's zip writer would report "unexpected pos")."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def remove_stale_temp_files(folder):
    """Delete temporary files an interrupted :func:`atomic_write` left in ``folder``; return their names."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(n for n in os.listdir(folder) if n.startswith('.') and n.endswith(TMP_SUFFIX))
    for name in stale:
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            pass
    return stale
