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
from nl_plugin import cli, weights

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
    assert errors == [f'basicsr infer: error: {tmp_path / "in" / "broken.png"}: cannot be read as an image']
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
