"""CACE-Net (Jiang, Yu, Gong, Zhao, Guo, Huang, Zheng and Sun, "Devil's in the Details: Aligning
Visual Clues for Conditional Embedding in Person Re-Identification", arXiv 2009.05250): every two
images of a batch side by side on the feature-map grid, a learned correspondence attention between
their cells (no pose estimator), and a discrepancy graph convolution embedding each image
conditioned on the other; one shared head for single and conditioned maps, an ID loss, a mixed-up
ID loss on the conditioned features, a triplet on the normalised feature and a triplet on the
matrix of conditioned-pair distances. The released code ranks with single-image features.

Where the parts are:

- :mod:`~hpc_reid.methods.cace.pair_graph`: the pair index convention, the correspondence
  attention and the normalised-Laplacian discrepancy GCN (:class:`PairGraph`), chunked over pairs;
- :mod:`~hpc_reid.methods.cace.model`: ``model.head: cace`` (:class:`CaceHead`: f, and in training
  the pairs' features and logits; ``pair_features`` for test-time conditioning);
- :mod:`~hpc_reid.methods.cace.losses`: ``loss.pair_id`` and ``loss.pair_triplet``; the triplet on
  the normalised feature is ``loss.triplet`` with ``normalize: true``.

Implementation notes from the released code: ../shared/methods/cace-net.md, section 1.
"""

from __future__ import annotations

# importing registers model.head "cace", loss.pair_id and loss.pair_triplet
from hpc_reid.methods.cace import losses, model  # noqa: F401
from hpc_reid.methods.cace.model import CaceHead
from hpc_reid.methods.cace.pair_graph import PairGraph, pair_index

__all__ = ["CaceHead", "PairGraph", "pair_index"]
