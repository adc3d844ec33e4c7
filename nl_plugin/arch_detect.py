"""Architecture of a bare state dict (no ``arch`` entry), read from its keys and tensor shapes.

For files written elsewhere (the official converters' early output, spandrel's loader, which keeps
only the tensors). Everything that shapes the weights is read back: channel counts, depths, number
of steps/stages, ``k``, weight sharing, the embeddings present. Options that leave no trace in the
weights take the constructor's defaults: NLRN ``nl_scope`` / ``window_size`` / ``border`` /
``propagate_correlation`` (and ``correlation`` among the variants with the same embeddings), N3Net's
patch size, stride, search region and temperature mode, ``residual`` of DnCNN. A candidate counts only
if the network it builds has exactly the file's keys and shapes, so a detection is never a guess
about which tensors exist.
"""
import re

from nl_plugin.archs.nlrn_layout import MARKER

_INT = re.compile(r'(\d+)')


def _indices(sd, prefix):
    """Sorted distinct integers ``i`` of keys ``prefix.i.*``."""
    out = set()
    for k in sd:
        if k.startswith(prefix + '.'):
            m = _INT.match(k[len(prefix) + 1:])
            if m:
                out.add(int(m.group(1)))
    return sorted(out)


def _shape(sd, key, dim):
    return int(sd[key].shape[dim])


def _conv_stack(sd, prefix):
    """``(depth, bn)`` of a DnCNN/VDSR-layout module at ``prefix`` (``conv_first``, ``body.*``, ``conv_last``)."""
    body = _indices(sd, f'{prefix}body')
    bn = any(f'{prefix}body.{i}.running_mean' in sd for i in body)
    convs = [i for i in body if sd[f'{prefix}body.{i}.weight'].dim() == 4]
    return len(convs) + 2, bn


def _nlrn(sd):
    steps = _indices(sd, 'bns')
    n_conv, n_nl = len(_indices(sd, 'convs_a')), len(_indices(sd, 'nonlocal_blocks'))
    spec = {'type': 'NLRN', 'num_in_ch': _shape(sd, 'conv_first.weight', 1),
            'num_out_ch': _shape(sd, 'conv_last.weight', 0), 'num_feat': _shape(sd, 'conv_first.weight', 0),
            'num_steps': len(steps)}
    if MARKER in sd and not sd[MARKER].is_meta and float(sd[MARKER]) != 255.0:  # pixel range (nlrn_layout)
        spec['img_range'] = float(sd[MARKER])
    theta, phi = 'nonlocal_blocks.0.theta.weight' in sd, 'nonlocal_blocks.0.phi.weight' in sd
    if theta:
        spec['num_embed'] = _shape(sd, 'nonlocal_blocks.0.theta.weight', 0)
    spec['correlation'] = ('embedded_gaussian' if phi else 'symmetric_embedded_gaussian' if theta else 'gaussian')
    if n_conv > 1:
        spec['share_weights'] = False
        every = [k for k in range(1, len(steps) + 1) if -(-len(steps) // k) == n_nl]
        if every:
            spec['nonlocal_every'] = every[0]
    return spec


def _dncnn(sd):
    depth, bn = _conv_stack(sd, '')
    return {'type': 'DnCNN', 'num_in_ch': _shape(sd, 'conv_first.weight', 1),
            'num_out_ch': _shape(sd, 'conv_last.weight', 0), 'num_feat': _shape(sd, 'conv_first.weight', 0),
            'depth': depth, 'bn': bn}


def _n3net(sd):
    stages = _indices(sd, 'stages')
    depth, bn = _conv_stack(sd, 'stages.0.')
    in_total = _shape(sd, 'stages.0.conv_first.weight', 1)
    out_ch = _shape(sd, f'stages.{stages[-1]}.conv_last.weight', 0)
    spec = {'type': 'N3Net', 'num_out_ch': out_ch, 'num_feat': _shape(sd, 'stages.0.conv_first.weight', 0),
            'depth': depth, 'num_stages': len(stages), 'stage_type': 'dncnn' if bn else 'vdsr'}
    noise = max(in_total - out_ch, 0)
    spec.update(num_in_ch=in_total - noise, num_noise_ch=noise)
    if len(stages) > 1:
        inter = _shape(sd, 'stages.0.conv_last.weight', 0)
        spec.update(num_inter_ch=inter, k=_shape(sd, 'stages.1.conv_first.weight', 1) // inter - 1)
        if 'n3_blocks.0.embed.0.weight' in sd:
            spec['embed_feat'] = _shape(sd, 'n3_blocks.0.embed.0.weight', 0)
        else:
            spec[_selection_key()] = 'knn'
    return spec


def _selection_key():
    """N3Net's keyword for the k-NN ablation (``selection``; ``block_type`` in older trees)."""
    import inspect

    from nl_plugin.archs.n3net_arch import N3Net
    init = getattr(N3Net.__init__, '__wrapped__', N3Net.__init__)
    return 'selection' if 'selection' in inspect.signature(init).parameters else 'block_type'


def _candidates(sd):
    if 'stages.0.conv_first.weight' in sd:
        yield _n3net
    if 'bns.0.0.weight' in sd and 'conv_first.weight' in sd:
        yield _nlrn
    if 'conv_first.weight' in sd and 'conv_last.weight' in sd and not any(k.startswith('bns.') for k in sd):
        yield _dncnn


def fits(spec, sd):
    """Whether the network of ``spec`` has exactly the keys and shapes of ``sd`` (built on the meta device)."""
    from nl_plugin.weights import build_network
    try:
        own = build_network(spec, where='detected', device='meta', max_objects=8 * len(sd) + 256).state_dict()
    except (KeyError, TypeError, ValueError):
        return False
    if spec['type'] == 'NLRN' and MARKER not in sd:   # older NLRN files: the load hook converts them
        own.pop(MARKER, None)
    return own.keys() == sd.keys() and all(tuple(v.shape) == tuple(sd[k].shape) for k, v in own.items())


def detect_arch(state_dict):
    """The arch spec (``{'type': ..., **kwargs}``) whose network has exactly these tensors, or None.

    Args:
        state_dict (dict[str, Tensor]): A bare state dict (no ``module.`` prefix).

    Returns:
        dict | None: NLRN, N3Net or DnCNN spec (a bias-carrying DnCNN without BatchNorm is also VDSR's
        layout at ``upscale=1``, the same function).
    """
    import nl_plugin  # noqa: F401  (registers the archs)
    for read in _candidates(state_dict):
        try:
            spec = read(state_dict)
        except (KeyError, IndexError, ZeroDivisionError):
            continue
        if fits(spec, state_dict):
            return spec
    return None


__all__ = ['detect_arch', 'fits']
