"""Writing a BasicSR LMDB (``data.mdb``, ``lock.mdb`` and ``meta_info.txt``) from an image folder.

Every image directly inside the folder is stored PNG-encoded under its name without extension
(BasicSR's key convention), and ``meta_info.txt`` gets one line ``name.png (h,w,c) compress_level``
per image. Images may have different sizes: the LMDB map size is computed from all encoded images
(BasicSR's ``make_lmdb_from_imgs`` guesses it from the first image only). An existing output is never
overwritten.

Every file is decoded the way the datasets decode bytes (``cv2.imdecode``, which refuses a truncated JPEG
that ``cv2.imread`` would fill with grey rows), and the stored PNG is decoded back and compared with it.
The LMDB is written into a temporary folder next to the output and renamed to it only when complete, so
an interrupted run leaves no output behind. ``scripts/create_lmdb.py`` is the command line.
"""
import os
import os.path as osp
import shutil
import tempfile

import cv2
import numpy as np
from tqdm import tqdm


def _imports():
    """BasicSR's LMDB writer, imported through nl_plugin (its compatibility fixes make ``import basicsr``
    work); done lazily because importing torch is slow and not needed to print --help or an error."""
    import nl_plugin  # noqa: F401  (before BasicSR: its compatibility fixes)
    # isort: split
    from basicsr.utils.lmdb_util import LmdbMaker

    from nl_plugin.data.data_util import image_files
    return LmdbMaker, image_files


def create_lmdb(input_folder, lmdb_path, compress_level=1, gray=False, progress=True):
    """Write the images of ``input_folder`` into a new BasicSR LMDB at ``lmdb_path``.

    Args:
        input_folder (str): folder with the images (not recursive).
        lmdb_path (str): output, must end with ``.lmdb`` and must not exist.
        compress_level (int): PNG compression level 0-9 stored in ``meta_info.txt``. Default 1 (BasicSR's).
        gray (bool): convert colour images to gray (``cv2.COLOR_BGR2GRAY``) before storing.
        progress (bool): show tqdm progress bars.

    Returns:
        list[str]: the LMDB keys, in the order written.

    Raises:
        FileExistsError: ``lmdb_path`` exists. ValueError: bad path/level, no images, a file that cannot be
        decoded, or names that BasicSR cannot use as keys (non-ASCII, containing '.', duplicated stems).
    """
    lmdb_path = str(lmdb_path)
    if not lmdb_path.endswith('.lmdb'):
        raise ValueError(f"output {lmdb_path!r} must end with '.lmdb' (BasicSR's LMDB convention)")
    if osp.exists(lmdb_path):
        raise FileExistsError(f'output {lmdb_path!r} already exists; not overwriting it (delete it first)')
    if not osp.isdir(input_folder):
        raise ValueError(f'input folder {input_folder!r} does not exist or is not a folder')
    if not (isinstance(compress_level, int) and 0 <= compress_level <= 9):
        raise ValueError(f'--compress-level must be an integer 0..9, got {compress_level!r}')
    LmdbMaker, image_files = _imports()
    names = image_files(input_folder)
    if not names:
        raise ValueError(f'no image files in {input_folder!r}')

    keys = []
    for name in names:
        key = osp.splitext(name)[0]
        # BasicSR's paths_from_lmdb keeps what precedes the first '.', and LMDB keys are ASCII-encoded
        if '.' in key or not key.isascii() or ' ' in key:
            raise ValueError(f'{osp.join(input_folder, name)!r}: BasicSR LMDB keys must be ASCII without '
                             f"'.' or spaces; rename the file")
        keys.append(key)
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f'{input_folder!r}: several files share the name(s) {dup} (different extensions); '
                         'LMDB keys would collide')

    # pass 1: read and encode everything, to size the map from the real encoded bytes
    # the bar is closed before an error propagates, so the error is the last line a user sees
    with tqdm(list(zip(names, keys)), desc='encode', unit='img', disable=not progress) as bar:
        encoded = [(key, *_encode(osp.join(input_folder, name), gray, compress_level)) for name, key in bar]
    total = sum(len(b) for _, b, _ in encoded)
    # values are stored in overflow pages (4 KiB each) + B-tree pages per key; generous head room
    map_size = int(total * 1.5) + 16 * 1024 * len(encoded) + 64 * 1024 ** 2
    parent = osp.dirname(osp.abspath(lmdb_path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(lmdb_path)}.', suffix='.lmdb', dir=parent)
    try:
        os.rmdir(tmp)  # LmdbMaker creates the folder itself and refuses an existing one
        maker = LmdbMaker(tmp, map_size=map_size, compress_level=compress_level)
        try:
            for key, data, shape in tqdm(encoded, desc='write', unit='img', disable=not progress):
                maker.put(data, key, shape)
        finally:
            maker.close()
        for name in os.listdir(tmp):
            _fsync(osp.join(tmp, name))
        os.rename(tmp, lmdb_path)  # fails rather than replace an output that appeared meanwhile
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return keys


def _encode(path, gray, compress_level):
    """Decode ``path`` as the datasets will, PNG-encode it, and check the stored bytes decode to the same pixels.

    Returns:
        tuple: (PNG bytes, (h, w, c)).
    """
    with open(path, 'rb') as f:
        raw = np.frombuffer(f.read(), np.uint8)
    img = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if img is None:
        raise ValueError(f'cannot decode image {path!r} (corrupt, truncated or not an image file)')
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if gray and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise ValueError(f'cannot PNG-encode image {path!r}')
    back = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if back is None or back.shape != img.shape or not np.array_equal(back, img):
        raise ValueError(f'image {path!r} does not survive a PNG round trip ({img.dtype}, shape {img.shape})')
    h, w = img.shape[:2]
    return buf.tobytes(), (h, w, 1 if img.ndim == 2 else img.shape[2])


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
