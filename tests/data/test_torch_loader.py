"""The torch training and test loaders: batches follow the IdentitySampler exactly, images depend
only on (seed, epoch, position in the global plan) and never on workers or resumption, bad files
raise naming the file, and the backend choice.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from hpc_reid.config import AugmentConfig, ConfigError, LoaderConfig
from hpc_reid.data.datasets.base import ImageRecord
from hpc_reid.data.loaders import (
    CorruptImageError,
    build_test_loader,
    build_train_loader,
    resolve_backend,
)
from hpc_reid.data.samplers import IdentitySampler
from hpc_reid.data.transforms import TestTransform, TrainTransform, sample_rng

H, W = 32, 16
SEED = 123


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[ImageRecord]:
    """8 identities x 4 random 32x16 JPEGs on 2 cameras, in shuffled order."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for pid in range(8):
        for j in range(4):
            path = root / f"{pid:04d}_c{j % 2}_{j}.jpg"
            pixels = rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            out.append(ImageRecord(str(path), pid, j % 2, j))
    return [out[i] for i in rng.permutation(len(out))]


def loader_config(workers: int = 0, **augment) -> LoaderConfig:
    return LoaderConfig(
        num_workers=workers,
        prefetch=2,
        pin_memory=False,
        test_batch_size=5,
        augment=AugmentConfig(pad=2, **augment),
    )


def sampler_for(records, p=2, k=2, rank=0, world=1, epoch=0) -> IdentitySampler:
    pids, camids = [r.pid for r in records], [r.camid for r in records]
    s = IdentitySampler(pids, camids, p, k, rank=rank, world_size=world, seed=SEED)
    s.set_epoch(epoch)
    return s


def run_epoch(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def train_epoch(records, sampler) -> list[dict[str, torch.Tensor]]:
    return run_epoch(build_train_loader(records, sampler, loader_config(), H, W, SEED))


def test_train_batches_follow_the_identity_sampler_exactly(records):
    sampler = sampler_for(records)
    loader = build_train_loader(records, sampler, loader_config(), H, W, SEED)
    batches = run_epoch(loader)
    planned = list(sampler)
    assert len(loader) == len(planned) == len(batches) == 4
    for batch, indices in zip(batches, planned, strict=True):
        assert batch["indices"].tolist() == indices
        assert batch["pids"].tolist() == [records[i].pid for i in indices]
        assert batch["camids"].tolist() == [records[i].camid for i in indices]
        assert batch["images"].shape == (4, 3, H, W) and batch["images"].dtype == torch.float32
        for key in ("pids", "camids", "indices"):
            assert batch[key].dtype == torch.int64


def test_train_image_is_the_transform_seeded_by_seed_epoch_and_global_position(records):
    sampler = sampler_for(records, rank=1, world=2, p=1, k=2, epoch=3)
    batches = train_epoch(records, sampler)
    t = TrainTransform(loader_config().augment, H, W)
    for b, batch in enumerate(batches):
        for slot, index in enumerate(batch["indices"].tolist()):
            position = (b * 2 + 1) * 2 + slot  # batch b, rank 1 of 2, batch size 2
            img = Image.open(records[index].path).convert("RGB")
            expected = t(img, sample_rng(SEED, 3, position))
            assert torch.equal(batch["images"][slot], expected)


def test_loader_rereads_the_sampler_epoch_at_every_iteration(records):
    sampler = sampler_for(records)
    loader = build_train_loader(records, sampler, loader_config(), H, W, SEED)
    first = run_epoch(loader)
    sampler.set_epoch(1)
    second = run_epoch(loader)
    assert [b["indices"].tolist() for b in second] == list(sampler)
    assert [b["indices"].tolist() for b in second] != [b["indices"].tolist() for b in first]


def test_images_are_identical_with_0_and_2_workers_across_epochs(records):
    images = {}
    for workers in (0, 2):
        sampler = sampler_for(records)
        loader = build_train_loader(records, sampler, loader_config(workers), H, W, SEED)
        epochs = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)  # before the iterator (and its workers) is created
            epochs.append(torch.cat([b["images"] for b in loader]))
        images[workers] = epochs
    for a, b in zip(images[0], images[2], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(images[0][0], images[0][1])


def test_resumed_epoch_yields_the_images_of_the_uninterrupted_run(records):
    sampler = sampler_for(records, p=1, k=2, epoch=2)
    full = train_epoch(records, sampler)
    assert len(full) == 8
    resumed = sampler_for(records, p=1, k=2)
    resumed.load_state_dict(sampler.state_dict(batches_consumed=5))
    tail = train_epoch(records, resumed)
    assert len(tail) == 3
    for a, b in zip(full[5:], tail, strict=True):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["images"], b["images"])


def test_each_global_sample_keeps_its_augmentation_at_another_world_size(records):
    one = train_epoch(records, sampler_for(records, p=2, k=2))
    ranks = [train_epoch(records, sampler_for(records, p=1, k=2, rank=r, world=2)) for r in (0, 1)]
    for b, whole in enumerate(one):
        parts = [ranks[r][b] for r in range(2)]
        assert torch.equal(whole["indices"], torch.cat([p["indices"] for p in parts]))
        assert torch.equal(whole["images"], torch.cat([p["images"] for p in parts]))


def test_loader_rejects_a_sampler_built_over_other_records(records):
    with pytest.raises(ValueError, match="32 records but the loader got 31"):
        build_train_loader(records[:-1], sampler_for(records), loader_config(), H, W, SEED)


def test_test_loader_is_sequential_in_test_batches_with_the_test_transform(records):
    loader = build_test_loader(records, loader_config(), H, W)
    batches = run_epoch(loader)
    assert [len(b["indices"]) for b in batches] == [5] * 6 + [2]
    assert torch.cat([b["indices"] for b in batches]).tolist() == list(range(len(records)))
    assert torch.cat([b["pids"] for b in batches]).tolist() == [r.pid for r in records]
    t = TestTransform(loader_config().augment, H, W)
    expected = torch.stack([t(Image.open(r.path).convert("RGB")) for r in records[:5]])
    assert torch.equal(batches[0]["images"], expected)


def bad_records(records, path) -> list[ImageRecord]:
    return [*records[:3], ImageRecord(str(path), records[3].pid, records[3].camid), *records[4:]]


def test_truncated_jpeg_raises_naming_the_file(records, tmp_path):
    data = Path(records[0].path).read_bytes()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(data[: len(data) // 2])
    loader = build_test_loader(bad_records(records, bad), loader_config(), H, W)
    with pytest.raises(CorruptImageError, match=r"(?i)truncated\.jpg.*truncated"):
        run_epoch(loader)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_raises_naming_it(records, tmp_path):
    missing = tmp_path / "nowhere" / "0001_c1_9.jpg"
    loader = build_test_loader(bad_records(records, missing), loader_config(), H, W)
    with pytest.raises(CorruptImageError, match=r"0001_c1_9\.jpg not found"):
        run_epoch(loader)


def test_non_image_file_raises_naming_it_in_a_worker_too(records, tmp_path):
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"not a jpeg at all" * 10)
    loader = build_test_loader(bad_records(records, bad), loader_config(workers=2), H, W)
    # Not pytest.raises: the re-raised exception's traceback is a reference cycle holding the
    # iterator, and torch's worker shutdown run by the cyclic garbage collector waits 5 s per
    # worker. Dropping the traceback lets `del it` shut the workers down at once.
    it = iter(loader)
    try:
        for _ in it:
            pass
    except CorruptImageError as e:
        message = str(e)
        e.__traceback__ = None
    else:
        pytest.fail("a non-image file was decoded without error")
    del it
    assert "garbage.jpg" in message and "cannot decode" in message


def test_loader_refuses_to_run_with_truncated_images_allowed(records, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match="LOAD_TRUNCATED_IMAGES"):
        build_test_loader(records, loader_config(), H, W)


def test_resolve_backend_picks_dali_only_when_it_imports(monkeypatch):
    assert resolve_backend("torch") == "torch"
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails
    assert resolve_backend("auto") == "torch"
    with pytest.raises(ConfigError, match=r"loader\.backend.*pip install hpc-reid\[dali\]"):
        resolve_backend("dali")
    monkeypatch.setitem(sys.modules, "nvidia", types.ModuleType("nvidia"))
    monkeypatch.setitem(sys.modules, "nvidia.dali", types.ModuleType("nvidia.dali"))
    assert resolve_backend("auto") == "dali" and resolve_backend("dali") == "dali"
    with pytest.raises(ConfigError, match=r"loader\.backend: unknown backend 'pil'"):
        resolve_backend("pil")
