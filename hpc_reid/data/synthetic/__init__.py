"""The built-in synthetic data set: procedural pedestrians in the Market-1501 layout.

``generate(out, SynthSpec(...))`` writes ``bounding_box_train/``, ``query/`` and
``bounding_box_test/`` (read by the Market-1501 parser unchanged), one SAN-style texture map per
identity in ``textures/PPPP.png``, body keypoints of every image in ``keypoints.json`` and the spec
and counts in ``meta.json``. ``ensure_synthetic(spec)`` generates once into a cache folder.
"""

from .people import TEXTURE_LAYOUT
from .render import KEYPOINTS
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
    "SynthSpec",
    "default_cache_dir",
    "ensure_synthetic",
    "generate",
    "plan",
]
