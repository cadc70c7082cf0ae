"""AlignedReID's plug-ins beside its head: the ``loss.local_triplet`` term (the batch-hard triplet
loss on the DMLI distance of the ``local`` stripe features, mined with the ``global`` distance by
default) and the ``dmli`` part distance evaluation ranks the ``local`` retrieval part with."""

from __future__ import annotations

import torch.distributed as dist

from hpc_reid.evaluation import register_part_distance
from hpc_reid.losses import register_loss
from hpc_reid.methods.alignedreid.dmli import dmli_distance

# the ``local`` retrieval part's distance (AlignedHead.retrieval_parts): exact, tiled
register_part_distance("dmli", dmli_distance)


@register_loss("local_triplet", inputs=("local", "global"))
def _local_triplet(section, num_classes: int, feature_dim: int):
    def local_triplet(outputs, pids):
        from hpc_reid.methods.alignedreid.local_triplet import local_triplet_loss

        distributed = dist.is_available() and dist.is_initialized()
        return local_triplet_loss(
            outputs["local"],
            outputs["global"],
            pids,
            section.margin,
            mining=section.mining,
            **({"cross_rank": True} if distributed and section.cross_rank else {}),
        )

    return local_triplet
