"""``basicsr infer`` on images made here: formats and bit depths, colour modes, SR input, refusals and errors.

Two runs go through the installed console script / ``python -m``; the others call the same entry point
(``nl_plugin.cli.main``) in this process to keep the file fast.
"""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

from conftest import basicsr_cmd
from nl_plugin import cli, image_io, weights

DNCNN = {'type': 'DnCNN', 'num_feat': 8, 'depth': 3}


def make_net(spec, seed=0):
    torch.manual_seed(seed)
    net = ARCH_REGISTRY.get(spec['type'])(**{k: v for k, v in spec.items() if k != 'type'})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def apply(net, plane):
    """The network on one (H, W) float plane, as reference."""
    with torch.no_grad():
        return net(torch.from_numpy(plane.astype(np.float32))[None, None])[0, 0].numpy()


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp('infer')
    net = make_net(DNCNN)
    path = str(root / 'dncnn.pth')
    weights.save_weights(net.state_dict(), path, arch=DNCNN)
    return net, path


def images(folder, rng):
    os.makedirs(folder, exist_ok=True)
    files = {
        'g8.png': rng.integers(0, 256, (20, 24), dtype=np.uint8),
        'c16.png': rng.integers(0, 65536, (18, 22, 3), dtype=np.uint16),
        'c8.jpg': rng.integers(0, 256, (16, 20, 3), dtype=np.uint8),
        'g16.tif': rng.integers(0, 65536, (14, 12), dtype=np.uint16),
    }
    for name, img in files.items():
        cv2.imwrite(os.path.join(folder, name), img)
    return files


def infer(*args):
    return cli.main(['infer', *map(str, args)])


def test_folder_of_formats_keeps_bit_depth(tmp_path, model):
    net, path = model
    src = images(tmp_path / 'in', np.random.default_rng(0))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([basicsr_cmd(), 'infer', '--model', path, '--input', str(tmp_path / 'in'), '--output',
                        str(tmp_path / 'out'), '--precision', 'fp32'], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / 'out')) == sorted(src)
    assert 'g16.tif -> ' in r.stderr and '16-bit' in r.stderr and 'image' in r.stderr   # per-image line + bar
    for name, img in src.items():
        out = cv2.imread(str(tmp_path / 'out' / name), cv2.IMREAD_UNCHANGED)
        assert out.shape == img.shape and out.dtype == img.dtype, name
    # 16-bit gray: exactly the network on the image, rounded to 16 bits
    g16 = cv2.imread(str(tmp_path / 'in' / 'g16.tif'), cv2.IMREAD_UNCHANGED).astype(np.float32) / 65535
    ref = np.round(np.clip(apply(net, g16), 0, 1) * 65535)
    out = cv2.imread(str(tmp_path / 'out' / 'g16.tif'), cv2.IMREAD_UNCHANGED).astype(np.float64)
    assert np.abs(out - ref).max() <= 1
    # colour into the 1-channel network: each channel on its own (default --color rgb)
    c16 = cv2.imread(str(tmp_path / 'in' / 'c16.png'), cv2.IMREAD_UNCHANGED).astype(np.float32) / 65535
    out = cv2.imread(str(tmp_path / 'out' / 'c16.png'), cv2.IMREAD_UNCHANGED).astype(np.float64)
    for c in range(3):
        assert np.abs(out[:, :, c] - np.round(np.clip(apply(net, c16[:, :, c]), 0, 1) * 65535)).max() <= 1


def test_gray_model_on_colour_photo_gray_and_y(tmp_path, model):
    net, path = model
    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8), (3, 3), 0)
    cv2.imwrite(str(tmp_path / 'photo.png'), img)
    assert infer('--model', path, '--input', tmp_path / 'photo.png', '--output', tmp_path / 'gray',
                 '--color', 'gray', '--precision', 'fp32') == 0
    gray = cv2.imread(str(tmp_path / 'gray' / 'photo.png'), cv2.IMREAD_UNCHANGED)
    ref = apply(net, cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_BGR2GRAY))
    assert gray.ndim == 2 and np.abs(gray - np.round(np.clip(ref, 0, 1) * 255)).max() <= 1
    assert infer('--model', path, '--input', tmp_path / 'photo.png', '--output', tmp_path / 'y',
                 '--color', 'y', '--precision', 'fp32') == 0
    from basicsr.utils import bgr2ycbcr, ycbcr2bgr
    ycc = bgr2ycbcr(img.astype(np.float32) / 255)
    ycc[..., 0] = apply(net, ycc[..., 0])                       # Y restored, Cb/Cr as they were
    ref = np.round(np.clip(ycbcr2bgr(ycc), 0, 1) * 255)
    out = cv2.imread(str(tmp_path / 'y' / 'photo.png')).astype(np.float64)
    assert np.abs(out - ref).max() <= 1 and np.abs(out - img).mean() > 3


def test_sr_scale_and_python_m_with_arch_for_a_bare_file(tmp_path):
    spec = {'type': 'DnCNN', 'num_feat': 8, 'depth': 3, 'bn': False}     # VDSR's layout
    net = make_net(spec, seed=3)
    bare = tmp_path / 'bare.pth'
    torch.save({'params': net.state_dict()}, bare)
    rng = np.random.default_rng(2)
    cv2.imwrite(str(tmp_path / 'small.png'), rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'nl_plugin.infer', '--model', str(bare), '--input',
                        str(tmp_path / 'small.png'), '--output', str(tmp_path / 'sr'), '--scale', '3',
                        '--arch', 'DnCNN', '--arch-opt', 'num_feat=8', '--arch-opt', 'depth=3',
                        '--arch-opt', 'bn=false'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'colour y' in r.stderr
    assert cv2.imread(str(tmp_path / 'sr' / 'small.png')).shape == (27, 33, 3)


def test_existing_output_is_not_overwritten(tmp_path, model, capsys):
    _, path = model
    cv2.imwrite(str(tmp_path / 'a.png'), np.full((8, 8), 100, np.uint8))
    os.makedirs(tmp_path / 'out')
    cv2.imwrite(str(tmp_path / 'out' / 'a.png'), np.zeros((8, 8), np.uint8))
    before = (tmp_path / 'out' / 'a.png').read_bytes()
    assert infer('--model', path, '--input', tmp_path / 'a.png', '--output', tmp_path / 'out') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'basicsr infer: error: {tmp_path / "out" / "a.png"} exists; nothing was written '
                   '(use --overwrite to replace)']
    assert (tmp_path / 'out' / 'a.png').read_bytes() == before
    assert infer('--model', path, '--input', tmp_path / 'a.png', '--output', tmp_path / 'out', '--overwrite') == 0
    assert (tmp_path / 'out' / 'a.png').read_bytes() != before


def test_unreadable_image_is_named_and_the_others_are_written(tmp_path, model, capsys):
    _, path = model
    os.makedirs(tmp_path / 'in')
    (tmp_path / 'in' / 'broken.png').write_bytes(b'not an image at all')
    cv2.imwrite(str(tmp_path / 'in' / 'good.png'), np.full((8, 8), 50, np.uint8))
    assert infer('--model', path, '--input', tmp_path / 'in', '--output', tmp_path / 'out') == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if 'error' in line]
    assert len(errors) == 1
    assert errors[0].startswith(f'basicsr infer: error: {tmp_path / "in" / "broken.png"}: cannot be read as an image')
    assert os.listdir(tmp_path / 'out') == ['good.png']


def test_weights_that_do_not_fit_give_one_line_listing_keys(tmp_path, capsys):
    wrong = tmp_path / 'wrong.pth'
    weights.save_weights(make_net({'type': 'DnCNN', 'num_feat': 4, 'depth': 3}).state_dict(), wrong, arch=DNCNN)
    cv2.imwrite(str(tmp_path / 'a.png'), np.zeros((8, 8), np.uint8))
    assert infer('--model', wrong, '--input', tmp_path / 'a.png', '--output', tmp_path / 'out') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(wrong) in err[0] and 'shape mismatch (' in err[0]
    assert 'conv_first.weight: file (4, 1, 3, 3) vs network (8, 1, 3, 3)' in err[0]
    assert not os.path.exists(tmp_path / 'out' / 'a.png')
    assert infer('--model', tmp_path / 'nothing.pth', '--input', tmp_path / 'a.png', '--output', tmp_path / 'o') == 2
    assert 'nothing.pth: no such weight file' in capsys.readouterr().err


def test_bf16_tiles_and_self_ensemble(tmp_path, model):
    net, path = model
    img = cv2.GaussianBlur(np.random.default_rng(4).integers(0, 256, (40, 36), dtype=np.uint8), (5, 5), 0)
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    outs = {}
    for name, extra in (('fp32', ['--precision', 'fp32']), ('bf16', ['--precision', 'bf16']),
                        ('one_tile', ['--precision', 'fp32', '--tile', '64']),
                        ('tiled', ['--precision', 'fp32', '--tile', '16:8']),
                        ('ensemble', ['--precision', 'fp32', '--self-ensemble'])):
        assert infer('--model', path, '--input', tmp_path / 'a.png', '--output', tmp_path / name, *extra) == 0
        outs[name] = cv2.imread(str(tmp_path / name / 'a.png'), cv2.IMREAD_UNCHANGED).astype(int)
    assert np.abs(outs['bf16'] - outs['fp32']).max() <= 4
    assert np.array_equal(outs['one_tile'], outs['fp32'])
    diff = np.abs(outs['tiled'] - outs['fp32'])
    assert 0 < diff.mean() < 8      # tiles ran (their zero-padded edges differ a little from the whole image)
    x = img.astype(np.float32) / 255
    views = [np.rot90(np.fliplr(x) if f else x, k) for f in (0, 1) for k in range(4)]
    back = [np.rot90(apply(net, np.ascontiguousarray(v)), -k) for v, k in zip(views, list(range(4)) * 2)]
    ref = np.mean([b if i < 4 else np.fliplr(b) for i, b in enumerate(back)], axis=0)
    assert np.abs(outs['ensemble'] - np.round(np.clip(ref, 0, 1) * 255)).max() <= 1


# ---------------------------------------------------------------- defaults, files and folders from elsewhere
def _png_header_only(width, height):
    """A PNG that claims width x height in its header (a decompression bomb's header, without the bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b''))


def _errors(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if 'error' in ln or 'Traceback' in ln]


def test_default_precision_is_the_models_fp32_output(tmp_path, model, capsys):
    """Without --precision infer gives basicsr test's result (fp32), also on a CPU with native bf16."""
    from nl_plugin.models.precision import resolve_precision
    net, path = model
    img = cv2.GaussianBlur(np.random.default_rng(5).integers(0, 65536, (24, 20), dtype=np.uint16), (5, 5), 0)
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    assert infer('--model', path, '--input', tmp_path / 'a.png', '--output', tmp_path / 'out') == 0
    assert '(fp32)' in capsys.readouterr().err
    ref = np.round(np.clip(apply(net, img.astype(np.float32) / 65535), 0, 1) * 65535)
    out = cv2.imread(str(tmp_path / 'out' / 'a.png'), cv2.IMREAD_UNCHANGED).astype(np.float64)
    assert np.abs(out - ref).max() <= 1          # one 16-bit level: bf16 is hundreds away
    # auto is opt-in and resolved once, by models/precision (native bf16 only, oneDNN checked)
    assert infer('--model', path, '--input', tmp_path / 'a.png', '--output', tmp_path / 'auto',
                 '--precision', 'auto') == 0
    dtype, why = resolve_precision('auto', 'cpu')
    assert f'({"bf16" if dtype else "fp32"}, {why})' in capsys.readouterr().err


def test_restorer_from_python_and_each_architecture_declares_its_tiles(model):
    from nl_plugin.archs.arch_util import auto_tile
    from nl_plugin.infer import Restorer
    net, _ = model
    x = np.random.default_rng(6).random((12, 10, 1), dtype=np.float32)
    out = Restorer(net, DNCNN, device='cpu').restore(x)
    assert np.array_equal(out[:, :, 0], apply(net, x[:, :, 0]))
    tiled = Restorer(net, DNCNN, device='cpu', tile=(8, 4), tile_batch=2).restore(x)
    assert tiled.shape == out.shape and not np.array_equal(tiled, out)
    nlrn = ARCH_REGISTRY.get('NLRN')
    n3net = ARCH_REGISTRY.get('N3Net')(num_feat=8, depth=2, num_stages=2)
    small = {'num_feat': 8, 'num_embed': 4, 'num_steps': 1}
    assert auto_tile(nlrn(**small), 100, 100) == (45, 22)
    assert auto_tile(nlrn(**small, nl_scope='window'), 2000, 3000) is None
    assert auto_tile(nlrn(**small, nl_scope='window'), 2100, 3000) == (2048, 128)
    assert auto_tile(nlrn(**small, nl_scope='window', border='circular'), 600, 100) == (512, 128)
    assert auto_tile(n3net, 1000, 1025) == (512, 96) and auto_tile(n3net, 1024, 1024) is None
    assert auto_tile(net, 1000, 1025) == (512, 64)


def test_killed_write_leaves_no_output_and_the_rerun_cleans_up(tmp_path, model, capsys):
    _, path = model
    os.makedirs(tmp_path / 'in')
    for name in ('a.png', 'b.png'):
        cv2.imwrite(str(tmp_path / 'in' / name), np.random.default_rng(7).integers(0, 256, (16, 16), np.uint8))
    env = dict(os.environ, OMP_NUM_THREADS='1', NL_PLUGIN_FAULT='kill_during_save:1')
    r = subprocess.run([basicsr_cmd(), 'infer', '--model', path, '--input', str(tmp_path / 'in'), '--output',
                        str(tmp_path / 'out')], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    (torn,) = os.listdir(tmp_path / 'out')                     # half of a.png, under a hidden temporary name
    assert torn.startswith('.a.png.') and torn.endswith('.tmp')
    assert infer('--model', path, '--input', tmp_path / 'in', '--output', tmp_path / 'out') == 0
    assert f'removed {tmp_path / "out" / torn}, left by an interrupted run' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / 'out')) == ['a.png', 'b.png']
    assert cv2.imread(str(tmp_path / 'out' / 'a.png')) is not None


def test_a_file_another_run_wrote_meanwhile_is_kept_and_named(tmp_path, model, capsys, monkeypatch):
    """The existence check before the run cannot see a concurrent run: the rename itself refuses."""
    from nl_plugin.infer import Restorer
    _, path = model
    os.makedirs(tmp_path / 'in')
    for name in ('a.png', 'b.png', 'c.png'):
        cv2.imwrite(str(tmp_path / 'in' / name), np.full((8, 8), 60, np.uint8))
    theirs = tmp_path / 'out' / 'b.png'
    restore, calls = Restorer.restore, []

    def restore_while_another_run_finishes_b(self, img):
        calls.append(1)
        if len(calls) == 2:
            theirs.write_bytes(b'the other run')
        return restore(self, img)

    monkeypatch.setattr(Restorer, 'restore', restore_while_another_run_finishes_b)
    assert infer('--model', path, '--input', tmp_path / 'in', '--output', tmp_path / 'out') == 1
    assert _errors(capsys) == [f'basicsr infer: error: {theirs} exists (written by another process meanwhile?); '
                               'this one was not written']
    assert theirs.read_bytes() == b'the other run'
    assert sorted(os.listdir(tmp_path / 'out')) == ['a.png', 'b.png', 'c.png']


def _limit_file_size_and_set_umask():
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    os.umask(0o027)


def test_full_disk_by_file_size_limit_is_one_line_and_no_torn_file(tmp_path, model):
    """ulimit -f: the image too large for it gets one line, the small one is written, no temporary file stays.
    The output's mode is what the umask gives a plain open() (0640 under 027), not mkstemp's 0600."""
    pytest.importorskip('resource')
    _, path = model
    os.makedirs(tmp_path / 'in')
    rng = np.random.default_rng(8)
    cv2.imwrite(str(tmp_path / 'in' / 'big.png'), rng.integers(0, 65536, (96, 96), dtype=np.uint16))
    cv2.imwrite(str(tmp_path / 'in' / 'small.png'), np.full((8, 8), 90, np.uint8))
    os.makedirs(tmp_path / 'out')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    r = subprocess.run([basicsr_cmd(), 'infer', '--model', path, '--input', str(tmp_path / 'in'), '--output',
                        str(tmp_path / 'out')], capture_output=True, text=True, env=env, timeout=300,
                       preexec_fn=_limit_file_size_and_set_umask)
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if 'error' in ln]
    assert errors == [f'basicsr infer: error: {tmp_path / "out" / "big.png"}: cannot be written (File too large)']
    assert os.listdir(tmp_path / 'out') == ['small.png']
    assert os.stat(tmp_path / 'out' / 'small.png').st_mode & 0o777 == 0o640


def test_full_disk_stops_with_one_line_and_no_torn_file(tmp_path, model, capsys):
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    _, path = model
    os.makedirs(tmp_path / 'in')
    rng = np.random.default_rng(9)
    for i in range(4):
        cv2.imwrite(str(tmp_path / 'in' / f'n{i}.png'), rng.integers(0, 65536, (64, 64), dtype=np.uint16))
    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=12k', 'tmpfs', str(disk)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip('cannot mount a tmpfs here')
    try:
        assert infer('--model', path, '--input', tmp_path / 'in', '--output', disk) == 1
        errors = _errors(capsys)
        written = sorted(os.listdir(disk))
        assert len(errors) == 1 and 'cannot be written (No space left on device)' in errors[0], errors
        assert f'stopped, {3 - len(written)} more image(s) not written' in errors[0]
        assert all(cv2.imread(str(disk / n)) is not None for n in written)   # nothing torn, no temporary file
    finally:
        subprocess.run(['umount', str(disk)], capture_output=True, check=False)


def test_image_bombs_are_refused_from_the_header_and_decoder_errors_stay_per_file(tmp_path, model, capsys):
    _, path = model
    os.makedirs(tmp_path / 'in')
    (tmp_path / 'in' / 'bomb.png').write_bytes(_png_header_only(60000, 60000))
    (tmp_path / 'in' / 'torn.png').write_bytes(_png_header_only(20, 20))          # header fine, data missing
    cv2.imwrite(str(tmp_path / 'in' / 'photo.png'), np.full((40, 50), 70, np.uint8))
    assert infer('--model', path, '--input', tmp_path / 'in', '--output', tmp_path / 'out') == 1
    errors = _errors(capsys)
    assert errors == [
        f'basicsr infer: error: {tmp_path / "in" / "bomb.png"}: 60000x60000 = 3,600,000,000 pixels is more than '
        'the limit of 89,478,485 (a decompression bomb?); raise it with --max-pixels',
        f'basicsr infer: error: {tmp_path / "in" / "torn.png"}: cannot be read as an image']
    assert os.listdir(tmp_path / 'out') == ['photo.png']
    # the limit is an option; with none, OpenCV's own refusal of the bomb is one line too
    assert infer('--model', path, '--input', tmp_path / 'in' / 'photo.png', '--output', tmp_path / 'o2',
                 '--max-pixels', '1999') == 1
    assert 'is more than the limit of 1,999' in _errors(capsys)[0]
    assert not os.path.exists(tmp_path / 'o2' / 'photo.png')
    assert infer('--model', path, '--input', tmp_path / 'in' / 'photo.png', '--output', tmp_path / 'o2',
                 '--max-pixels', '2000') == 0
    assert infer('--model', path, '--input', tmp_path / 'in' / 'bomb.png', '--output', tmp_path / 'o3',
                 '--max-pixels', '0') == 1
    (line,) = _errors(capsys)
    assert line.startswith(f'basicsr infer: error: {tmp_path / "in" / "bomb.png"}: cannot be decoded (OpenCV: ')
    assert line.endswith('unless OPENCV_IO_MAX_IMAGE_PIXELS is set in the environment')


def test_header_sizes_of_every_format(tmp_path):
    img = np.random.default_rng(10).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    for ext in image_io.IMAGE_EXTS:
        cv2.imwrite(str(tmp_path / f'x{ext}'), img)
        assert image_io.header_size(str(tmp_path / f'x{ext}')) == (17, 13), ext
    cv2.imwrite(str(tmp_path / 'p.jpg'), img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    cv2.imwrite(str(tmp_path / 'a.webp'), np.dstack([img, img[:, :, :1]]), [cv2.IMWRITE_WEBP_QUALITY, 101])
    cv2.imwrite(str(tmp_path / 'g.tif'), img[:, :, 0].astype(np.uint16))
    for name in ('p.jpg', 'a.webp', 'g.tif'):
        assert image_io.header_size(str(tmp_path / name)) == (17, 13), name
    (tmp_path / 'x.pgm').write_bytes(b'P5 17 13 255\n' + bytes(221))
    assert image_io.header_size(str(tmp_path / 'x.pgm')) is None


def _tiff_with_widths(widths, height):
    """An 8-bit gray, uncompressed TIFF whose first page lists ImageWidth once per entry of ``widths``
    (the decoder, libtiff, takes the first), with pixel data for the widest."""
    import struct
    entries = [(256, w) for w in widths] + [(257, height), (258, 8), (259, 1), (262, 1), (273, None), (277, 1),
                                            (278, height), (279, max(widths) * height)]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack('<H', len(entries)) + b''.join(
        struct.pack('<HHII', tag, 4, 1, data_at if value is None else value) for tag, value in entries)
    return b'II*\x00' + struct.pack('<I', 8) + ifd + struct.pack('<I', 0) + bytes(max(widths) * height)


def _jpeg_with_orientation(img, orientation):
    """A JPEG of ``img`` with an EXIF APP1 segment carrying only the Orientation tag."""
    import struct
    exif = b'Exif\x00\x00MM\x00*' + struct.pack('>IHHHIHHI', 8, 1, 274, 3, 1, orientation, 0, 0)
    data = cv2.imencode('.jpg', img)[1].tobytes()
    return data[:2] + b'\xff\xe1' + struct.pack('>H', len(exif) + 2) + exif + data[2:]


def test_the_pixel_limit_holds_for_the_size_the_decoder_uses(tmp_path, model, capsys, monkeypatch):
    """A TIFF listing its width twice (200, then 10) is measured as libtiff decodes it (the first: 200x10), so
    --max-pixels refuses it; a header the decoder disagrees with is refused after decoding; an EXIF-rotated
    JPEG still reads at its stored size (IMREAD_UNCHANGED does not apply the orientation)."""
    _, path = model
    tif = tmp_path / 'dup.tif'
    tif.write_bytes(_tiff_with_widths([200, 10], 10))
    assert image_io.header_size(str(tif)) == (200, 10)
    assert infer('--model', path, '--input', tif, '--output', tmp_path / 'out', '--max-pixels', '1999') == 1
    assert _errors(capsys) == [f'basicsr infer: error: {tif}: 200x10 = 2,000 pixels is more than the limit of '
                               '1,999 (a decompression bomb?); raise it with --max-pixels']
    img, _, _ = image_io.read_image(str(tif), max_pixels=2000)
    assert img.shape == (10, 200, 1)
    monkeypatch.setattr(image_io, 'header_size', lambda p: (10, 10))     # a header parse the decoder disagrees with
    with pytest.raises(image_io.ImageError, match=r'dup.tif: its header says 10x10 pixels but it decodes to 200x10 '
                                                  r'\(a damaged or crafted file\)$'):
        image_io.read_image(str(tif))
    monkeypatch.undo()
    rotated = tmp_path / 'rotated.jpg'
    rotated.write_bytes(_jpeg_with_orientation(np.full((13, 17, 3), 90, np.uint8), 6))
    assert cv2.imread(str(rotated)).shape == (17, 13, 3)                   # the orientation is there
    assert image_io.header_size(str(rotated)) == (17, 13)
    assert image_io.read_image(str(rotated))[0].shape == (13, 17, 3)


def test_output_folder_problems_stop_before_any_work_and_a_folder_is_never_replaced(tmp_path, model, capsys):
    _, path = model
    cv2.imwrite(str(tmp_path / 'a.png'), np.full((8, 8), 40, np.uint8))
    cv2.imwrite(str(tmp_path / 'b.png'), np.full((8, 8), 40, np.uint8))
    (tmp_path / 'file').write_bytes(b'')
    assert infer('--model', path, '--input', tmp_path / 'a.png', '--output', tmp_path / 'file' / 'out') == 2
    assert _errors(capsys) == [f'basicsr infer: error: --output {tmp_path / "file" / "out"}: cannot be created, '
                               f'{tmp_path / "file"} is not a folder']
    # an output name that is a folder: with --overwrite, one line and that file skipped
    os.makedirs(tmp_path / 'out' / 'a.png' / 'keep')
    assert infer('--model', path, '--input', tmp_path, '--output', tmp_path / 'out', '--overwrite') == 1
    assert _errors(capsys) == [f'basicsr infer: error: {tmp_path / "out" / "a.png"}: is a folder; not replaced']
    assert os.path.isdir(tmp_path / 'out' / 'a.png' / 'keep') and os.path.isfile(tmp_path / 'out' / 'b.png')
    # a read-only folder: one line naming it before the model is even read
    ro = tmp_path / 'ro'
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro,size=16k', 'tmpfs', str(ro)], capture_output=True,
                          check=False).returncode != 0:
            pytest.skip('cannot mount a read-only tmpfs here')
    else:
        ro.chmod(0o500)
    try:
        for out in (ro, ro / 'sub'):
            assert infer('--model', tmp_path / 'no.pth', '--input', tmp_path / 'a.png', '--output', out) == 2
            (line,) = _errors(capsys)
            assert line.startswith(f'basicsr infer: error: --output {out}: ') and 'read-only' in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(['umount', str(ro)], capture_output=True, check=False)
        else:
            ro.chmod(0o700)


def test_val_tile_auto_reads_the_same_declaration(tmp_path):
    """``val: tile: auto`` (basicsr test / validation) tiles as the architecture declares, like infer."""
    from basicsr.models import build_model

    from nl_plugin.ops.tiling import tiled_forward
    spec = {'type': 'NLRN', 'num_feat': 8, 'num_embed': 4, 'num_steps': 1}
    opt = {'name': 'auto_tile', 'model_type': 'RestorationModel', 'is_train': False, 'dist': False, 'num_gpu': 0,
           'rank': 0, 'world_size': 1, 'scale': 1, 'network_g': dict(spec), 'path': {},
           'val': {'tile': 'auto', 'metrics': {}}}
    model = build_model(opt)
    x = torch.rand(1, 1, 60, 50)
    model.feed_data({'lq': x})
    model.test()
    net = model.net_g.eval()
    with torch.no_grad():
        ref = tiled_forward(net, x, 45, overlap=22)
        whole = net(x)
    assert torch.equal(model.output, ref) and not torch.allclose(model.output, whole)
    with pytest.raises(ValueError, match="val:tile must be .* or 'auto', got 'atuo'"):
        build_model(dict(opt, val={'tile': 'atuo', 'metrics': {}}))


def test_a_jpeg_header_scan_reads_a_bounded_number_of_bytes(tmp_path, model, capsys):
    """A JPEG start followed by megabytes without a marker (or of 0xFF fill) is given up after
    ``image_io._JPEG_SKIP`` bytes, with one line; a few bytes of garbage between segments are still skipped."""
    import io

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, n=-1):
            data = super().read(n)
            self.read_bytes += len(data)
            return data

    bound = image_io._JPEG_SKIP + 2**16
    for filler in (b'\x00', b'\xff'):
        data = b'\xff\xd8' + filler * (4 * 2**20)
        f = Counting(data)
        assert image_io._jpeg_size(f) is None and f.read_bytes <= bound, filler
    _, path = model
    bad = tmp_path / 'in' / 'bad.jpg'
    os.makedirs(bad.parent)
    bad.write_bytes(b'\xff\xd8' + bytes(4 * 2**20))
    assert infer('--model', path, '--input', bad, '--output', tmp_path / 'out') == 1
    assert _errors(capsys) == [f'basicsr infer: error: {bad}: cannot be read as an image (not a PNG, JPEG, TIFF, '
                               'BMP or WebP file, or a damaged header)']
    jpeg = cv2.imencode('.jpg', np.full((13, 17), 50, np.uint8))[1].tobytes()
    for junk in (b'\x00' * 5000, b'\xff' * 5000):     # garbage, fill: what decoders skip before a marker
        f = Counting(jpeg[:2] + junk + jpeg[2:])
        assert image_io._jpeg_size(f) == (17, 13) and f.read_bytes < 2**16, junk[:1]
