"""Pure tensor functions behind the neural nearest neighbours (N3) block of N3Net.

Paper: "Neural Nearest Neighbors Networks", Plötz & Roth, NeurIPS 2018. Equation numbers below
refer to that paper; "official" refers to the behaviour of the authors' released denoising code.

Notation used in the shapes:

* ``B`` batch, ``C`` channels, ``p`` patch size, ``s`` stride,
* ``nh x nw`` the grid of patches of a padded image, ``L = nh * nw`` query patches,
* ``D = C * p * p`` the length of a flattened patch (channel-major, then rows, then columns:
  the layout of :func:`torch.nn.functional.unfold`),
* ``M`` candidates per query, ``k`` neighbours.

Two implementations of the block's heavy part are provided:

* a readable reference (:func:`patch_sqdist`, :func:`aggregate_patches`, :func:`fold_patches`)
  that gathers exactly the ``M`` candidate patches of every query (memory ``L * M * D``);
* a tiled one (:func:`tiled_patch_sqdist`, :func:`tiled_aggregate_fold`) whose time and memory
  are linear in the image area: queries are processed in rectangular tiles of the patch grid; the
  candidates of a tile all lie in a slightly larger rectangle of patches (the tile's *union*), so
  distances and aggregation become dense matrix products between a tile and its union, and the
  selection of the ``M`` real candidates happens on small index tensors. Both give the same
  results up to floating point rounding (tested).
"""
from .candidates import aggregate_patches, all_pairs_index, candidate_index, patch_sqdist, search_starts
from .knn import (
                  KNN_UPDATES,
                  SELECTIONS,
                  continuous_knn,
                  gumbel_noise,
                  hard_knn_weights,
                  log1mexp,
                  neighbour_weights,
                  patch_temperature,
                  selection_inputs,
)
from .patch_grid import (
                  extract_patches,
                  fold_patches,
                  overlap_count,
                  pad_to_patch_grid,
                  patch_grid_padding,
                  patch_grid_shape,
)
from .tiled import TilePlan, choose_tile, make_tile_plan, tiled_aggregate_fold, tiled_patch_sqdist

__all__ = [
    'patch_grid_padding', 'pad_to_patch_grid', 'patch_grid_shape', 'extract_patches', 'fold_patches',
    'overlap_count', 'search_starts', 'candidate_index', 'all_pairs_index', 'patch_sqdist', 'aggregate_patches',
    'log1mexp', 'continuous_knn', 'hard_knn_weights', 'gumbel_noise', 'patch_temperature', 'SELECTIONS',
    'KNN_UPDATES', 'selection_inputs', 'neighbour_weights', 'TilePlan',
    'choose_tile', 'make_tile_plan', 'tiled_patch_sqdist', 'tiled_aggregate_fold'
]
