"""AlignedReID (Zhang et al., "AlignedReID: Surpassing Human-Level Performance in Person
Re-Identification", arXiv 1711.08184; Luo et al., AlignedReID++, Pattern Recognition 2019): a local
branch of horizontal stripe features beside the global feature, the DMLI distance (the shortest
path through the stripe-to-stripe distance matrix) for a local triplet loss mined with the global
distance, and the local distance at test time, alone or added to the global one.
Implementation notes: ../shared/methods/alignedreid.md.
"""

from __future__ import annotations

# importing registers model.head "aligned", loss.local_triplet, the mutual terms and "dmli"
from hpc_reid.methods.alignedreid import model, mutual, terms  # noqa: F401
