"""Tracklet frame selection (hpc_reid.data.video) against direct ports of the references' loops
(the fine-grained ReID code's "intelligent_random" and "dense" sampling), on random lengths."""

from __future__ import annotations

import numpy as np
import pytest

from hpc_reid.config import VideoConfig
from hpc_reid.data.video import chunked_frames, consecutive_frames, dense_clips, train_frames


def reference_chunk_bounds(num: int, seq_len: int) -> list[tuple[int, int]]:
    """The inclusive randint bounds of the reference loop, frame by frame."""
    each = max(num // seq_len, 1)
    bounds = []
    for i in range(seq_len):
        if i != seq_len - 1:
            bounds.append((min(i * each, num - 1), min((i + 1) * each - 1, num - 1)))
        else:
            bounds.append((min(i * each, num - 1), num - 1))
    return bounds


def reference_dense(num: int, seq_len: int, max_clips: int) -> list[list[int]]:
    """The reference's dense clips, with an exact cap of max_clips (0: all)."""
    cur, frames, clips = 0, list(range(num)), []
    while num - cur > seq_len:
        clips.append(frames[cur : cur + seq_len])
        cur += seq_len
    last = frames[cur:]
    for index in last:  # cycles: the list grows while it is iterated
        if len(last) >= seq_len:
            break
        last.append(index)
    clips.append(last)
    return clips[:max_clips] if max_clips else clips


@pytest.mark.parametrize("seed", range(3))
def test_chunked_frames_fall_in_the_reference_chunks_and_reach_every_frame_of_each(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        num, seq_len = int(rng.integers(1, 60)), int(rng.integers(1, 9))
        bounds = reference_chunk_bounds(num, seq_len)
        seen = [set() for _ in bounds]
        for _ in range(300):
            frames = chunked_frames(num, seq_len, rng)
            assert frames.shape == (seq_len,) and frames.dtype == np.int64
            assert np.all(np.diff(frames) >= 0)  # temporal order
            for i, (f, (lo, hi)) in enumerate(zip(frames.tolist(), bounds, strict=True)):
                assert lo <= f <= hi, (num, seq_len, i, f, lo, hi)
                seen[i].add(f)
        for s, (lo, hi) in zip(seen, bounds, strict=True):
            if hi - lo < 8:  # small chunks: 300 draws see every frame
                assert s == set(range(lo, hi + 1))


def test_consecutive_frames_start_in_the_reference_range_and_repeat_the_last_frame():
    rng = np.random.default_rng(0)
    for num, seq_len in [(1, 4), (3, 4), (4, 4), (5, 4), (30, 4), (9, 1)]:
        starts = set()
        for _ in range(200):
            frames = consecutive_frames(num, seq_len, rng)
            start = int(frames[0])
            starts.add(start)
            expected = [min(start + i, num - 1) for i in range(seq_len)]
            assert frames.tolist() == expected
        assert starts == set(range(max(0, num - seq_len - 1) + 1))


@pytest.mark.parametrize("max_clips", [0, 1, 3, 32])
def test_dense_clips_equal_the_reference_loop_with_an_exact_cap(max_clips):
    rng = np.random.default_rng(max_clips)
    for _ in range(200):
        num, seq_len = int(rng.integers(1, 80)), int(rng.integers(1, 9))
        clips = dense_clips(num, seq_len, max_clips)
        assert clips.tolist() == reference_dense(num, seq_len, max_clips), (num, seq_len)


def test_train_frames_follow_the_configured_sampling_from_the_samples_generator():
    for sampling, direct in (("chunked", chunked_frames), ("consecutive", consecutive_frames)):
        video = VideoConfig(seq_len=5, sampling=sampling)
        a = train_frames(23, video, np.random.default_rng(7))
        b = direct(23, 5, np.random.default_rng(7))
        assert a.tolist() == b.tolist()


def test_bad_lengths_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="at least one frame, got 0"):
        dense_clips(0, 4)
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        chunked_frames(5, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_clips must be >= 0"):
        dense_clips(5, 2, -1)
