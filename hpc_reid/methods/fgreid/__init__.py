"""Fine-grained re-identification (Pathak, "Fine-Grained Re-Identification", arXiv 2011.13475;
code: github.com/ppriyank/Fine-grained-Re-Identification; /work/shared/methods/
fgreid-video-st-vehicles.md).

Two trunks on the same images, the second started from another run (``model.fgreid.
second_init_from``: the reference's MARS-trained trunk); a spatial attention map from the first
weighting the second's map, a non-local block over its positions (over T x positions for
tracklets), two BN branches sharing one classifier, and their concatenation as the feature, for
images and tracklets alike (``model.head: fgreid``, :mod:`.model`). Its objective: the ``ce`` term
over both branches (``loss.ce.also: [logits2]``), the triplet on cosine similarity
(``loss.triplet.distance: cosine``), the center loss, and this package's ``osm``, ``variance``,
``satisfied_rank`` and ``rank_consistency`` terms (:mod:`.losses`).
"""

from __future__ import annotations

# importing registers model.head "fgreid" and loss.osm, .variance, .satisfied_rank,
# .rank_consistency
from hpc_reid.methods.fgreid import losses, model  # noqa: F401
from hpc_reid.methods.fgreid.model import CosineNonLocal, FGReIDHead, attention_map

__all__ = ["CosineNonLocal", "FGReIDHead", "attention_map"]
