"""Non-local module of NLRN (Liu et al., NeurIPS 2018, Sec. 3.1-3.2) as a reusable block."""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from nl_plugin.ops.windowed_attention import (CorrelationState, check_window_args, euclidean_embeddings,
                                              propagated_attention)

# Paper Table 1 correlation functions -> (embedding used for query/key, normalisation).
CORRELATIONS = {
    'euclidean': ('none', 'softmax'),                       # exp(-||x_i - x_j||^2)
    'dot_product': ('none', 'count'),                       # x_i . x_j / N
    'embedded_dot_product': ('theta_phi', 'count'),         # theta(x_i) . phi(x_j) / N
    'gaussian': ('none', 'softmax'),                        # exp(x_i . x_j)
    'symmetric_embedded_gaussian': ('theta', 'softmax'),    # exp(theta(x_i) . theta(x_j))
    'embedded_gaussian': ('theta_phi', 'softmax'),          # exp(theta(x_i) . phi(x_j)), NLRN default
}
SCOPES = ('patch', 'window')


@ARCH_REGISTRY.register()
class WindowedNonLocalBlock(nn.Module):
    """NLRN non-local module with correlation propagation: ``out = x + A(x) g(x)``.

    The attention ``A`` normalises the correlation of each pixel with its neighbourhood (paper
    eq. 3-6). With correlation propagation, the raw correlations of all previous steps are summed
    before the normalisation (the state is passed in and returned by ``forward``).

    Neighbourhood (``nl_scope``), same weights for both:

    * ``'patch'``: the whole input tensor (official code: 43x43 training patches; at test time the
      image is tiled 45x45, see ``nl_plugin.ops.tiling.tiled_forward``).
    * ``'window'``: the ``window_size`` x ``window_size`` window centred on each pixel over the
      whole image (the paper's description). ``window_size`` None or 0 means the whole image.

    Correlation functions (paper Table 1): softmax normalisation for the Gaussian family, and for
    'dot_product' / 'embedded_dot_product' division by the number N of neighbours (convention of
    Wang et al., Non-local Neural Networks). 'euclidean' uses exp(-||x_i - x_j||^2) on the features.

    Args:
        num_feat (int): Channels of the input and of ``g``. Default: 128.
        num_embed (int): Channels of theta/phi. Default: 64.
        correlation (str): One of ``CORRELATIONS``. Default: 'embedded_gaussian'.
        nl_scope (str): 'patch' or 'window'. Default: 'patch'.
        window_size (int | None): Odd window side for the window scope. Default: 45.
        border (str): Window scope at the image border: 'exclude' (out-of-image neighbours left
            out of the normalisation) or 'circular' (wrap-around). Default: 'exclude'.
        zero_init_g (bool): Initialise ``g`` to zero so the block starts as the identity
            (official). Default: True.
    """

    def __init__(self, num_feat=128, num_embed=64, correlation='embedded_gaussian', nl_scope='patch',
                 window_size=45, border='exclude', zero_init_g=True):
        super().__init__()
        if correlation not in CORRELATIONS:
            raise ValueError(f'correlation must be one of {sorted(CORRELATIONS)}, got {correlation!r}')
        if nl_scope not in SCOPES:
            raise ValueError(f'nl_scope must be one of {SCOPES}, got {nl_scope!r}')
        self.window_size = check_window_args(window_size, border) if nl_scope == 'window' else 0
        self.nl_scope, self.border, self.correlation = nl_scope, border, correlation
        self.num_feat = num_feat
        embed, self.normalization = CORRELATIONS[correlation]
        self.theta = nn.Conv2d(num_feat, num_embed, 1) if embed != 'none' else None
        self.phi = nn.Conv2d(num_feat, num_embed, 1) if embed == 'theta_phi' else None
        self.g = nn.Conv2d(num_feat, num_feat, 1)
        for conv in (self.theta, self.phi, self.g):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
        if zero_init_g:
            nn.init.zeros_(self.g.weight)

    @staticmethod
    def _conv_cl(x_cl, conv):
        """1x1 conv on channels-last (B, H, W, C) features."""
        return F.linear(x_cl, conv.weight.flatten(1), conv.bias)

    def embed(self, x_cl, query=True, key_value=True):
        """Query and key embeddings and values of channels-last features.

        Args:
            x_cl (Tensor): (B, H, W, num_feat) features.
            query (bool): Compute the query embedding q. Default: True.
            key_value (bool): Compute the key embedding k and the values v. Default: True.

        Returns:
            tuple[Tensor, ...]: the requested of q, k (B, H, W, D) and v (B, H, W, num_feat), in that order.
        """
        if self.theta is None:
            q = k = x_cl.contiguous()
            if self.correlation == 'euclidean':
                q, k = euclidean_embeddings(q)
        else:
            q = self._conv_cl(x_cl, self.theta) if query or self.phi is None else None
            k = q if self.phi is None else self._conv_cl(x_cl, self.phi) if key_value else None
        return ((q, ) if query else ()) + ((k, self._conv_cl(x_cl, self.g)) if key_value else ())

    def attend(self, x, state=None, propagate=True):
        """Attention term ``A g`` and the new correlation state.

        Args:
            x (Tensor): (B, C, H, W) features.
            state (CorrelationState, optional): From the previous step.
            propagate (bool): Return a state for the next step.

        Returns:
            tuple[Tensor, CorrelationState | None]: (B, C, H, W) and the state.
        """
        if x.dim() != 4 or x.shape[1] != self.num_feat:
            raise ValueError(f'WindowedNonLocalBlock expects (B, {self.num_feat}, H, W), got {tuple(x.shape)}')
        q, k, v = self.embed(x.permute(0, 2, 3, 1))
        out, state = propagated_attention(q, k, v, state, self.window_size, self.border, self.normalization,
                                          propagate=propagate)
        return out.permute(0, 3, 1, 2), state

    def forward(self, x, state=None, return_state=False):
        """Args:
            x (Tensor): (B, num_feat, H, W).
            state (CorrelationState, optional): Correlation carried from a previous step.
            return_state (bool): Also return the state for the next step.

        Returns:
            Tensor | tuple[Tensor, CorrelationState]: x + attention output [, state].
        """
        attn, new_state = self.attend(x, state, propagate=return_state)
        out = x + attn
        return (out, new_state) if return_state else out


__all__ = ['WindowedNonLocalBlock', 'CORRELATIONS', 'SCOPES', 'CorrelationState']
