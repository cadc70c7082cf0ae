"""Published methods built on the strong baseline, one package each. A method plugs in at the
toolkit's fixed points (ARCHITECTURE.md, "Methods"): a head registered by name
(:func:`hpc_reid.models.register_head`), loss terms registered by name
(:func:`hpc_reid.losses.register_loss`), a test-time distance part
(:func:`hpc_reid.evaluation.register_part_distance`), and configs under ``configs/``. Importing this
package registers every built-in method's parts; the trainer and evaluation never branch on a
method.
"""

from __future__ import annotations

from hpc_reid.methods import (
    alignedreid,  # noqa: F401  (registers the aligned head and its terms)
    anchor,  # noqa: F401  (registers loss.anchor)
    cace,  # noqa: F401  (registers the cace head, loss.pair_id and loss.pair_triplet)
    fgreid,  # noqa: F401  (registers the fgreid head and loss.osm, .variance, .satisfied_rank, ...)
    san,  # noqa: F401  (registers the san head, its terms and the texture batch fields)
)
