"""The papers' data sets in the folders the option files use, every file checked against a SHA-256 manifest.

``scripts/prepare_datasets.py`` is the command line. The manifest (``manifests/datasets.sha256``, in
``sha256sum -c`` format) lists every file of every set: BSD400 (the 400 gray 180x180 training images of both
papers, "Train400"), BSD68, Set12 (gray denoising tests) and Set5, Set14 (SR tests). The files come either
from a download of a public archive that holds them (:data:`SOURCES`) or from a local copy (``source``) in
any layout: files are recognised by their checksums, whatever their names and folders.

For each set the output is ``<out>/<set>/`` with the manifest's file names, and for the training set
``<out>/BSD400.lmdb`` (BasicSR LMDB, :func:`nl_plugin.data.lmdb_writer.create_lmdb`), the names
``options/*.yml`` use. Every set is found and checked before anything is written; each folder is written into
a hidden temporary folder next to it and renamed when complete, so an interrupted run leaves no partial set.
A set already in place is checked file by file and left alone (the command is idempotent); one that differs
from the manifest is reported, never overwritten.
"""
import hashlib
import os
import os.path as osp
import shutil
import tempfile
import urllib.request
import zipfile
from collections import OrderedDict

from nl_plugin.fileio import fsync_path

MANIFEST = osp.join(osp.dirname(osp.abspath(__file__)), 'manifests', 'datasets.sha256')

#: public archives holding the sets: the DnCNN authors' repository at the commit the manifest was made from
SOURCES = OrderedDict([
    ('cszn/DnCNN', {
        'url': 'https://github.com/cszn/DnCNN/archive/e93b27812d3ff523a3a79d19e5e50d233d7a8d0a.zip',
        'sets': ('BSD400', 'BSD68', 'Set12', 'Set5', 'Set14'),
    }),
])

#: sets written as a BasicSR LMDB too (``<out>/<set>.lmdb``, gray) besides the folder: the training set
LMDB_SETS = ('BSD400',)

#: sets the option files use that no public archive with fixed bytes is known for (no checksums)
UNAVAILABLE = ('Urban100', 'BSD100')

_CHUNK = 1 << 20


def how_to_prepare(name, out='datasets'):
    """What to do about a missing set ``name``: the command that prepares it, or where to put its images."""
    if name in UNAVAILABLE:
        return f'no checksummed public copy of {name} is known: put its images into {osp.join(out, name)}'
    try:
        known = name in read_manifest()
    except (OSError, ValueError):
        known = False
    if not known:
        return f'put its images into {osp.join(out, name)}'
    return f'prepare it with: python scripts/prepare_datasets.py --sets {name} --out {out}'


class PrepareError(ValueError):
    """A set cannot be prepared; the one-line message names the file, set or value."""


def sha256_file(path):
    """Hex SHA-256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(_CHUNK), b''):
            h.update(block)
    return h.hexdigest()


def read_manifest(path=MANIFEST):
    """Read a manifest: lines ``<sha256>  <set>/<file>``; blank lines and ``#`` comments are skipped.

    Returns:
        OrderedDict[str, OrderedDict[str, str]]: set -> file name -> hex SHA-256.
    """
    sets = OrderedDict()
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            parts = line.split(None, 1)
            digest = parts[0].lower()
            rel = parts[1].lstrip('*') if len(parts) == 2 else ''
            if len(digest) != 64 or any(c not in '0123456789abcdef' for c in digest) or rel.count('/') != 1:
                raise PrepareError(f'{path}:{n}: expected "<sha256>  <set>/<file>", got {line!r}')
            name, fname = rel.split('/')
            sets.setdefault(name, OrderedDict())[fname] = digest
    if not sets:
        raise PrepareError(f'{path}: the manifest lists no files')
    return sets


def write_manifest(folders, path):
    """Write the manifest of ``{set: folder}`` (every file directly in each folder) to ``path``."""
    lines = []
    for name, folder in folders.items():
        for fname in sorted(os.listdir(folder)):
            if osp.isfile(osp.join(folder, fname)) and not fname.startswith('.'):
                lines.append(f'{sha256_file(osp.join(folder, fname))}  {name}/{fname}\n')
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(lines)


def index_source(root, wanted):
    """Hash the files under ``root`` (recursively) whose size could match; return ``{sha256: path}``
    for the hashes in ``wanted`` and ``{file name: [paths]}`` of every file seen (for error messages)."""
    if not osp.isdir(root):
        raise PrepareError(f'source folder {root!r} does not exist or is not a folder')
    found, by_name = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for fname in sorted(filenames):
            path = osp.join(dirpath, fname)
            if fname.startswith('.') or not osp.isfile(path):
                continue
            by_name.setdefault(fname, []).append(path)
            digest = sha256_file(path)
            if digest in wanted and digest not in found:
                found[digest] = path
    return found, by_name


def _check_set_names(names, manifest):
    unknown = [n for n in names if n not in manifest]
    for n in unknown:
        hint = (f'; no checksummed copy of {n} is known, so it cannot be prepared here: put its images into '
                f'datasets/{n} yourself' if n in UNAVAILABLE else '')
        lower = {k.lower(): k for k in manifest}
        if n.lower() in lower:
            hint = f'; did you mean {lower[n.lower()]!r}?'
        raise PrepareError(f'unknown set {n!r} (the manifest has {", ".join(manifest)}){hint}')


def _verify_folder(folder, files):
    """Check an existing output folder against the manifest; True when it holds exactly ``files``."""
    present = sorted(f for f in os.listdir(folder) if not f.startswith('.'))
    missing = [f for f in files if f not in present]
    if missing:
        raise PrepareError(f'{osp.join(folder, missing[0])} is missing from an existing {folder}; '
                           f'delete {folder} to prepare it again')
    extra = [f for f in present if f not in files]
    if extra:
        raise PrepareError(f'{osp.join(folder, extra[0])} is not in the manifest of {osp.basename(folder)}; '
                           f'delete {folder} to prepare it again')
    for fname, digest in files.items():
        path = osp.join(folder, fname)
        if sha256_file(path) != digest:
            raise PrepareError(f'{path} differs from the manifest (SHA-256 {digest[:12]}...); '
                               f'delete {folder} to prepare it again')
    return True


def _verify_lmdb(lmdb_path, folder):
    """Check an existing LMDB: the same keys as the folder's images and the same pixels."""
    import cv2
    import lmdb
    import numpy as np
    meta = osp.join(lmdb_path, 'meta_info.txt')
    want = sorted(osp.splitext(f)[0] for f in os.listdir(folder) if not f.startswith('.'))
    try:
        with open(meta, encoding='utf-8') as f:
            keys = sorted(line.split()[0].split('.')[0] for line in f if line.strip())
    except OSError:
        raise PrepareError(f'{meta} cannot be read; delete {lmdb_path} to write it again') from None
    if keys != want:
        diff = sorted(set(keys) ^ set(want)) or ['(duplicated keys)']
        raise PrepareError(f'{lmdb_path}: key {diff[0]!r} does not match {folder}; delete {lmdb_path} to write it '
                           'again')
    env = lmdb.open(lmdb_path, readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            for fname in sorted(os.listdir(folder)):
                if fname.startswith('.'):
                    continue
                key = osp.splitext(fname)[0]
                buf = txn.get(key.encode('ascii'))
                img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED) if buf else None
                ref = cv2.imread(osp.join(folder, fname), cv2.IMREAD_UNCHANGED)
                if ref is not None and ref.ndim == 3:
                    ref = cv2.cvtColor(ref[:, :, :3], cv2.COLOR_BGR2GRAY)
                if img is None or ref is None or img.shape != ref.shape or not np.array_equal(img, ref):
                    raise PrepareError(f'{lmdb_path}: the image under key {key!r} differs from '
                                       f'{osp.join(folder, fname)}; delete {lmdb_path} to write it again')
    finally:
        env.close()


def _write_set(folder, files, found):
    """Copy the set's files into a temporary folder next to ``folder``, check them, rename it to ``folder``."""
    parent = osp.dirname(osp.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(folder)}.', suffix='.partial', dir=parent)
    try:
        for fname, digest in files.items():
            dst = osp.join(tmp, fname)
            shutil.copyfile(found[digest], dst)
            if sha256_file(dst) != digest:  # the copy itself (a file changed under us, a bad disk)
                raise PrepareError(f'{dst}: the copy of {found[digest]} does not match the manifest')
            fsync_path(dst)
        fsync_path(tmp)
        os.rename(tmp, folder)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_from_source(source, out='datasets', sets=None, manifest=MANIFEST, lmdb_sets=LMDB_SETS, log=print):
    """Write the sets found under ``source`` into ``out`` (see the module docstring).

    Args:
        source (str): folder with the files, in any layout (searched recursively, matched by SHA-256).
        out (str): output folder. Default ``datasets``.
        sets (list[str] | None): sets to prepare. Default: every set of the manifest.
        manifest (str | dict): manifest file, or the dict :func:`read_manifest` returns.
        lmdb_sets (tuple[str]): sets also written as ``<out>/<set>.lmdb``.
        log (callable): progress messages.

    Returns:
        list[str]: the sets prepared or found in place.

    Raises:
        PrepareError: unknown set, a file missing from ``source`` or differing from the manifest, an existing
        output that differs from it. Raised before anything is written.
    """
    table = read_manifest(manifest) if isinstance(manifest, str) else manifest
    names = list(table) if not sets else list(sets)
    _check_set_names(names, table)
    todo = []
    for name in names:  # every existing output checked first: a bad one stops the run before any write
        folder = osp.join(out, name)
        lmdb_path = folder + '.lmdb'
        if osp.exists(folder):
            _verify_folder(folder, table[name])
            log(f'{folder}: present, {len(table[name])} files match the manifest')
            if name in lmdb_sets and osp.exists(lmdb_path):
                _verify_lmdb(lmdb_path, folder)
        else:
            if name in lmdb_sets and osp.exists(lmdb_path):
                raise PrepareError(f'{lmdb_path} exists without {folder}; delete it to prepare {name} again')
            todo.append(name)
    if todo:
        wanted = {d: (name, f) for name in todo for f, d in table[name].items()}
        found, by_name = index_source(source, wanted)
        for name in todo:
            for fname, digest in table[name].items():
                if digest in found:
                    continue
                seen = by_name.get(fname)
                if seen:
                    raise PrepareError(f'{seen[0]} differs from the manifest (expected SHA-256 {digest[:12]}... for '
                                       f'{name}/{fname}): altered or another version of the file')
                raise PrepareError(f'{name}/{fname} is missing: no file under {source} has its SHA-256 '
                                   f'{digest[:12]}...')
        for name in todo:
            _write_set(osp.join(out, name), table[name], found)
            log(f'{osp.join(out, name)}: wrote {len(table[name])} files, all matching the manifest')
    for name in names:
        if name in lmdb_sets:
            _lmdb(osp.join(out, name), log)
    return names


def _lmdb(folder, log):
    from nl_plugin.data.lmdb_writer import create_lmdb
    lmdb_path = folder + '.lmdb'
    if osp.exists(lmdb_path):  # checked before anything was written
        log(f'{lmdb_path}: present, matches {folder}')
        return
    keys = create_lmdb(folder, lmdb_path, gray=True, progress=False)
    log(f'{lmdb_path}: wrote {len(keys)} images')


def download(url, dest_dir, timeout=60, log=print):
    """Download the zip archive at ``url`` and extract it into ``dest_dir`` (created); return ``dest_dir``."""
    os.makedirs(dest_dir, exist_ok=True)
    archive = osp.join(dest_dir, 'archive.zip')
    log(f'downloading {url} ...')
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(archive, 'wb') as f:
            shutil.copyfileobj(r, f, _CHUNK)
    except OSError as e:  # URLError, HTTPError, timeouts are OSErrors
        raise PrepareError(f'cannot download {url}: {e}; download it yourself and pass --source') from None
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():  # no absolute paths or '..' out of dest_dir
                target = osp.realpath(osp.join(dest_dir, 'x', member))
                if not target.startswith(osp.realpath(osp.join(dest_dir, 'x')) + os.sep):
                    raise PrepareError(f'{url}: archive member {member!r} points outside the archive')
            z.extractall(osp.join(dest_dir, 'x'))
    except zipfile.BadZipFile:
        raise PrepareError(f'{url}: the download is not a zip archive') from None
    os.remove(archive)
    return osp.join(dest_dir, 'x')


def prepare(out='datasets', sets=None, source=None, manifest=MANIFEST, urls=None, lmdb_sets=LMDB_SETS, log=print):
    """Prepare ``sets`` in ``out``: from ``source`` when given, else downloaded from ``urls``
    (default: the :data:`SOURCES` archives that hold a set still to prepare). Args as
    :func:`prepare_from_source`; ``urls`` is a list of zip archive URLs (``file://`` works too)."""
    if source is not None:
        return prepare_from_source(source, out, sets, manifest, lmdb_sets, log)
    table = read_manifest(manifest) if isinstance(manifest, str) else manifest
    names = list(table) if not sets else list(sets)
    _check_set_names(names, table)
    if urls is None:
        missing = [n for n in names if not osp.exists(osp.join(out, n))]
        urls = [s['url'] for s in SOURCES.values() if any(n in s['sets'] for n in missing)]
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.download.', dir=out)
    try:
        for i, url in enumerate(urls):
            download(url, osp.join(tmp, str(i)), log=log)
        return prepare_from_source(tmp, out, names, table, lmdb_sets, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
