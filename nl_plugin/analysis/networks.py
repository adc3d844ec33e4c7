"""Networks and inputs for the analysis scripts: a network from an option file and weights, an input image."""
import cv2
import numpy as np
import torch
import yaml

from nl_plugin.utils import key_value_arg
from nl_plugin.weights import WeightsError, build_network, mismatch_report, read_state_dict


def parse_overrides(items):
    """``['key=value', ...]`` -> dict, values read as YAML (``window_size=45``, ``nl_scope=window``, ``x=~``)."""
    return dict(key_value_arg(item) for item in items or ())


def load_checkpoint(net, path, param_key='params'):
    """Load a weight file (``.pth`` or ``.safetensors``: ``param_key``, else 'params', or a bare state dict)
    into ``net`` strictly; a missing or unfit file is a one-line ``WeightsError`` naming ``--weights``."""
    state, _ = read_state_dict(path, param_key, where='--weights')
    report = mismatch_report(net, state)
    if report:
        raise WeightsError(f'--weights: {path} does not fit {type(net).__name__}: {report}')
    net.load_state_dict(state, strict=True)
    return net


def network_from_options(opt_path, overrides=None, weights=None, param_key='params'):
    """The ``network_g`` of a BasicSR option file, with ``overrides`` applied and ``weights`` loaded, in eval mode."""
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    if 'network_g' not in opt:
        raise KeyError(f'{opt_path}: no network_g section')
    net_opt = dict(opt['network_g'], **(overrides or {}))
    net = build_network(net_opt, where=f'{opt_path}: network_g')
    if weights:
        load_checkpoint(net, weights, param_key)
    return net.eval(), net_opt


def read_image(path, channels):
    """An image file as float32 in [0, 1]: (H, W) for 1 channel (cv2 gray, the papers' protocol), else RGB."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f'--image: cannot read {path!r}')
    img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if channels == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img.astype(np.float32) / 255.0


def add_noise(img, sigma, seed=0):
    """Gaussian noise of ``sigma`` (0..255 scale), seeded; unclipped as in both papers."""
    if not sigma:
        return img
    return img + np.random.default_rng(seed).normal(0, sigma / 255.0, img.shape).astype(np.float32)


def to_tensor(img):
    """(H, W) or (H, W, C) array -> (1, C, H, W) float tensor."""
    arr = img[..., None] if img.ndim == 2 else img
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None].float()


__all__ = ['parse_overrides', 'build_network', 'load_checkpoint', 'network_from_options', 'read_image', 'add_noise',
           'to_tensor']
