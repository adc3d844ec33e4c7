"""Conversion of an official N3Net denoising checkpoint into a state dict for ``N3Net()`` (default args).

The official file (``051_ckpt.t7``) is a legacy ``torch.save`` of ``{'net': OrderedDict, 'epoch': 51}``; it
is read with ``torch.load(map_location='cpu', weights_only=True)``. The output is ``{'params': state_dict}``
(BasicSR's ``path.pretrain_network_g`` format, ``param_key_g: params``) that loads strictly.

Key mapping (official -> nl_plugin):

* ``blocks.{i}.conv1`` -> ``stages.{i}.conv_first``, ``blocks.{i}.layer1.{n}`` -> ``stages.{i}.body.{n}``,
  ``blocks.{i}.conv2`` -> ``stages.{i}.conv_last``; ``blocks.{i}.bn1.*`` (never applied) is dropped;
* ``nls.{j}.embedcnn.{n}`` -> ``n3_blocks.{j}.embed.{n}``, ``nls.{j}.tempcnn.{n}`` -> ``n3_blocks.{j}.temp.{n}``,
  ``nls.{j}.n3aggregation.aggregation.nnn.bn`` -> ``n3_blocks.{j}.dist_bn``;
* BatchNorm ``num_batches_tracked`` (absent in the official file) is added as 0.

The weights themselves are not part of this project and may not be redistributed.
Command line: ``scripts/convert_n3net_official.py``.
"""
import os
import re
from collections import OrderedDict

import torch

from nl_plugin.archs.n3net_arch import N3Net
from nl_plugin.weights import safe_torch_load, save_weights, strip_module_prefix

_RULES = [
    (re.compile(r'^blocks\.(\d+)\.conv1\.(weight|bias)$'), r'stages.\1.conv_first.\2'),
    (re.compile(r'^blocks\.(\d+)\.layer1\.(\d+)\.(\w+)$'), r'stages.\1.body.\2.\3'),
    (re.compile(r'^blocks\.(\d+)\.conv2\.(weight|bias)$'), r'stages.\1.conv_last.\2'),
    (re.compile(r'^nls\.(\d+)\.embedcnn\.(\d+)\.(\w+)$'), r'n3_blocks.\1.embed.\2.\3'),
    (re.compile(r'^nls\.(\d+)\.tempcnn\.(\d+)\.(\w+)$'), r'n3_blocks.\1.temp.\2.\3'),
    (re.compile(r'^nls\.(\d+)\.n3aggregation\.aggregation\.nnn\.bn\.(\w+)$'), r'n3_blocks.\1.dist_bn.\2'),
]
_DEAD = re.compile(r'^blocks\.\d+\.bn1\.\w+$')  # defined but never used by the official forward


def load_official_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Read the official state dict from ``051_ckpt.t7`` (or from a bare state dict file).

    Args:
        path (str): The official checkpoint.

    Returns:
        dict[str, Tensor]: The official tensors under their official names.

    Raises:
        FileNotFoundError: ``path`` does not exist (names it).
        KeyError: The file holds neither ``{'net': state_dict}`` nor a state dict (names the file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'official N3Net checkpoint not found: {path}')
    ckpt = safe_torch_load(path)
    state = ckpt.get('net', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise KeyError(f"{path}: expected {{'net': OrderedDict of tensors, 'epoch': int}} (official N3Net layout)")
    return state


def convert_state_dict(official: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Map an official N3Net state dict to ``N3Net()``'s keys (see the module docstring).

    Args:
        official (dict[str, Tensor]): Official tensors; a ``module.`` prefix (DataParallel) is accepted.

    Returns:
        OrderedDict[str, Tensor]: Copies of the tensors under nl_plugin's names, with the BatchNorm
        ``num_batches_tracked`` counters added.

    Raises:
        KeyError: On a key that belongs to neither layout (names the key).
    """
    out = OrderedDict()
    for key, val in strip_module_prefix(official).items():
        if _DEAD.match(key):
            continue
        for pattern, repl in _RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = val.clone()
                break
        else:
            raise KeyError(f'unexpected key in the official N3Net checkpoint: {key!r}')
    for key in list(out):  # BatchNorm modules: add the counter PyTorch now stores
        if key.endswith('.running_mean'):
            prefix = key[:-len('running_mean')]
            out.setdefault(prefix + 'num_batches_tracked', torch.tensor(0, dtype=torch.long))
    return out


def convert_file(checkpoint: str, output: str, verify: bool = True) -> OrderedDict[str, torch.Tensor]:
    """Read ``checkpoint``, convert it and save it to ``output`` as a weight file that names its architecture
    (``{'params': state_dict, 'arch': {'type': 'N3Net'}}``, or safetensors by the file's extension).

    Args:
        checkpoint (str): The official checkpoint (see :func:`load_official_checkpoint`).
        output (str): Where to write the converted file.
        verify (bool): Load the result strictly into ``N3Net()`` before writing. Default True.

    Returns:
        OrderedDict[str, Tensor]: The converted state dict.
    """
    params = convert_state_dict(load_official_checkpoint(checkpoint))
    if verify:
        N3Net().load_state_dict(params, strict=True)
    save_weights(params, output, arch={'type': 'N3Net'})
    return params
