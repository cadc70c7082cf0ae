"""Tracklets through both loaders on a tiny hand-made tracklet set: training batches of
(B, T, C, H, W) whose frames are ``train_frames`` then ``sample_params`` of each sample's own
generator, one augmentation decision per tracklet (or per frame), DALI giving the torch loader's
tracklets, frames and decisions, and the test loaders' dense clips equal to a direct loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpc_reid.config import AugmentConfig, LoaderConfig, VideoConfig
from hpc_reid.data.datasets.base import TrackletRecord
from hpc_reid.data.fields import batch_fields
from hpc_reid.data.loaders import (
    CorruptImageError,
    build_test_loader,
    build_train_loader,
    frames_channels_last,
)
from hpc_reid.data.samplers import IdentitySampler
from hpc_reid.data.transforms import TestTransform, TrainTransform, sample_rng
from hpc_reid.data.video import train_frames

H, W, T, SEED = 32, 16, 4, 5
#: Largest |torch - DALI| per pixel (0-255 levels): the resizers' rounding, mostly on the image's
#: outermost rows and columns (tests/data/test_dali_loader.py explains and measures it on images).
#: Measured on these frames: 1.2 (they are shrunk 1.25x only: small border effects).
MAX_PIXEL_DIFF = 4.0
#: Mean |torch - DALI| over each frame: measured at most 0.31 levels. A frame other than the
#: torch loader's, a flip or a crop shifted by one pixel moves it to tens of levels (asserted in
#: test_dali_gives_the_torch_loader_s_tracklets_frames_and_decisions).
MEAN_PIXEL_DIFF = 1.0


def write_frame(path: Path, rng: np.random.Generator) -> str:
    """A smooth random 40 x 20 JPEG (a 6 x 4 grid upscaled: photo-like, so the two decoders'
    resizers agree within MAX_PIXEL_DIFF, and distinct from every other frame)."""
    small = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((20, 40), Image.BICUBIC).save(path, quality=95)
    return str(path)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[TrackletRecord]:
    """6 identities x 2 tracklets (cameras 0 and 1) of 1 to 11 distinct frames (several shorter
    than T), in shuffled order."""
    root = tmp_path_factory.mktemp("tracklets")
    rng = np.random.default_rng(0)
    out = []
    for pid in range(6):
        for cam in range(2):
            n = int(rng.integers(1, 12))
            frames = [write_frame(root / f"{pid:04d}C{cam}T{k:03d}.jpg", rng) for k in range(n)]
            out.append(TrackletRecord(tuple(frames), pid, cam, tid=2 * pid + cam))
    return [out[i] for i in rng.permutation(len(out))]


@pytest.fixture(scope="module")
def still_records(records) -> list[TrackletRecord]:
    """The same tracklets with every frame one image (the tracklet's first): whatever frames are
    drawn, they differ only by their augmentation."""
    return [TrackletRecord((r.frames[0],) * (r.num_frames + 3), r.pid, r.camid) for r in records]


def loader_config(workers: int = 0, **augment) -> LoaderConfig:
    return LoaderConfig(
        num_workers=workers,
        prefetch=2,
        pin_memory=False,
        test_batch_size=10,  # 2 clips of 4 frames a test batch
        augment=AugmentConfig(
            **{"pad": 3, "flip_prob": 0.5, "random_erasing_prob": 0.5, **augment}
        ),
    )


def sampler_for(records, p=2, rank=0, world=1, epoch=0) -> IdentitySampler:
    """P identities x 2 tracklets a rank's batch."""
    pids, camids = [r.pid for r in records], [r.camid for r in records]
    s = IdentitySampler(pids, camids, p, 2, rank=rank, world_size=world, seed=SEED)
    s.set_epoch(epoch)
    return s


def pil(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")


def labels(batches) -> list[tuple[list[int], ...]]:
    return [tuple(b[k].tolist() for k in ("pids", "camids", "indices")) for b in batches]


def levels(x: torch.Tensor, std) -> torch.Tensor:
    """Normalised images back on the 0-255 scale (channel axis -3)."""
    return x * torch.tensor(std).view(3, 1, 1) * 255


@pytest.mark.parametrize(
    ("sampling", "augment_per"), [("chunked", "tracklet"), ("consecutive", "frame")]
)
def test_torch_tracklet_is_train_frames_then_sample_params_of_its_sample_generator(
    records, sampling, augment_per
):
    """Each sample of rank 1 of 2, epoch 3: its generator sample_rng(seed, epoch, position) draws
    the frames by train_frames, then one TrainParams for all frames or one per frame in order;
    the batch is (B, T, C, H, W) with the tracklets' labels, in the sampler's order."""
    video = VideoConfig(seq_len=T, sampling=sampling, augment_per=augment_per)
    sampler = sampler_for(records, p=1, rank=1, world=2, epoch=3)
    batches = list(build_train_loader(records, sampler, loader_config(), H, W, SEED, video))
    assert [b["indices"].tolist() for b in batches] == list(sampler) and len(batches) > 1
    transform = TrainTransform(loader_config().augment, H, W)
    for b, batch in enumerate(batches):
        assert batch["images"].shape == (2, T, 3, H, W) and batch["images"].dtype == torch.float32
        for slot, index in enumerate(batch["indices"].tolist()):
            record = records[index]
            assert batch["pids"][slot] == record.pid and batch["camids"][slot] == record.camid
            rng = sample_rng(SEED, 3, (b * 2 + 1) * 2 + slot)  # batch b, rank 1 of 2, B = 2
            frames = train_frames(record.num_frames, video, rng).tolist()  # first, then
            if augment_per == "tracklet":
                params = [transform.sample_params(rng)] * T
            else:
                params = [transform.sample_params(rng) for _ in range(T)]
            pairs = zip(frames, params, strict=True)
            expected = [transform.apply(pil(record.frames[f]), p) for f, p in pairs]
            assert torch.equal(batch["images"][slot], torch.stack(expected)), (b, slot)


def frames_alike(batches) -> list[bool]:
    """For each tracklet of ``batches``: whether its T frames are all equal."""
    return [bool((clip == clip[:1]).all()) for b in batches for clip in b["images"]]


def test_one_augmentation_decision_per_tracklet_unless_per_frame(still_records):
    """Tracklets of one repeated image: with augment_per tracklet every frame comes out the same
    (one flip, crop, erasing for all); per frame they differ (flip 0.5, erasing 0.5, crops from
    7 x 7 offsets: all T frames alike has a probability well under 1%)."""
    sampler = sampler_for(still_records, epoch=1)
    alike = {}
    for per in ("tracklet", "frame"):
        video = VideoConfig(seq_len=T, augment_per=per)
        loader = build_train_loader(still_records, sampler, loader_config(), H, W, SEED, video)
        alike[per] = frames_alike(loader)
    assert all(alike["tracklet"]) and len(alike["tracklet"]) >= 12
    assert not any(alike["frame"])


def reference_clips(num_frames: int, seq_len: int, max_clips: int) -> list[list[int]]:
    """The references' dense clips in plain Python: consecutive non-overlapping clips of T frames,
    the last padded by cycling its own frames, the first ``max_clips`` (0: all)."""
    clips = []
    for start in range(0, num_frames, seq_len):
        own = list(range(start, min(start + seq_len, num_frames)))
        clips.append([own[k % len(own)] for k in range(seq_len)])
    return clips[:max_clips] if max_clips else clips


def direct_clips(records, video):
    """The test clips by a direct loop over tracklets and clips: images (N, T, C, H, W) and
    each clip's tracklet index, pid and camid."""
    t = TestTransform(loader_config().augment, H, W)
    images, owners, pids, camids = [], [], [], []
    for i, r in enumerate(records):
        for clip in reference_clips(r.num_frames, video.seq_len, video.max_clips):
            images.append(torch.stack([t(pil(r.frames[f])) for f in clip]))
            owners.append(i)
            pids.append(r.pid)
            camids.append(r.camid)
    return torch.stack(images), owners, pids, camids


@pytest.mark.parametrize("max_clips", [0, 2])
def test_torch_dense_clip_batches_equal_a_direct_loop(records, max_clips):
    video = VideoConfig(seq_len=T, max_clips=max_clips)
    loader = build_test_loader(records, loader_config(), H, W, video)
    batches = list(loader)
    images, owners, pids, camids = direct_clips(records, video)
    assert len(loader) == len(batches) == -(-len(owners) // 2)  # 10 // T = 2 clips a batch
    assert all(b["images"].shape[1:] == (T, 3, H, W) for b in batches)
    assert torch.equal(torch.cat([b["images"] for b in batches]), images)
    assert torch.cat([b["indices"] for b in batches]).tolist() == owners
    assert torch.cat([b["pids"] for b in batches]).tolist() == pids
    assert torch.cat([b["camids"] for b in batches]).tolist() == camids


def test_tracklets_without_the_video_settings_are_refused(records):
    with pytest.raises(ValueError, match=r"torch training loader.*video=config\.data\.video"):
        build_train_loader(records, sampler_for(records), loader_config(), H, W, SEED)
    with pytest.raises(ValueError, match=r"torch test loader.*data\.video"):
        build_test_loader(records, loader_config(), H, W)


def test_frames_field_is_minus_one_for_every_tracklet(records):
    """A tracklet record has no frame number (st-ReID's field): -1, one per tracklet."""
    indices = torch.tensor([3, 0, 11, 3])
    assert batch_fields(["frames"], records, indices)["frames"].tolist() == [-1] * 4


def test_frames_channels_last_gives_channels_last_frames_as_a_view():
    x = torch.randn(2, 3, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    y = frames_channels_last(x)
    assert torch.equal(x, y) and y.stride() == (3 * 5 * 4 * 3, 5 * 4 * 3, 1, 4 * 3, 3)
    frames = y.flatten(0, 1)
    assert frames.data_ptr() == y.data_ptr()  # a view: the backbone's input, no copy
    assert frames.is_contiguous(memory_format=torch.channels_last)
    assert frames_channels_last(y).data_ptr() == y.data_ptr()  # already: nothing copied
    images = x[0]
    assert frames_channels_last(images).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\), got shape \(3, 5, 4\)"):
        frames_channels_last(x[0, 0])


# ------------------------------------------------------------------------------------- DALI


@pytest.fixture(scope="module")
def dali_loader():
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from hpc_reid.data.loaders import dali_loader

    return dali_loader


def pixel_stats(x: torch.Tensor, y: torch.Tensor, std) -> tuple[float, float]:
    """(max, largest per-frame mean) of |x - y| in levels over (B, T, C, H, W) batches."""
    d = levels(x - y, std).abs().flatten(2)
    return float(d.max()), float(d.mean(-1).max())


@pytest.mark.parametrize(
    ("sampling", "augment_per", "workers"),
    [("chunked", "tracklet", 0), ("consecutive", "frame", 2)],
)
def test_dali_gives_the_torch_loader_s_tracklets_frames_and_decisions(
    records, dali_loader, sampling, augment_per, workers
):
    """Two consecutive epochs: the same tracklets (labels), the same erasures (the exact zeros
    coincide), and pixels within the resizers' rounding, frame by frame (a different frame, flip
    or crop would move a frame's mean difference far beyond MEAN_PIXEL_DIFF: checked against the
    torch loader's other epoch); also with DALI's parallel Python workers."""
    video = VideoConfig(seq_len=T, sampling=sampling, augment_per=augment_per)
    cfg = loader_config(workers)
    sampler = sampler_for(records)
    torch_l = build_train_loader(records, sampler, cfg, H, W, SEED, video)
    dali_l = dali_loader.build_train_loader(records, sampler, cfg, H, W, SEED, "cpu", video=video)
    assert len(dali_l) == len(torch_l) == len(sampler)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        a, b = list(torch_l), list(dali_l)  # all held: DLPack outputs stay valid
        assert labels(a) == labels(b)
        for x, y in zip(a, b, strict=True):
            assert y["images"].shape == (4, T, 3, H, W) and y["images"].dtype == torch.float32
            assert torch.equal(x["images"] == 0, y["images"] == 0)
            worst, mean = pixel_stats(x["images"], y["images"], cfg.augment.std)
            assert worst <= MAX_PIXEL_DIFF and mean <= MEAN_PIXEL_DIFF
        epochs.append((a, b))
    # The bound's power: the other epoch's torch batches (other frames and decisions) are far.
    std = cfg.augment.std
    pairs = zip(epochs[1][0], epochs[0][1], strict=True)
    other = [pixel_stats(x["images"], y["images"], std)[1] for x, y in pairs]
    assert min(other) > 5 * MEAN_PIXEL_DIFF


def test_dali_tracklet_channels_last_frames_hold_the_same_images(records, dali_loader):
    """channels_last: the pipeline writes (B T, H, W, C), returned as (B, T, C, H, W) whose
    frames (flatten(0, 1)) are channels_last, no copy; the images equal the NCHW loader's."""
    video = VideoConfig(seq_len=T)
    sampler = sampler_for(records, epoch=2)
    cfg = loader_config()
    nchw = dali_loader.build_train_loader(records, sampler, cfg, H, W, SEED, "cpu", video=video)
    nhwc = dali_loader.build_train_loader(
        records, sampler, cfg, H, W, SEED, "cpu", channels_last=True, video=video
    )
    for x, y in zip(nchw, nhwc, strict=True):
        assert y["images"].shape == x["images"].shape == (4, T, 3, H, W)
        assert y["images"].stride() == (T * H * W * 3, H * W * 3, 1, W * 3, 3)
        assert y["images"].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
        assert frames_channels_last(y["images"]).data_ptr() == y["images"].data_ptr()
        assert torch.equal(x["images"], y["images"]) and labels([x]) == labels([y])


def test_dali_one_decision_per_tracklet_unless_per_frame(still_records, dali_loader):
    sampler = sampler_for(still_records, epoch=1)
    alike = {}
    for per in ("tracklet", "frame"):
        video = VideoConfig(seq_len=T, augment_per=per)
        loader = dali_loader.build_train_loader(
            still_records, sampler, loader_config(), H, W, SEED, "cpu", video=video
        )
        alike[per] = frames_alike(list(loader))
    assert all(alike["tracklet"]) and len(alike["tracklet"]) >= 12
    assert not any(alike["frame"])


def test_dali_dense_clip_batches_equal_a_direct_loop(records, dali_loader):
    video = VideoConfig(seq_len=T, max_clips=2)
    cfg = loader_config()
    loader = dali_loader.build_test_loader(records, cfg, H, W, "cpu", video)
    batches = list(loader)
    images, owners, pids, camids = direct_clips(records, video)
    assert len(loader) == len(batches) == -(-len(owners) // 2)
    assert torch.cat([b["indices"] for b in batches]).tolist() == owners
    assert torch.cat([b["pids"] for b in batches]).tolist() == pids
    assert torch.cat([b["camids"] for b in batches]).tolist() == camids
    got = torch.cat([b["images"] for b in batches])
    assert got.shape == images.shape
    worst, mean = pixel_stats(images, got, cfg.augment.std)
    assert worst <= MAX_PIXEL_DIFF and mean <= MEAN_PIXEL_DIFF


def test_dali_names_a_tracklet_frame_it_cannot_decode(records, dali_loader, tmp_path):
    """A garbage frame in the only frame of person 9's two tracklets: DALI's decoding error is
    reported as a CorruptImageError naming that file."""
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"not a jpeg" * 20)
    broken = [*records, TrackletRecord((str(bad),), 9, 0), TrackletRecord((str(bad),), 9, 1)]
    sampler = sampler_for(broken)
    video = VideoConfig(seq_len=T)
    loader = dali_loader.build_train_loader(
        broken, sampler, loader_config(), H, W, SEED, "cpu", video=video
    )
    with pytest.raises(CorruptImageError, match=r"garbage\.jpg"):
        list(loader)
    with pytest.raises(ValueError, match=r"DALI training loader.*data\.video"):
        dali_loader.build_train_loader(records, sampler_for(records), loader_config(), H, W, SEED)
