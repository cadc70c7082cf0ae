"""When each identity of the synthetic set is seen: walking around a ring of cameras.

With ``SynthSpec(transit=True)`` the frame numbers in the image names follow a camera network, so
that spatial-temporal scoring (st-ReID: :mod:`hpc_reid.evaluation.st`) has something to learn
from the training identities, as it has on Market-1501 and DukeMTMC-reID, whose cameras watch one
campus. The cameras stand on a ring of walkways (camera c between c - 1 and c + 1, modulo the
number of cameras); walking from a camera to its ring neighbour c + 1 takes ``edge_frames[c]``
frames on average, drawn once per spec (1 to 4 minutes at 25 frames a second).

An identity enters the network at a random frame of the first :data:`SPAN`, in view of one of its
cameras, and walks around the ring in one direction (either), visiting its cameras in ring order:
the cameras between them did not see it (the set's identities are seen by 2..cams cameras). A
walk from camera a to the next one it is seen by takes the sum of the edges between them times
the identity's pace on that walk (uniform in :data:`PACE`: people dawdle and hurry). In a camera's
view it stays for its track there: the frames of its images, spaced as without transit. So the
frame difference between two cameras of one identity is concentrated around their distance along
the ring, and that of two different identities is spread over the whole span.

Every camera records one sequence (``cCs1``), so a frame is already on its camera's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPAN = 150_000  # entry frames: the first 100 minutes at 25 frames a second
EDGE_FRAMES = (1_500, 6_000)  # a ring edge's mean walking time, frames: 1 to 4 minutes
PACE = (0.8, 1.25)  # an identity's walking time over the mean, per walk


@dataclass(frozen=True)
class CameraNetwork:
    """A ring of ``len(edge_frames)`` cameras; ``edge_frames[c]``: mean frames from c to c + 1."""

    edge_frames: tuple[int, ...]

    @property
    def num_cameras(self) -> int:
        return len(self.edge_frames)

    def ring_frames(self, a: int, b: int, direction: int) -> int:
        """Mean frames walking from camera ``a`` to ``b`` around the ring, ``direction`` +1
        (a, a + 1, ..., b) or -1 (a, a - 1, ..., b); 0 when a == b."""
        n = self.num_cameras
        steps = ((b - a) * direction) % n
        edges = [(a + direction * i - (direction < 0)) % n for i in range(steps)]
        return sum(self.edge_frames[e] for e in edges)


def camera_network(rng: np.random.Generator, cams: int) -> CameraNetwork:
    """The ring's edge times, drawn from ``rng`` (the spec's transit stream)."""
    return CameraNetwork(tuple(int(t) for t in rng.integers(*EDGE_FRAMES, size=cams)))


def walk(
    network: CameraNetwork, rng: np.random.Generator, tracks: list[tuple[int, np.ndarray]]
) -> list[np.ndarray]:
    """The frames of one identity's tracks ``(camera, frames)`` moved onto its walk (module
    docstring), in the order given; ``rng`` is the identity's own transit stream. Each track keeps
    its spacing and starts when the identity comes into that camera's view."""
    cams = [cam for cam, _ in tracks]
    direction = 1 if rng.random() < 0.5 else -1
    first = cams[int(rng.integers(len(cams)))]
    n = network.num_cameras
    order = sorted(range(len(cams)), key=lambda i: ((cams[i] - first) * direction) % n)
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(tracks)
    start, previous = int(rng.integers(0, SPAN)), None
    for i in order:
        frames = np.asarray(tracks[i][1], dtype=np.int64)
        if previous is not None:
            mean = network.ring_frames(cams[previous], cams[i], direction)
            start = int(out[previous][-1]) + round(mean * rng.uniform(*PACE))
        out[i] = start + frames - frames[0]
        previous = i
    return out
