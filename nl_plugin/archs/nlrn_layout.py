"""NLRN's parameter layout at a pixel range: the checkpoint marker and the exact rescaling between ranges.

``NLRN(img_range=r)`` multiplies its [0, 1] input by ``r`` and divides its output by ``r``, so its
parameters are those of a network working on pixels in 0..r (the official code: r = 255). Checkpoints
carry the range they were written for as the 0-d buffer ``img_range_marker``. Loading a state dict
written for another range, or one without the marker (written before the marker existed, when the
network ran on [0, 1] pixels: range 1, the official scale folded into the input BN and ``conv_last``),
rescales the two layers that see the pixel scale and logs it:

* input BN ``bn_first`` (its input is c = r_new / r_old times larger): running mean x c, running
  variance x c^2, weight x sqrt(c^2 var + eps) / (c sqrt(var + eps)), bias unchanged;
* ``conv_last`` (the residual is c times larger): weight and bias x c.

The result computes the same function in eval mode (running statistics), exactly up to rounding.
In train mode BN uses batch statistics, where eps acts at the new scale.
"""
import math

import torch
from basicsr.utils import get_root_logger

MARKER = 'img_range_marker'
#: Range of a state dict without the marker: NLRN on [0, 1] pixels, the layout before ``img_range``.
UNMARKED_RANGE = 1.0


def attach_range_marker(net: torch.nn.Module, img_range: float) -> None:
    """Register the marker buffer on ``net`` and the load hook that converts other ranges.

    Args:
        net (nn.Module): An NLRN with ``img_range``, ``bn_first`` (BatchNorm2d) and ``conv_last``.
        img_range (float): The pixel range its parameters work at.
    """
    net.register_buffer(MARKER, torch.tensor(float(img_range)))
    net.register_load_state_dict_pre_hook(_convert_on_load)


def rescale_range(state_dict, factor, prefix='', bn_eps=1e-3):
    """Return ``state_dict`` for pixels ``factor`` times larger, computing the same function (eval mode).

    Args:
        state_dict (dict[str, Tensor | np.ndarray]): NLRN parameters (all other keys pass through).
        factor (float): New range / old range.
        prefix (str): Key prefix of the NLRN inside ``state_dict``. Default: ''.
        bn_eps (float): Epsilon of the input BatchNorm. Default: 1e-3 (NLRN's).

    Returns:
        dict: A new dict; rescaled entries are new objects of the input's type and dtype.
    """
    out = dict(state_dict)
    c = float(factor)
    bn, conv = prefix + 'bn_first.', prefix + 'conv_last.'
    if bn + 'running_var' in out:
        var = _f64(out[bn + 'running_var'])
        if bn + 'weight' in out:
            gain = (c * c * var + bn_eps)**0.5 / (c * (var + bn_eps)**0.5)
            out[bn + 'weight'] = _like(_f64(out[bn + 'weight']) * gain, out[bn + 'weight'])
        out[bn + 'running_var'] = _like(var * c * c, out[bn + 'running_var'])
    if bn + 'running_mean' in out:
        out[bn + 'running_mean'] = _like(_f64(out[bn + 'running_mean']) * c, out[bn + 'running_mean'])
    for k in (conv + 'weight', conv + 'bias'):
        if k in out:
            out[k] = _like(_f64(out[k]) * c, out[k])
    return out


def _f64(v):
    return v.detach().to(torch.float64) if torch.is_tensor(v) else torch.as_tensor(v, dtype=torch.float64)


def _like(v, ref):
    if torch.is_tensor(ref):
        return v.to(ref.dtype)
    return v.numpy().astype(ref.dtype)


def _convert_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook: bring a state dict of another range to ``module.img_range``."""
    key = prefix + MARKER
    saved = state_dict.get(key)
    src = UNMARKED_RANGE if saved is None else float(saved)
    dst = float(module.img_range)
    state_dict[key] = torch.tensor(dst)     # the module keeps its own range
    if not math.isclose(src, dst, rel_tol=1e-6):
        converted = rescale_range(state_dict, dst / src, prefix, module.bn_first.eps)
        state_dict.update(converted)
        how = (f'img_range {src:g}' if saved is not None
               else f'the layout without {MARKER} (pixels in [0, 1], official 0..255 scale folded in)')
        get_root_logger().warning(
            f'NLRN: converted a state dict written for {how} to img_range {dst:g} '
            f'(input BN statistics and conv_last rescaled; same outputs in eval mode).')
