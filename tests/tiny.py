"""The tiny synthetic Market-format set the integration tests train on (16 identities, 3 cameras,
6 images each, at 64x32): a training step takes milliseconds on a CPU. As ``--set`` overrides of
``configs/synthetic/bot.yaml``; each test adds its own settings to these."""

from __future__ import annotations

from pathlib import Path

from hpc_reid.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]

TINY_DATA = [
    "data.synthetic.ids=16",
    "data.synthetic.cams=3",
    "data.synthetic.images_per_id=6",
    "data.synthetic.distractors=4",
    "data.synthetic.junk=2",
    "data.height=64",
    "data.width=32",
]

#: The tiny tracklet set (with data.synthetic.tracklets): 8 identities (4 train, 4 test) in 2
#: cameras, 2 tracklets each per camera of 2-9 frames; clips of T = 3, at most 2 a tracklet (some
#: capped, some padded by cycling); 2 clips (6 frames) a test batch, so tracklets straddle batches.
TINY_TRACKLETS = [
    "data.synthetic.ids=8",
    "data.synthetic.cams=2",
    "data.synthetic.tracklets_per_camera=2",
    "data.synthetic.frames_per_tracklet=[2,9]",
    "data.synthetic.distractors=2",
    "data.synthetic.junk=1",
    "data.video.seq_len=3",
    "data.video.max_clips=2",
    "loader.test_batch_size=6",
]

#: Batches of 2 identities x 2 images, read in the test process; evaluation 32 images at a time.
TINY_BATCH = [
    "sampler.num_identities=2",
    "sampler.num_instances=2",
    "loader.num_workers=0",
    "loader.test_batch_size=32",
]
#: 3 epochs, the first a warm-up, the learning rate dropping after the second.
TINY_SCHEDULE = ["schedule.epochs=3", "schedule.milestones=[2]", "schedule.warmup_epochs=1"]
#: A quiet run on the CPU: no progress bar, TensorBoard, plots or periodic evaluation; single-image
#: features (the plain protocol), so a test compares with one model pass per image unless it turns
#: flip-averaging (the default) back on itself.
TINY_QUIET = [
    "evaluation.every_epochs=0",
    "evaluation.flip_average=false",
    "evaluation.plots=false",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "engine.device=cpu",
]


def tiny_config(tmp: Path, config: str, *extra: str) -> Config:
    """``config`` (relative to the repository) on the tiny set with the tiny batch, schedule and
    quiet settings, its synthetic cache and run folders under ``tmp``, then ``extra``."""
    sets = [*TINY_DATA, *TINY_BATCH, *TINY_SCHEDULE, *TINY_QUIET]
    sets += [f"data.synthetic.cache_dir={tmp / 'cache'}", f"logging.output_dir={tmp / 'runs'}"]
    return load_config(REPO / config, [*sets, *extra])
