"""Official NLRN TensorFlow checkpoint -> ``NLRN()`` state dict (CLI: ``scripts/convert_nlrn_tf.py``).

The official network works on pixel values 0..255, and so does ``NLRN()`` inside (``img_range=255``
multiplies its [0, 1] input and divides its output), so the variables are copied one-to-one: kernels
transposed from TF's HWIO to PyTorch's OIHW, nothing rescaled. The state dict carries the marker
``img_range_marker = 255``; loading it into an NLRN built with another ``img_range`` rescales the input
BN and ``conv_last`` exactly (``nl_plugin.archs.nlrn_layout``).

Reading the checkpoint needs TensorFlow (``tf.train.load_checkpoint``); the mapping itself
(``convert_arrays``) is a pure function on a dict of NumPy arrays.
"""
import argparse

import numpy as np

from nl_plugin.archs.nlrn_layout import MARKER

#: Pixel range of the official code (its inputs, outputs, loss and BN statistics are on 0..255).
OFFICIAL_RANGE = 255.0
NUM_STEPS = 12


def _bn_names(prefix):
    return {'weight': f'{prefix}/gamma', 'bias': f'{prefix}/beta', 'running_mean': f'{prefix}/moving_mean',
            'running_var': f'{prefix}/moving_variance'}


def _conv_names(prefix):
    return {'weight': f'{prefix}/kernel', 'bias': f'{prefix}/bias'}


def name_map(num_steps=NUM_STEPS):
    """PyTorch ``NLRN`` parameter name -> official TF variable name.

    Args:
        num_steps (int): Recurrent steps of the checkpoint. Default: 12.

    Returns:
        dict[str, str]
    """
    m = {}

    def add(torch_prefix, names):
        for k, v in names.items():
            m[f'{torch_prefix}.{k}'] = v

    add('bn_first', _bn_names('model/batch_normalization'))
    add('conv_first', _conv_names('model/conv1'))
    add('nonlocal_blocks.0.theta', _conv_names('model/rnn/non_local_theta'))
    add('nonlocal_blocks.0.phi', _conv_names('model/rnn/non_local_phi'))
    add('nonlocal_blocks.0.g', _conv_names('model/rnn/non_local_g'))
    add('convs_a.0', _conv_names('model/rnn/RB1_a'))
    add('convs_b.0', _conv_names('model/rnn/RB1_b'))
    for t in range(num_steps):
        for j in range(3):   # BN_t1, BN_t2, BN_t3 are created in this order in every step
            n = 3 * t + j
            add(f'bns.{t}.{j}', _bn_names('model/rnn/batch_normalization' + (f'_{n}' if n else '')))
    add('bn_last', _bn_names('model/batch_normalization_1'))
    add('conv_last', _conv_names('model/conv_end'))
    return m


def convert_arrays(arrays, num_steps=NUM_STEPS):
    """Official-layout arrays -> ``NLRN(img_range=255)`` state dict (NumPy float32), values unchanged.

    Args:
        arrays (dict[str, np.ndarray]): TF variable name -> value (kernels HWIO).
        num_steps (int): Number of recurrent steps of the checkpoint. Default: 12.

    Returns:
        dict[str, np.ndarray]: PyTorch names -> values (kernels OIHW) and the range marker (255),
        without ``num_batches_tracked``.
    """
    names = name_map(num_steps)
    missing = [v for v in names.values() if v not in arrays]
    if missing:
        raise KeyError(f'checkpoint lacks {len(missing)} NLRN variables, e.g. {missing[:3]}')
    out = {}
    for tname, vname in names.items():
        a = np.asarray(arrays[vname], dtype=np.float32)
        out[tname] = np.ascontiguousarray(a.transpose(3, 2, 0, 1)) if a.ndim == 4 else a   # HWIO -> OIHW
    out[MARKER] = np.array(OFFICIAL_RANGE, dtype=np.float32)
    return out


def to_torch_state_dict(arrays, num_steps=NUM_STEPS, dtype=None):
    """``convert_arrays`` as torch tensors, with ``num_batches_tracked`` so ``load_state_dict`` is strict.

    Args:
        arrays (dict[str, np.ndarray]): TF variable name -> value.
        num_steps (int): Recurrent steps. Default: 12.
        dtype (torch.dtype | None): Tensor dtype. Default: float32.

    Returns:
        dict[str, Tensor]
    """
    import torch
    sd = {}
    for k, v in convert_arrays(arrays, num_steps).items():
        sd[k] = torch.from_numpy(v).to(dtype or torch.float32)
        if k.endswith('running_var'):
            sd[k[:-len('running_var')] + 'num_batches_tracked'] = torch.tensor(0)
    return sd


def read_checkpoint(prefix):
    """All variables of a TF checkpoint as NumPy arrays (needs TensorFlow)."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise SystemExit('reading a TensorFlow checkpoint needs `pip install tensorflow`') from e
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def main(argv=None):
    """``python scripts/convert_nlrn_tf.py --checkpoint PREFIX --output net_g.pth``."""
    parser = argparse.ArgumentParser(description='Convert an official NLRN TF checkpoint into a BasicSR net_g.pth')
    parser.add_argument('--checkpoint', required=True, help='TF checkpoint prefix (e.g. .../model.ckpt-400000)')
    parser.add_argument('--output', required=True, help='output .pth or .safetensors, naming its architecture')
    args = parser.parse_args(argv)
    from nl_plugin.weights import save_weights
    sd = to_torch_state_dict(read_checkpoint(args.checkpoint))
    save_weights(sd, args.output, arch={'type': 'NLRN'})
    print(f'wrote {len(sd)} tensors to {args.output} (official 0..255 layout: NLRN img_range 255)')
