"""Opening and reading a BasicSR LMDB so that a damaged one is an error naming it, never a crash.

LMDB maps ``data.mdb`` into memory: reading a page past the end of a truncated file raises SIGBUS and
kills the process (in a DataLoader worker PyTorch then blames shared memory). :func:`open_lmdb`
compares the file size with the last page the LMDB header says is in use before anything is read, and
:func:`lmdb_get` compares it again before every read (a handle inherited by a forked worker, a file
truncated while open); it also turns LMDB's own errors on damaged pages into an error naming the LMDB
and the key.
"""
import os
import os.path as osp

import lmdb
from basicsr.utils import FileClient

_REMEDY = 're-create it with scripts/create_lmdb.py'


def open_lmdb(root, io_kwargs, dataset_type='LMDB'):
    """A BasicSR ``FileClient('lmdb')`` for the LMDB folder ``root`` (client key ``'gt'``), checked first.

    Raises:
        FileNotFoundError: ``data.mdb`` is missing. ValueError: it is empty, truncated, or LMDB refuses it.
    """
    data = osp.join(root, 'data.mdb')
    if not osp.isfile(data):
        raise FileNotFoundError(f'{dataset_type}: LMDB {root!r} has no data.mdb; {_REMEDY}')
    size = osp.getsize(data)
    if size == 0:
        raise ValueError(f'{dataset_type}: LMDB {root!r}: data.mdb is empty (0 bytes); {_REMEDY}')
    try:
        client = FileClient('lmdb', **io_kwargs)
        env = client.client._client['gt']
        need = (env.info()['last_pgno'] + 1) * env.stat()['psize']
    except lmdb.Error as err:
        raise ValueError(f'{dataset_type}: cannot open LMDB {root!r} ({type(err).__name__}: {err}); '
                         f'{_REMEDY}') from None
    if size < need:
        env.close()
        raise ValueError(_truncated(dataset_type, root, size, need))
    client.nl_plugin_size_check = (data, need)
    return client


def _truncated(dataset_type, root, size, need):
    return (f'{dataset_type}: LMDB {root!r} is truncated: data.mdb has {size} bytes but its header uses {need}; '
            f'{_REMEDY}')


def lmdb_get(client, key, root, dataset_type='LMDB'):
    """``client.get(key, 'gt')`` with LMDB's errors (corrupt or missing pages) naming the LMDB and the key."""
    data, need = getattr(client, 'nl_plugin_size_check', (None, 0))
    if data is not None:
        try:
            size = os.stat(data).st_size
        except OSError:
            size = 0
        if size < need:
            raise ValueError(f'{_truncated(dataset_type, root, size, need)} (reading key {key!r})')
    try:
        return client.get(key, 'gt')
    except lmdb.Error as err:
        raise ValueError(f'{dataset_type}: cannot read key {key!r} from LMDB {root!r} '
                         f'({type(err).__name__}: {err}); the LMDB is damaged, {_REMEDY}') from None
