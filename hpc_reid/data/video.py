"""Which frames of a tracklet a training sample and a test clip hold (``data.video``).

Training draws T frames per tracklet from the sample's own generator (:func:`train_frames`), so
the choice, like the sample's augmentation, depends on (seed, epoch, position in the epoch's
plan) only: the same in both loaders, for any number of workers, and after a resume.

- ``chunked`` (the references' restricted random sampling, "intelligent_random" in the
  fine-grained ReID code, after Li et al.'s restricted random sampling): the n frames are cut
  into T chunks of ``max(n // T, 1)`` frames, the last running to the end, and one frame is drawn
  uniformly from each; a chunk starting past the end collapses to the last frame, so a tracklet
  shorter than T repeats its last frame. The frames come out in temporal order.
- ``consecutive`` (the references' "random"): T consecutive frames from a start uniform in
  ``[0, max(0, n - T - 1)]`` (the references' range, which never starts at ``n - T``), the last
  frame repeated when the tracklet is shorter than T.

Test time (:func:`dense_clips`): every consecutive, non-overlapping clip of T frames; the last,
shorter one is padded by cycling its own frames; the first ``max_clips`` clips are kept (0: all).
The references' loop keeps up to ``max_clips + 1`` clips (it checks the count before appending);
we keep exactly ``max_clips``. A tracklet's feature is the mean of its clips' features.
"""

from __future__ import annotations

import numpy as np

from hpc_reid.config import VideoConfig


def chunked_frames(num_frames: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """T frame indices, one uniform draw from each of T chunks (module docstring), in order."""
    _check(num_frames, seq_len)
    each = max(num_frames // seq_len, 1)
    last = num_frames - 1
    low = np.minimum(np.arange(seq_len) * each, last)
    high = np.minimum(np.arange(1, seq_len + 1) * each - 1, last)
    high[-1] = last
    return rng.integers(low, high, endpoint=True).astype(np.int64)


def consecutive_frames(num_frames: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """T consecutive frame indices from a random start, the last repeated if too short."""
    _check(num_frames, seq_len)
    start = int(rng.integers(0, max(0, num_frames - seq_len - 1), endpoint=True))
    return np.minimum(np.arange(start, start + seq_len), num_frames - 1).astype(np.int64)


def train_frames(num_frames: int, video: VideoConfig, rng: np.random.Generator) -> np.ndarray:
    """The training sample's T frame indices by ``video.sampling``: the first draws from the
    sample's generator, before its augmentation's."""
    if video.sampling == "chunked":
        return chunked_frames(num_frames, video.seq_len, rng)
    return consecutive_frames(num_frames, video.seq_len, rng)


def dense_clips(num_frames: int, seq_len: int, max_clips: int = 0) -> np.ndarray:
    """(clips, T) frame indices: consecutive non-overlapping clips, the last padded by cycling its
    own frames, at most ``max_clips`` of them (0: all)."""
    _check(num_frames, seq_len)
    if max_clips < 0:
        raise ValueError(f"max_clips must be >= 0 (0: all), got {max_clips}")
    clips = -(-num_frames // seq_len)
    if max_clips:
        clips = min(clips, max_clips)
    out = np.arange(clips * seq_len, dtype=np.int64).reshape(clips, seq_len)
    tail = num_frames - (clips - 1) * seq_len  # frames of the last clip, when it is the last one
    if clips * seq_len > num_frames:
        start = (clips - 1) * seq_len
        out[-1] = start + np.arange(seq_len) % tail
    return out


def _check(num_frames: int, seq_len: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a tracklet needs at least one frame, got {num_frames}")
    if seq_len < 1:
        raise ValueError(f"data.video.seq_len must be >= 1, got {seq_len}")
