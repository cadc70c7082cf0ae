"""RandomSampler (sampler.kind=random): each epoch one seeded permutation of the images cut into
global batches of B x world, the last incomplete one dropped, rank r taking its slice of each;
resumable mid-epoch and at another world size; built from the config; driving the torch and DALI
loaders and a short training run.

The plan is checked against a plain-Python reference of the documented layout
(:func:`reference_epoch`) and against counts made from the yielded batches alone.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hpc_reid.config import AugmentConfig, ConfigError, LoaderConfig, SamplerConfig
from hpc_reid.data.datasets.base import ImageRecord, TrackletRecord
from hpc_reid.data.loaders import torch_loader
from hpc_reid.data.samplers import (
    IdentitySampler,
    RandomSampler,
    build_sampler,
    rank_batch_size,
)
from hpc_reid.engine import trainer as trainer_module
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from tests.engine.test_trainer import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = settings(max_examples=60, deadline=None, derandomize=True)
SEEDS = st.integers(0, 2**32 - 1)


def reference_epoch(n: int, b: int, world: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Per rank, its batches of ``epoch``, written out from the documented layout: the
    permutation of range(n) seeded by (seed, epoch), global batch i its items [i G, (i + 1) G)
    for G = b x world while a whole one fits, rank r the items [r b, (r + 1) b) of each."""
    order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]
    g = b * world
    out: list[list[list[int]]] = [[] for _ in range(world)]
    start = 0
    while start + g <= n:
        for r in range(world):
            out[r].append(order[start + r * b : start + (r + 1) * b])
        start += g
    return out


def joined(parts) -> list[int]:
    """One global batch from its rank parts, in rank order."""
    return list(itertools.chain.from_iterable(parts))


def rank_samplers(n, b, world, seed, epoch=0) -> list[RandomSampler]:
    samplers = [RandomSampler(n, b, rank=r, world_size=world, seed=seed) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers


@st.composite
def setups(draw, worlds=(1, 2, 3)):
    b, world = draw(st.integers(1, 12)), draw(st.sampled_from(worlds))
    n = draw(st.integers(b * world, 5 * b * world + 7))
    return n, b, world, draw(SEEDS)


@FAST
@given(setups(), st.integers(0, 30))
def test_each_image_at_most_once_per_epoch_and_n_over_bw_global_batches_on_disjoint_ranks(
    setup, epoch
):
    n, b, world, seed = setup
    samplers = rank_samplers(n, b, world, seed, epoch)
    per_rank = [list(s) for s in samplers]
    expected_batches = n // (b * world)
    for s, batches in zip(samplers, per_rank, strict=True):
        assert len(s) == s.batches_per_epoch == len(batches) == expected_batches
        assert all(len(batch) == b for batch in batches)
    seen = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert sum(seen.values()) == expected_batches * b * world
    assert max(seen.values()) == 1 and all(0 <= i < n for i in seen)
    rank_sets = [{i for batch in batches for i in batch} for batches in per_rank]
    assert all(rank_sets[a].isdisjoint(rank_sets[c]) for a in range(world) for c in range(a))
    assert per_rank == reference_epoch(n, b, world, seed, epoch)


@FAST
@given(setups(), st.integers(0, 30))
def test_same_seed_and_epoch_replay_the_batches_other_epochs_and_seeds_reorder(setup, epoch):
    n, b, world, seed = setup
    first = [list(s) for s in rank_samplers(n, b, world, seed, epoch)]
    again = rank_samplers(n, b, world, seed, epoch + 3)
    for s in again:
        s.set_epoch(epoch)
    assert [list(s) for s in again] == first
    assert [list(s) for s in again] == first  # iterating twice replays the epoch
    assert [s.rank_batches(epoch) for s in again] == first
    if b * world >= 6:  # at least 6! orders of the first global batch: a repeat is improbable
        flat = [i for batches in first for batch in batches for i in batch]
        for other in (
            rank_samplers(n, b, world, seed, epoch + 1),
            rank_samplers(n, b, world, seed + 1, epoch),
        ):
            assert [i for s in other for batch in s for i in batch] != flat


@FAST
@given(setups(), st.integers(0, 20), st.data())
def test_mid_epoch_state_into_a_fresh_sampler_yields_exactly_the_remaining_batches(
    setup, epoch, data
):
    n, b, world, seed = setup
    for ref in rank_samplers(n, b, world, seed, epoch):
        batches = list(ref)
        consumed = data.draw(st.integers(0, len(batches)))
        state = json.loads(json.dumps(ref.state_dict(batches_consumed=consumed)))  # as saved
        fresh = RandomSampler(n, b, rank=ref.rank, world_size=world, seed=seed)
        fresh.load_state_dict(state)
        assert len(fresh) == len(batches) - consumed
        assert list(fresh) == batches[consumed:]
        fresh.set_epoch(epoch + 1)
        ref.set_epoch(epoch + 1)
        assert len(fresh) == fresh.batches_per_epoch and list(fresh) == list(ref)


@FAST
@given(st.integers(1, 6), st.integers(0, 200), SEEDS, st.integers(0, 10), st.data())
def test_union_over_1_2_3_ranks_is_the_single_process_plan_and_resumes_across_world_sizes(
    unit, extra, seed, epoch, data
):
    g = 6 * unit  # a global batch every world size of 1, 2, 3 divides
    n = g + extra

    def global_batches(world: int) -> list[list[int]]:
        ranks = [list(s) for s in rank_samplers(n, g // world, world, seed, epoch)]
        return [joined(parts) for parts in zip(*ranks, strict=True)]

    single = global_batches(1)
    assert len(single) == n // g
    assert global_batches(2) == single and global_batches(3) == single
    # Saved on 3 ranks after some batches, resumed on 2: the rest of the same global plan.
    consumed = data.draw(st.integers(0, len(single)))
    state = rank_samplers(n, g // 3, 3, seed, epoch)[2].state_dict(batches_consumed=consumed)
    two = [RandomSampler(n, g // 2, rank=r, world_size=2, seed=seed) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    resumed = [joined(parts) for parts in zip(*map(list, two), strict=True)]
    assert resumed == single[consumed:]


def test_fewer_images_than_one_global_batch_is_an_error_naming_the_numbers():
    with pytest.raises(
        ValueError,
        match=r"10 training images cannot fill one global batch of "
        r"B=4 images x world size 3 = 12; lower sampler.batch_size",
    ):
        RandomSampler(10, 4, rank=0, world_size=3)
    assert RandomSampler(12, 4, rank=2, world_size=3).batches_per_epoch == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size .* must be >= 1, got 0"),
        ({"rank": 2, "world_size": 2}, "rank=2, world_size=2"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    args = {"num_records": 20, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        RandomSampler(args.pop("num_records"), args.pop("batch_size"), **args)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 8}, "'seed': seed 7 at save time, 8 now"),
        ({"world_size": 2}, "'global_batch': global batch of 16 images at save time, 8 now"),
        ({"num_records": 99}, "'num_records': 100 training records at save time, 99 now"),
    ],
)
def test_resume_with_another_plan_raises_naming_key_and_both_values(change, message):
    saved = RandomSampler(100, 4, world_size=4, seed=7).state_dict(2)
    args = {"num_records": 100, "world_size": 4, "seed": 7, **change}
    now = RandomSampler(args.pop("num_records"), 4, **args)
    with pytest.raises(ValueError, match=message):
        now.load_state_dict(saved)


def test_a_state_of_the_other_sampler_kind_is_refused_naming_both_kinds():
    pids, cams = [i // 4 for i in range(40)], [i % 2 for i in range(40)]
    identity = IdentitySampler(pids, cams, 2, 4, seed=3)
    random = RandomSampler(40, 8, seed=3)
    with pytest.raises(
        ValueError, match=r"sampler.kind was 'identity' at save time and is 'random'"
    ):
        random.load_state_dict(identity.state_dict(1))
    with pytest.raises(
        ValueError, match=r"sampler.kind was 'random' at save time and is 'identity'"
    ):
        identity.load_state_dict(random.state_dict(1))
    with pytest.raises(ValueError, match="batches_consumed must be in"):
        random.state_dict(batches_consumed=random.batches_per_epoch + 1)


def test_config_builds_the_kind_it_names_with_its_batch_and_description():
    records = [SimpleNamespace(pid=i // 5, camid=i % 3) for i in range(100)]
    identity_cfg = SamplerConfig(num_identities=4, num_instances=3)
    s = build_sampler(records, identity_cfg, seed=1, rank=1, world_size=2)
    assert type(s) is IdentitySampler and s.batch_size == 12 == rank_batch_size(identity_cfg)
    assert s.describe() == "4 ids x 3 images" and len(next(iter(s))) == 12
    default_random = SamplerConfig(kind="random", num_identities=4, num_instances=3)
    assert rank_batch_size(default_random) == 12  # unset: P x K, stage 1's batch
    cfg = SamplerConfig(kind="random", batch_size=7)
    s = build_sampler(records, cfg, seed=1, rank=1, world_size=2)
    assert type(s) is RandomSampler and s.batch_size == 7 == rank_batch_size(cfg)
    assert s.describe() == "7 random images"
    tracklets = [
        TrackletRecord(tuple(f"{i}_{j}.jpg" for j in range(3)), r.pid, r.camid)
        for i, r in enumerate(records)
    ]
    assert build_sampler(tracklets, cfg, seed=1).describe() == "7 random tracklets"
    assert build_sampler(tracklets, identity_cfg, seed=1).describe() == "4 ids x 3 tracklets"
    assert s.rank == 1 and s.world_size == 2 and s.num_records == 100
    assert s.batches_per_epoch == 100 // 14
    ignored = SamplerConfig(num_identities=4, num_instances=3, batch_size=64)
    with pytest.raises(
        ConfigError,
        match=r"sampler.batch_size=64 applies to sampler.kind=random.*"
        r"4 x 3 = 12",
    ):
        build_sampler(records, ignored, seed=1)
    assert rank_batch_size(ignored.model_copy(update={"batch_size": 12})) == 12


# ----------------------------------------------------------------------------- the loaders

H, W, SEED = 32, 16, 11


@pytest.fixture(scope="module")
def image_records(tmp_path_factory) -> list[ImageRecord]:
    """30 random 32x16 JPEGs of 10 identities on 2 cameras."""
    root = tmp_path_factory.mktemp("random_sampler_images")
    rng = np.random.default_rng(0)
    out = []
    for i in range(30):
        path = root / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, quality=90)
        out.append(ImageRecord(str(path), i % 10, i % 2, i))
    return out


def loader_config(workers: int = 0) -> LoaderConfig:
    return LoaderConfig(
        num_workers=workers, prefetch=2, pin_memory=False, augment=AugmentConfig(pad=2)
    )


def dali_loader_module():
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (the test extra)")
    from hpc_reid.data.loaders import dali_loader

    return dali_loader


def test_torch_loader_gives_each_global_sample_the_same_index_and_image_at_1_and_2_ranks(
    image_records,
):
    """Global batch 6: one rank of 6 against two of 3; epochs 0 and 2, then a mid-epoch resume.
    Augmentation follows the sample's global position, so the images are equal bit for bit."""
    cfg, n = loader_config(), len(image_records)
    one = RandomSampler(n, 6, seed=SEED)
    two = [RandomSampler(n, 3, rank=r, world_size=2, seed=SEED) for r in range(2)]

    def run(sampler) -> list[dict[str, torch.Tensor]]:
        return list(torch_loader.build_train_loader(image_records, sampler, cfg, H, W, SEED))

    for epoch in (0, 2):
        for s in (one, *two):
            s.set_epoch(epoch)
        single, parts = run(one), [run(s) for s in two]
        assert [b["indices"].tolist() for b in single] == one.rank_batches(epoch)
        assert len(single) == n // 6 == len(parts[0]) == len(parts[1])
        for whole, (a, b) in zip(single, zip(*parts, strict=True), strict=True):
            assert whole["indices"].tolist() == a["indices"].tolist() + b["indices"].tolist()
            assert torch.equal(whole["images"], torch.cat([a["images"], b["images"]]))
            pids = [image_records[i].pid for i in whole["indices"].tolist()]
            assert whole["pids"].tolist() == pids
    state = two[1].state_dict(batches_consumed=2)
    fresh = RandomSampler(n, 6, seed=SEED)
    fresh.load_state_dict(state)
    assert [b["indices"].tolist() for b in run(fresh)] == one.rank_batches(2)[2:]


def test_dali_loader_yields_the_torch_loader_s_batches_and_random_decisions(image_records):
    """Two ranks of 4 random images, epochs 1 and 2 (one pipeline stream running through), then a
    mid-epoch resume; DALI's erased pixels (exact zeros) coincide with the torch loader's. Rank 1
    reads through DALI's parallel workers, which replan the epochs from their sampler copy."""
    dali_loader = dali_loader_module()
    n = len(image_records)

    def labels(batches):
        return [tuple(b[k].tolist() for k in ("pids", "camids", "indices")) for b in batches]

    for rank in (0, 1):
        cfg = loader_config(workers=2 * rank).model_copy(update={"dali_pipelines": 2})
        sampler = RandomSampler(n, 4, rank=rank, world_size=2, seed=SEED)
        torch_l = torch_loader.build_train_loader(image_records, sampler, cfg, H, W, SEED)
        dali_l = dali_loader.build_train_loader(
            image_records, sampler, cfg, H, W, SEED, device="cpu"
        )
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            a, b = list(torch_l), list(dali_l)  # all held: DLPack outputs stay valid
            assert labels(a) == labels(b) and len(b) == n // 8
            assert [x["indices"].tolist() for x in b] == sampler.rank_batches(epoch)
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x["images"] == 0, y["images"] == 0)
        state = sampler.state_dict(batches_consumed=1)
        sampler.set_epoch(0)
        sampler.load_state_dict(state)
        assert labels(dali_l) == labels(torch_l) and len(dali_l) == n // 8 - 1


def test_dali_loader_refuses_a_sampler_that_cannot_replan_an_epoch_naming_what_it_lacks(
    image_records,
):
    dali_loader = dali_loader_module()
    plain = torch.utils.data.BatchSampler(range(len(image_records)), 4, drop_last=True)
    with pytest.raises(TypeError, match=r"got BatchSampler, which lacks \['rank_batches'"):
        dali_loader.build_train_loader(image_records, plain, loader_config(), H, W, SEED)


# ----------------------------------------------------------------------------- the trainer


def recorded_train(config, **kwargs) -> list[list[int]]:
    """Run ``train(config, **kwargs)``; the dataset indices of every batch it trained on."""
    seen: list[list[int]] = []
    build = trainer_module.build_backend_train_loader

    class Recorded:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for b in self.loader:
                seen.append(b["indices"].tolist())
                yield b

    patch = pytest.MonkeyPatch()
    patch.setattr(
        trainer_module, "build_backend_train_loader", lambda *a, **k: Recorded(build(*a, **k))
    )
    try:
        trainer_module.train(config, **kwargs)
    finally:
        patch.undo()
    return seen


def test_a_random_batch_run_trains_on_the_sampler_s_plan_and_resumes_mid_epoch_bit_exactly(
    tmp_path, capsys
):
    """sampler.kind=random, 8 images a batch, CE + center loss: steps 1-8 straight against steps
    1-4, a checkpoint mid-epoch 1, and a resume to step 8 in epoch 2."""
    extra = [
        "sampler.kind=random",
        "sampler.batch_size=8",
        "loss.triplet.weight=0",
        "evaluation.at_start=false",
        "loader.backend=torch",
    ]
    straight = tiny_config(tmp_path, *extra, "logging.run_name=straight")
    seen = recorded_train(straight, max_steps=8)
    assert "global batch 8 = 8 random images x 1 ranks" in capsys.readouterr().out
    run = tmp_path / "runs/straight"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    assert len(losses) == 8 and all(np.isfinite(losses))

    num_train = load_checkpoint(CheckpointManager(run).latest())["sampler"]["num_records"]
    plan = RandomSampler(num_train, 8, seed=straight.engine.seed)
    per_epoch = plan.batches_per_epoch
    assert 4 < per_epoch < 8  # step 4 is mid-epoch 1 and step 8 in epoch 2
    expected = plan.rank_batches(0) + plan.rank_batches(1)
    assert seen == expected[:8]

    split = tiny_config(tmp_path, *extra, "logging.run_name=split")
    first = recorded_train(split, max_steps=4)
    state = load_checkpoint(CheckpointManager(tmp_path / "runs/split").latest())["sampler"]
    assert state["kind"] == "random" and state["batches_consumed"] == 4
    second = recorded_train(split, resume="auto", max_steps=8)
    assert first + second == seen
    a = load_checkpoint(CheckpointManager(run).latest())["strategy"]["model"]
    b = load_checkpoint(CheckpointManager(tmp_path / "runs/split").latest())["strategy"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deepspeed_micro_batch_and_bench_strong_scaling_take_the_random_batch_size(tmp_path):
    from hpc_reid.bench.runner import strong_scaled
    from hpc_reid.engine.deepspeed_strategy import merged_deepspeed_config
    from hpc_reid.engine.errors import TrainingError

    random = ["sampler.kind=random", "sampler.batch_size=12", "loss.triplet.weight=0"]
    config = tiny_config(tmp_path, *random, "engine.strategy=deepspeed")
    ds = merged_deepspeed_config(config, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 12 and ds["train_batch_size"] == 24
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    other = config.model_copy(deep=True)
    other.engine.deepspeed_config = str(path)
    with pytest.raises(TrainingError, match=r"=8 .*gives 12 .*sampler.batch_size = 12"):
        merged_deepspeed_config(other, world_size=2)
    config = tiny_config(tmp_path, *random)
    assert strong_scaled(config, 3).sampler.batch_size == 4
    assert strong_scaled(config, 3).sampler.num_identities == config.sampler.num_identities
    with pytest.raises(ConfigError, match=r"sampler\.batch_size=12 is not divisible by the world"):
        strong_scaled(config, 5)
