"""The built-in synthetic data sets: procedural pedestrians in the Market-1501 layout, and
tracklets of them walking in the MARS layout (:mod:`.tracklets`).

``generate(out, SynthSpec(...))`` writes ``bounding_box_train/``, ``query/`` and
``bounding_box_test/`` (read by the Market-1501 parser unchanged), one SAN-style texture map per
identity in ``textures/PPPP.png``, body keypoints of every image in ``keypoints.json`` and the spec
and counts in ``meta.json``. ``ensure_synthetic(spec)`` generates once into a cache folder.
``generate_tracklets(out, TrackletSpec(...))`` and ``ensure_tracklets(spec)`` do the same for the
tracklet set.
"""

from .people import TEXTURE_LAYOUT
from .render import KEYPOINTS
from .tracklets import TRACKLET_VERSION, TrackletSpec, ensure_tracklets, generate_tracklets
from .writer import (
    GENERATOR_VERSION,
    SynthSpec,
    default_cache_dir,
    ensure_synthetic,
    generate,
    plan,
)

__all__ = [
    "GENERATOR_VERSION",
    "KEYPOINTS",
    "TEXTURE_LAYOUT",
    "TRACKLET_VERSION",
    "SynthSpec",
    "TrackletSpec",
    "default_cache_dir",
    "ensure_synthetic",
    "ensure_tracklets",
    "generate",
    "generate_tracklets",
    "plan",
]
