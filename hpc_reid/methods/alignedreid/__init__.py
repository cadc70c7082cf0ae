"""AlignedReID (Zhang et al., "AlignedReID: Surpassing Human-Level Performance in Person
Re-Identification", arXiv 1711.08184; Luo et al., AlignedReID++, Pattern Recognition 2019): a local
branch of horizontal stripe features beside the global feature, the DMLI distance (the shortest
path through the stripe-to-stripe distance matrix) for a local triplet loss mined with the global
distance, and the local distance at test time, alone or added to the global one.
Implementation notes: ../shared/methods/alignedreid.md.
"""

from __future__ import annotations

# importing registers model.head "aligned" and loss.local_triplet
from hpc_reid.methods.alignedreid import model, terms  # noqa: F401
