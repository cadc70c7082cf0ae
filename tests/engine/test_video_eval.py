"""Evaluation of tracklets (issue 20): a tracklet's row is the mean of its dense clips' rows
(flip-averaged per clip), against a direct clip-by-clip loop written here; the same rows from an
HDF5 pack and through DALI; class means over tracklets; the sharded evaluation and extraction on 2
gloo ranks equal to one process; and a tiny ``hpc-reid train`` on the synthetic tracklets with
either temporal head, evaluated, written and re-evaluated from its checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_reid.config import VideoConfig, load_config
from hpc_reid.data.build import dataset_on_ranks, dataset_root
from hpc_reid.data.datasets import build_dataset
from hpc_reid.data.datasets.base import ImageRecord
from hpc_reid.data.loaders import build_backend_test_loader
from hpc_reid.data.pack import pack_dataset
from hpc_reid.engine import evaluate
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.class_means import class_means
from hpc_reid.engine.extract import extract_checkpoint
from hpc_reid.engine.optim import scaled_lr
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import train
from hpc_reid.evaluation import extract_features
from hpc_reid.evaluation.feature_files import evaluate_feature_files
from hpc_reid.models import build_model
from tests.ports import free_port
from tests.tiny import REPO, TINY_TRACKLETS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: the tiny tracklet set (tests/tiny.py) at 64x32 with OSNet x0.25
VIDEO = [
    *TINY_TRACKLETS,
    "model.backbone=osnet_x0_25",
    "evaluation.flip_average=true",
    "evaluation.report_without_flip=true",
]


def video_config(tmp: Path, *extra: str):
    return tiny_config(tmp, "configs/synthetic/video.yaml", *VIDEO, *extra)


def model_of(config, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(3)
    return build_model(config.model, num_classes).eval()


# --------------------------------------------------------------------- the direct reference


def reference_clips(n: int, t: int, cap: int) -> list[list[int]]:
    """The references' dense sampling: consecutive clips of t frames, the last padded by cycling
    its own frames, the first ``cap`` kept."""
    clips = []
    for start in range(0, n, t):
        own = list(range(start, min(start + t, n)))
        clips.append([own[k % len(own)] for k in range(t)])
    return clips[:cap]


def reference_rows(model, records, config, flip: bool) -> np.ndarray:
    """Each tracklet's row in float64: its frames decoded as images, the model on one clip at a
    time (and on its flip), every retrieval part concatenated, averaged over the clips."""
    video, rows = config.data.video, []
    parts = list(model.retrieval_parts.values())
    with torch.inference_mode():
        for record in records:
            images = [ImageRecord(f, record.pid, record.camid) for f in record.frames]
            loader = build_backend_test_loader(
                images, config.loader, config.data.height, config.data.width, "cpu"
            )
            frames = torch.cat([b["images"] for b in loader])
            clip_rows = []
            for clip in reference_clips(record.num_frames, video.seq_len, video.max_clips):
                x = frames[clip][None]
                outs = [model(x)] + ([model(x.flip(-1))] if flip else [])
                row = [np.concatenate([o[p.key][0].double().numpy() for p in parts]) for o in outs]
                clip_rows.append(np.mean(row, axis=0))
            rows.append(np.mean(clip_rows, axis=0))
    return np.stack(rows)


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("video")
    config = video_config(tmp)
    return tmp, config, dataset_on_ranks(config.data, True)


@pytest.mark.parametrize("head", ["temporal_avg", "temporal_attention"])
def test_tracklet_rows_are_the_mean_of_dense_clip_rows_flip_averaged_as_a_direct_loop(
    video_set, head
):
    tmp, _, dataset = video_set
    config = video_config(tmp, f"model.head={head}")
    model = model_of(config, dataset.num_train_pids)
    records = dataset.query + dataset.gallery
    assert any(r.num_frames > 6 for r in records) and any(r.num_frames % 3 for r in records)
    rows, plain = evaluate.shard_features_and_plain(model, records, config, "cpu")
    expected = reference_rows(model, records, config, True)
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-4, atol=1e-5)
    expected_plain = reference_rows(model, records, config, False)
    np.testing.assert_allclose(plain.numpy(), expected_plain, rtol=1e-4, atol=1e-5)
    alone = evaluate.shard_features(model, records, config, "cpu")  # flip_average: true
    np.testing.assert_allclose(alone.numpy(), rows.numpy(), rtol=0, atol=1e-6)
    # batches of 1 clip and of every clip at once give the same rows
    for size in (3, 300):
        other = video_config(tmp, f"model.head={head}", f"loader.test_batch_size={size}")
        got = evaluate.shard_features(model, records, other, "cpu")
        np.testing.assert_allclose(got.numpy(), rows.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_tracklet_rows_from_an_hdf5_pack_equal_those_from_the_folder(video_set, backend):
    """The pack holds the same JPEG bytes, each frame once: the loaders read the same frames."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    tmp, _, _ = video_set
    config = video_config(tmp, f"loader.backend={backend}", "evaluation.flip_average=false")
    name, root = dataset_root(config.data, announce=lambda _: None)
    pack = tmp / f"tracklets-{backend}.h5"
    pack_dataset(build_dataset(name, root), pack)
    folder, packed = build_dataset(name, root), build_dataset(name, pack)
    model = model_of(config, folder.num_train_pids)
    a = evaluate.shard_features(model, folder.gallery, config, "cpu")
    b = evaluate.shard_features(model, packed.gallery, config, "cpu")
    assert torch.equal(a, b)
    expected = reference_rows(model, folder.gallery, config, False)
    np.testing.assert_allclose(a.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_class_means_over_tracklets_are_means_of_their_tracklets_clip_means(video_set):
    """A class's anchor over a video training split is the mean of its tracklets' features (each
    the mean of its dense clips), so a long tracklet weighs as much as a short one."""
    _, config, dataset = video_set
    model = model_of(config, dataset.num_train_pids)
    means = class_means(
        model, dataset.train, config, torch.device("cpu"), [("bn", True)], dataset.num_train_pids
    )[("bn", True)]
    tracklets = reference_rows(model, dataset.train, config, True)
    labels = np.array([r.pid for r in dataset.train])
    expected = np.stack([tracklets[labels == c].mean(0) for c in range(dataset.num_train_pids)])
    np.testing.assert_allclose(means.numpy(), expected, rtol=1e-4, atol=1e-5)


class FlatModel(torch.nn.Module):
    """A model whose one retrieval part ("bn") is its input flattened."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"bn": x.flatten(1)}


def test_clips_of_a_tracklet_in_any_batches_average_to_its_row():
    """Rows averaged per tracklet index wherever its clips come (split over batches, out of
    order), against a numpy mean per index; each tracklet's pid and camera kept."""
    rng = np.random.default_rng(0)
    owners = np.array([0, 0, 1, 2, 2, 2, 1, 3, 0])
    clips = rng.standard_normal((len(owners), 2, 3, 2, 2)).astype(np.float32)
    batches = [
        {
            "images": torch.from_numpy(clips[a:b]),
            "pids": torch.from_numpy(10 + owners[a:b]),
            "camids": torch.from_numpy(owners[a:b] % 2),
            "indices": torch.from_numpy(owners[a:b]),
        }
        for a, b in ((0, 2), (2, 5), (5, 9))
    ]
    rows, pids, camids = extract_features(FlatModel(), batches, "cpu")
    flat = clips.reshape(len(owners), -1).astype(np.float64)
    expected = np.stack([flat[owners == i].mean(0) for i in range(4)])
    np.testing.assert_allclose(rows.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert pids.tolist() == [10, 11, 12, 13] and camids.tolist() == [0, 1, 0, 1]


def test_a_clip_batch_without_tracklet_indices_or_with_a_missing_tracklet_is_refused():
    batch = {"images": torch.zeros(2, 3, 3, 4, 4), "pids": [1, 2], "camids": [0, 1]}
    with pytest.raises(KeyError, match="needs 'indices', each clip's tracklet index"):
        extract_features(FlatModel(), [batch], "cpu")
    with pytest.raises(ValueError, match=r"tracklets \[1\] of 0..2 got no clip"):
        extract_features(FlatModel(), [{**batch, "indices": torch.tensor([0, 2])}], "cpu")


# ----------------------------------------------------------- a trained video run, 1 and 2 ranks


@pytest.fixture(scope="module")
def video_checkpoint(video_set):
    tmp, _, _ = video_set
    config = video_config(tmp, "model.head=temporal_attention", "logging.run_name=ta")
    train(config, max_steps=2)
    return CheckpointManager(tmp / "runs/ta").latest(), config


def _two_ranks(rank: int, port: int, checkpoint: str, out: str, config) -> None:
    """``hpc-reid eval`` and ``hpc-reid extract`` of ``checkpoint`` as launched rank ``rank`` of
    2, in one gloo group that both commands find and keep (as under Ray Train)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        evaluate_checkpoint(checkpoint, config, out_dir=Path(out) / "eval")
        extract_checkpoint(checkpoint, Path(out) / "features", config)
    finally:
        dist.destroy_process_group()


def read_features(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {k: f[k][:] for k in ("features", "pids", "camids", "paths")}
        out["records"] = f.attrs["records"]
    return out


@pytest.mark.slow
def test_sharded_tracklet_evaluation_and_extraction_on_two_gloo_ranks_equal_one_process(
    video_checkpoint, tmp_path
):
    checkpoint, config = video_checkpoint
    config = config.model_copy(
        update={"evaluation": config.evaluation.model_copy(update={"plots": True})}
    )
    one, two = tmp_path / "one", tmp_path / "two"
    summary = evaluate_checkpoint(checkpoint, config, out_dir=one / "eval")
    files = extract_checkpoint(checkpoint, one / "features", config)
    mp.spawn(
        _two_ranks,
        args=(free_port(), str(checkpoint), str(two), config),
        nprocs=2,
        join=True,
    )
    a = json.loads((one / "eval/results.json").read_text())
    b = json.loads((two / "eval/results.json").read_text())
    assert {k: a[k] for k in summary} == pytest.approx(summary)
    assert b.pop("cmc") == pytest.approx(a.pop("cmc"), abs=1e-6)
    assert b == pytest.approx(a, abs=1e-6)
    # the same top-10 gallery tracklets (shown by their first frames) of the same queries
    assert (two / "eval/ranked.png").read_bytes() == (one / "eval/ranked.png").read_bytes()

    # the feature files: one row per tracklet, the evaluation's rows, pids, cameras, first frames
    dataset = dataset_on_ranks(config.data, True)
    model = build_model(config.model, dataset.num_train_pids)
    model.load_state_dict(load_checkpoint(checkpoint)["strategy"]["model"])
    for split, records in (("query", dataset.query), ("gallery", dataset.gallery)):
        mine = read_features(files[split])
        theirs = read_features(two / "features" / f"{split}.h5")
        rows = evaluate.shard_features(model, records, config, "cpu").numpy()
        assert np.array_equal(mine["features"], rows)
        np.testing.assert_allclose(theirs["features"], rows, rtol=1e-5, atol=1e-6)
        for got in (mine, theirs):
            assert got["records"] == "tracklets"
            assert got["pids"].tolist() == [r.pid for r in records]
            assert got["camids"].tolist() == [r.camid for r in records]
            assert [p.decode() for p in got["paths"]] == [r.frames[0] for r in records]
    streamed = evaluate_feature_files(files["query"], files["gallery"]).summary()
    assert streamed == pytest.approx({k: v for k, v in summary.items() if "/" not in k})


@pytest.mark.parametrize("head", ["temporal_avg", "temporal_attention"])
def test_video_main_job_trains_evaluates_and_writes_results(tmp_path, head):
    """The synthetic video job (configs/synthetic/video.yaml) on the tiny tracklet set: trains
    with each temporal head, evaluates the tracklets (cross-camera, the MARS protocol), writes
    results.json and plots; ``hpc-reid eval --checkpoint`` reproduces the numbers."""
    config = video_config(
        tmp_path, f"model.head={head}", "logging.run_name=v", "evaluation.plots=true"
    )
    summary = train(config)
    run = tmp_path / "runs/v"
    results = json.loads((run / "results.json").read_text())
    for key in ("rank-1", "rank-5", "mAP", "mINP", "without_flip/mAP"):
        assert 0.0 <= results[key] <= 1.0 and results[key] == pytest.approx(summary[key])
    assert len(results["cmc"]) == config.evaluation.max_rank
    for name in ("cmc.png", "ranked.png"):
        assert (run / name).stat().st_size > 0, name
    checkpoint = CheckpointManager(run).latest()
    assert load_checkpoint(checkpoint)["config"]["model"]["head"] == head
    again = evaluate_checkpoint(checkpoint, out_dir=tmp_path / "eval")
    assert again == pytest.approx(summary)


def test_mars_ta_r50_config_validates_and_builds_a_model_that_takes_its_clips():
    """configs/mars/ta_r50.yaml: MARS, ResNet-50 with temporal attention over T = 4 frames, 8 x 4
    tracklets, Adam 3.5e-4 after 10 warm-up epochs, milestones, 256x128, dense clips capped at
    32; its attention sized for the 16x8 map, which a clip at 256x128 does give."""
    config = load_config(REPO / "configs/mars/ta_r50.yaml")
    assert (config.data.dataset, config.data.height, config.data.width) == ("mars", 256, 128)
    video = config.data.video
    assert video == VideoConfig(seq_len=4, sampling="chunked", max_clips=32, augment_per="tracklet")
    assert (config.sampler.num_identities, config.sampler.num_instances) == (8, 4)
    assert (config.model.backbone, config.model.head) == ("resnet50", "temporal_attention")
    assert config.model.temporal.map_size == (16, 8)
    assert config.optimizer.name == "adam"
    assert scaled_lr(config.optimizer, 8 * 4)[0] == pytest.approx(3.5e-4)
    assert (config.schedule.warmup_epochs, config.schedule.milestones) == (10, [40, 70])
    model = build_model(config.model, 625).eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, video.seq_len, 3, 256, 128))
    assert out["bn"].shape == (1, 2048)
