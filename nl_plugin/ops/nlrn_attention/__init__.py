"""NLRN non-local attention with correlation propagation (Liu et al., NeurIPS 2018) as pure tensor functions.

One role per module: ``common`` (checks, window geometry, window mask, the normalisation),
``state`` (the carried correlation), ``embeddings`` (Table 1 correlations as dot products),
``reference`` (the dense oracle), ``dense`` (SDPA, linear and dense-logit kernels), ``halo``
(autograd halo kernel), ``halo_inference`` (no-grad strips kernel and the band-of-rows API),
``flex`` (FlexAttention window kernel for CUDA), ``triton_window`` (the fused Triton window step with
the carried logits in place, CUDA), ``router`` (which kernel runs) and ``api`` (the public functions).
"""
from .api import global_attention, propagated_attention, window_attention
from .common import BORDERS, NORMALIZATIONS, check_window_args, window_mask
from .embeddings import euclidean_embeddings
from .halo_inference import window_attention_rows
from .reference import dense_attention_reference
from .router import Kernel
from .state import CorrelationState, Layout

__all__ = [
    'CorrelationState', 'Layout', 'Kernel', 'window_mask', 'dense_attention_reference', 'global_attention',
    'window_attention', 'window_attention_rows', 'propagated_attention', 'euclidean_embeddings',
    'check_window_args', 'NORMALIZATIONS', 'BORDERS'
]
