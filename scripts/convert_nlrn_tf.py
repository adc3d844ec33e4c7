#!/usr/bin/env python
"""Convert an official NLRN TensorFlow checkpoint into a BasicSR ``net_g.pth`` for ``NLRN()``.

    python scripts/convert_nlrn_tf.py --checkpoint PREFIX --output net_g.pth

The official network works on pixel values 0..255; ours on [0, 1]. The scale is folded into the
weights so that the converted ``NLRN()`` (default arguments) maps x/255 to official(x)/255:

* input BN: moving mean / 255, moving variance / 255^2 and gamma rescaled by
  255 * sqrt(var/255^2 + eps) / sqrt(var + eps) (exact with eps = 1e-3 in inference);
* conv_end kernel and bias / 255 (the residual is added to the input).

Reading the checkpoint needs TensorFlow (``tf.train.load_checkpoint``); the mapping itself
(``convert_arrays``) is a pure function on a dict of NumPy arrays.
"""
import argparse
import math
import sys

import numpy as np

SCALE = 255.0
BN_EPS = 1e-3
NUM_STEPS = 12


def _bn_names(prefix):
    return {'weight': f'{prefix}/gamma', 'bias': f'{prefix}/beta', 'running_mean': f'{prefix}/moving_mean',
            'running_var': f'{prefix}/moving_variance'}


def _conv_names(prefix):
    return {'weight': f'{prefix}/kernel', 'bias': f'{prefix}/bias'}


def name_map(num_steps=NUM_STEPS):
    """PyTorch ``NLRN`` parameter name -> official TF variable name."""
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
    """Official-layout arrays -> ``NLRN`` state dict (NumPy float32), 255 scale folded in.

    Args:
        arrays (dict[str, np.ndarray]): TF variable name -> value (kernels HWIO).
        num_steps (int): Number of recurrent steps of the checkpoint. Default: 12.

    Returns:
        dict[str, np.ndarray]: PyTorch names -> values (kernels OIHW), without ``num_batches_tracked``.
    """
    missing = [v for v in name_map(num_steps).values() if v not in arrays]
    if missing:
        raise KeyError(f'checkpoint lacks {len(missing)} NLRN variables, e.g. {missing[:3]}')
    out = {}
    for tname, vname in name_map(num_steps).items():
        a = np.asarray(arrays[vname], dtype=np.float64)
        if a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)        # HWIO -> OIHW
        out[tname] = a
    # Fold the 0..255 scale (see module docstring).
    var = out['bn_first.running_var']
    new_var = var / SCALE**2
    out['bn_first.weight'] = out['bn_first.weight'] * SCALE * np.sqrt(new_var + BN_EPS) / np.sqrt(var + BN_EPS)
    out['bn_first.running_mean'] = out['bn_first.running_mean'] / SCALE
    out['bn_first.running_var'] = new_var
    out['conv_last.weight'] = out['conv_last.weight'] / SCALE
    out['conv_last.bias'] = out['conv_last.bias'] / SCALE
    return {k: v.astype(np.float32) for k, v in out.items()}


def to_torch_state_dict(arrays, num_steps=NUM_STEPS, dtype=None):
    """``convert_arrays`` as torch tensors, with ``num_batches_tracked`` so ``load_state_dict`` is strict."""
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help='TF checkpoint prefix (e.g. .../model.ckpt-400000)')
    parser.add_argument('--output', required=True, help='output .pth ({"params": state_dict})')
    args = parser.parse_args(argv)
    import torch
    sd = to_torch_state_dict(read_checkpoint(args.checkpoint))
    torch.save({'params': sd}, args.output)
    print(f'wrote {len(sd)} tensors to {args.output}')


if __name__ == '__main__':
    sys.exit(main())
