"""Networks and inputs for the analysis scripts: a network from an option file and weights, an input image."""
import os
from copy import deepcopy

import cv2
import numpy as np
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

from nl_plugin.config_checks import check_kwargs


def parse_overrides(items):
    """``['key=value', ...]`` -> dict, values read as YAML (``window_size=45``, ``nl_scope=window``, ``x=~``)."""
    out = {}
    from nl_plugin.utils import key_value_arg
    for item in items or ():
        key, value = key_value_arg(item)
        out[key] = value
    return out


def build_network(net_opt):
    """An architecture from a ``network_g``-style dict, with nl_plugin's error for unknown keys."""
    net_opt = deepcopy(net_opt)
    arch = ARCH_REGISTRY.get(net_opt.pop('type'))
    check_kwargs(arch, net_opt, where=f'network {arch.__name__}')
    return arch(**net_opt)


def load_checkpoint(net, path, param_key='params'):
    """Load a BasicSR ``net_g_*.pth`` (``param_key``, else 'params') or a plain state dict, strictly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--weights: {path!r} does not exist')
    state = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and param_key in state:
        state = state[param_key]
    elif isinstance(state, dict) and 'params' in state:
        state = state['params']
    net.load_state_dict({k[7:] if k.startswith('module.') else k: v for k, v in state.items()}, strict=True)
    return net


def network_from_options(opt_path, overrides=None, weights=None, param_key='params'):
    """The ``network_g`` of a BasicSR option file, with ``overrides`` applied and ``weights`` loaded, in eval mode."""
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    if 'network_g' not in opt:
        raise KeyError(f'{opt_path}: no network_g section')
    net_opt = dict(opt['network_g'], **(overrides or {}))
    net = build_network(net_opt)
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
