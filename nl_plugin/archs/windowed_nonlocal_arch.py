"""Non-local module of NLRN (Liu et al., NeurIPS 2018, Sec. 3.1-3.2) as a reusable block."""
from typing import Optional, Tuple, Union

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.nn import functional as F

from nl_plugin.ops.nlrn_attention import CorrelationState, check_window_args, euclidean_embeddings, propagated_attention
from nl_plugin.ops.nlrn_attention.router import check_attention_kernel

# Paper Table 1 correlation functions -> (embedding used for query/key, normalisation).
CORRELATIONS = {
    'euclidean': ('none', 'softmax'),                       # exp(-||x_i - x_j||^2)
    'dot_product': ('none', 'count'),                       # x_i . x_j / N
    'embedded_dot_product': ('theta_phi', 'count'),         # theta(x_i) . phi(x_j) / N
    'gaussian': ('none', 'softmax'),                        # exp(x_i . x_j)
    'symmetric_embedded_gaussian': ('theta', 'softmax'),    # exp(theta(x_i) . theta(x_j))
    'embedded_gaussian': ('theta_phi', 'softmax'),          # exp(theta(x_i) . phi(x_j)), NLRN default
}
SCOPES = ('global', 'window')


def check_scope(nl_scope: str, window_size: int, border: str) -> int:
    """Validate ``nl_scope`` and ``window_size``; global attention has one spelling, ``nl_scope='global'``.

    Returns:
        int: ``window_size``.
    """
    if nl_scope == 'patch':
        raise ValueError("nl_scope 'patch' is now called 'global'")
    if nl_scope not in SCOPES:
        raise ValueError(f'nl_scope must be one of {SCOPES}, got {nl_scope!r}')
    if window_size is None or window_size == 0:
        raise ValueError(f'window_size must be an odd int >= 1, got {window_size!r}; for attention over the whole '
                         f'input use nl_scope: global')
    return check_window_args(window_size, border)


@ARCH_REGISTRY.register()
class WindowedNonLocalBlock(nn.Module):
    """NLRN non-local module with correlation propagation: ``out = x + A(x) g(x)``.

    The attention ``A`` normalises the correlation of each pixel with its neighbourhood (paper
    eq. 3-6). With correlation propagation, the raw correlations of all previous steps are summed
    before the normalisation (the state is passed in and returned by ``forward``).

    Neighbourhood (``nl_scope``), same weights for both:

    * ``'window'``: the ``window_size`` x ``window_size`` window centred on each pixel over the
      whole image (the paper's description).
    * ``'global'``: the whole input tensor (official code: 43x43 training patches; at test time the
      image is tiled 45x45, see ``nl_plugin.ops.tiling.tiled_forward``).

    Correlation functions (paper Table 1): softmax normalisation for the Gaussian family, and for
    'dot_product' / 'embedded_dot_product' division by the number N of neighbours (convention of
    Wang et al., Non-local Neural Networks). 'euclidean' uses exp(-||x_i - x_j||^2) on the features.
    ``g`` starts at zero (official), so the block starts as the identity.

    Args:
        num_feat (int): Channels of the input and of ``g``. Default: 128.
        num_embed (int): Channels of theta/phi. Default: 64.
        correlation (str): One of ``CORRELATIONS``. Default: 'embedded_gaussian'.
        nl_scope (str): 'window' or 'global'. Default: 'window'.
        window_size (int): Odd window side of the window scope. Default: 45.
        border (str): Window scope at the image border: 'exclude' (out-of-image neighbours left
            out of the normalisation) or 'circular' (wrap-around). Default: 'exclude'.
        attention_kernel (str): 'auto' (``nl_plugin.ops.nlrn_attention.router`` chooses: on CUDA the fused
            Triton window step), or one kernel family forced: 'triton', 'flex', 'halo' (window scope) or 'dense'
            (dense logits, either scope). Same result; speed and memory differ. Default: 'auto'.
    """

    #: How this machine computes, not what (see ``NLRN.RUNTIME_ARGS``).
    RUNTIME_ARGS = ('attention_kernel',)

    def __init__(self, num_feat: int = 128, num_embed: int = 64, correlation: str = 'embedded_gaussian',
                 nl_scope: str = 'window', window_size: int = 45, border: str = 'exclude',
                 attention_kernel: str = 'auto'):
        super().__init__()
        if correlation not in CORRELATIONS:
            raise ValueError(f'correlation must be one of {sorted(CORRELATIONS)}, got {correlation!r}')
        self.window_size = check_scope(nl_scope, window_size, border)
        self.attention_kernel = check_attention_kernel(attention_kernel, window=nl_scope == 'window')
        self.nl_scope, self.border, self.correlation = nl_scope, border, correlation
        self.num_feat = num_feat
        embed, self.normalization = CORRELATIONS[correlation]
        self.theta = nn.Conv2d(num_feat, num_embed, 1) if embed != 'none' else None
        self.phi = nn.Conv2d(num_feat, num_embed, 1) if embed == 'theta_phi' else None
        self.g = nn.Conv2d(num_feat, num_feat, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform kernels and zero biases (TF defaults), then ``g`` zeroed (official)."""
        for conv in (self.theta, self.phi, self.g):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight)    # g too: seeded layers after it draw the same numbers
                nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.g.weight)

    @property
    def attention_window(self) -> Optional[int]:
        """Window side passed to the attention ops: ``window_size``, or None in the global scope."""
        return self.window_size if self.nl_scope == 'window' else None

    @staticmethod
    def _conv_cl(x_cl, conv):
        """1x1 conv on channels-last (B, H, W, C) features."""
        return F.linear(x_cl, conv.weight.flatten(1), conv.bias)

    def embed(self, x_cl: torch.Tensor, query: bool = True, key_value: bool = True) -> Tuple[torch.Tensor, ...]:
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

    def attend(self, x: torch.Tensor, state: Optional[CorrelationState] = None, propagate: bool = True,
               logit_memory: Optional[int] = None) -> Tuple[torch.Tensor, Optional[CorrelationState]]:
        """Attention term ``A g`` and the new correlation state.

        Args:
            x (Tensor): (B, C, H, W) features.
            state (CorrelationState, optional): From the previous step.
            propagate (bool): Return a state for the next step.
            logit_memory (int, optional): Ceiling in bytes of the carried window logits (``propagated_attention``).

        Returns:
            tuple[Tensor, CorrelationState | None]: (B, C, H, W) and the state.
        """
        if x.dim() != 4 or x.shape[1] != self.num_feat:
            raise ValueError(f'WindowedNonLocalBlock expects (B, {self.num_feat}, H, W), got {tuple(x.shape)}')
        q, k, v = self.embed(x.permute(0, 2, 3, 1))
        out, state = propagated_attention(q, k, v, state, self.attention_window, self.border, self.normalization,
                                          propagate=propagate, attention_kernel=self.attention_kernel,
                                          logit_memory=logit_memory)
        return out.permute(0, 3, 1, 2), state

    def forward(self, x: torch.Tensor, state: Optional[CorrelationState] = None,
                return_state: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, Optional[CorrelationState]]]:
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


__all__ = ['WindowedNonLocalBlock', 'CORRELATIONS', 'SCOPES', 'CorrelationState', 'check_scope']
