"""IdentitySampler: P x K batch shape, rank placement, determinism, resume and world-size rules.

Properties run over random data sets (identities with 1..8 images, some fewer than K, on 1..4 of 6
cameras, ids not contiguous, records in random order) and are checked against the data set's own
pids and camids, never against the sampler's internals.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_reid.data.samplers import IdentitySampler

FAST = settings(max_examples=100, deadline=None, derandomize=True)


def make_records(num_ids: int, data_seed: int, max_images: int = 8) -> tuple[list[int], list[int]]:
    """Random (pids, camids): each identity has 1..max_images images on 1..4 of 6 cameras."""
    rng = np.random.default_rng(data_seed)
    id_values = rng.choice(10**6, size=num_ids, replace=False)
    pids, cams = [], []
    for pid in id_values:
        own_cams = rng.choice(6, size=rng.integers(1, 5), replace=False)
        n = int(rng.integers(1, max_images + 1))
        pids += [int(pid)] * n
        cams += rng.choice(own_cams, size=n).tolist()
    order = rng.permutation(len(pids))
    return [pids[i] for i in order], [cams[i] for i in order]


@st.composite
def setups(draw, worlds=(1, 2, 3, 4)):
    p, k, world = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.sampled_from(worlds))
    num_ids = draw(st.integers(p * world, 3 * p * world + 2))
    pids, cams = make_records(num_ids, draw(st.integers(0, 2**32 - 1)))
    return pids, cams, p, k, world, draw(st.integers(0, 2**32 - 1))


def rank_samplers(pids, cams, p, k, world, seed, epoch=0, **kw) -> list[IdentitySampler]:
    samplers = [
        IdentitySampler(pids, cams, p, k, rank=r, world_size=world, seed=seed, **kw)
        for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers


def joined(parts) -> list[int]:
    """One global batch from its rank parts, in rank order."""
    return list(itertools.chain.from_iterable(parts))


def groups_of(batch: list[int], k: int) -> list[list[int]]:
    return [batch[i : i + k] for i in range(0, len(batch), k)]


@FAST
@given(setups())
def test_rank_batches_hold_p_distinct_identities_of_k_consecutive_images(setup):
    pids, cams, p, k, world, seed = setup
    for s in rank_samplers(pids, cams, p, k, world, seed):
        for batch in s:
            assert len(batch) == p * k
            assert all(0 <= i < len(pids) for i in batch)
            owners = [{pids[i] for i in group} for group in groups_of(batch, k)]
            assert all(len(o) == 1 for o in owners)
            assert len(set().union(*owners)) == p


@FAST
@given(setups())
def test_identity_sits_on_one_rank_and_appears_once_per_epoch_with_equal_rank_lengths(setup):
    pids, cams, p, k, world, seed = setup
    samplers = rank_samplers(pids, cams, p, k, world, seed, epoch=3)
    expected = len(set(pids)) // (p * world)
    per_rank = [list(s) for s in samplers]
    for s, batches in zip(samplers, per_rank, strict=True):
        assert len(s) == s.batches_per_epoch == len(batches) == expected
    seen = Counter(pids[g[0]] for batches in per_rank for b in batches for g in groups_of(b, k))
    assert all(c == 1 for c in seen.values())
    assert len(seen) == expected * p * world
    # Rank-major global batches: rank r's batch is slice r of the global one.
    plan = samplers[0].global_plan(3)
    assert plan == [joined(parts) for parts in zip(*per_rank, strict=True)]


@FAST
@given(setups())
def test_k_images_repeat_only_when_fewer_than_k_and_cover_min_k_cameras(setup):
    pids, cams, p, k, world, seed = setup
    images_of: dict[int, list[int]] = {}
    for i, pid in enumerate(pids):
        images_of.setdefault(pid, []).append(i)
    for s in rank_samplers(pids, cams, p, k, world, seed, epoch=1):
        for batch in s:
            for group in groups_of(batch, k):
                own = images_of[pids[group[0]]]
                if len(own) >= k:
                    assert len(set(group)) == k
                else:  # all its images, then draws with replacement among them
                    assert set(group) == set(own)
                own_cams = {cams[i] for i in own}
                assert len({cams[i] for i in group}) == min(k, len(own_cams))


@FAST
@given(setups(), st.integers(0, 50))
def test_same_seed_and_epoch_replay_the_same_batches(setup, epoch):
    pids, cams, p, k, world, seed = setup
    first = [list(s) for s in rank_samplers(pids, cams, p, k, world, seed, epoch)]
    again = rank_samplers(pids, cams, p, k, world, seed, epoch + 1)
    for s in again:
        s.set_epoch(epoch)
    assert [list(s) for s in again] == first
    assert [list(s) for s in again] == first  # iterating twice replays the epoch


def test_other_epochs_and_seeds_give_other_batches():
    pids, cams = make_records(60, data_seed=5)
    s = IdentitySampler(pids, cams, 4, 4, world_size=2)
    plans = [s.global_plan(e) for e in range(6)]
    assert all(plans[a] != plans[b] for a in range(6) for b in range(a))
    # Not only other images: identities are reshuffled, so batches group other identities.
    teams = [[frozenset(pids[i] for i in batch) for batch in plan] for plan in plans]
    assert all(teams[a] != teams[b] for a in range(6) for b in range(a))
    other = IdentitySampler(pids, cams, 4, 4, world_size=2, seed=1)
    assert other.global_plan(0) != plans[0]


@FAST
@given(setups(), st.integers(0, 20), st.data())
def test_resume_mid_epoch_yields_the_remaining_batches_then_the_next_epoch(setup, epoch, data):
    pids, cams, p, k, world, seed = setup
    for ref in rank_samplers(pids, cams, p, k, world, seed, epoch):
        batches = list(ref)
        consumed = data.draw(st.integers(0, len(batches)))
        state = ref.state_dict(batches_consumed=consumed)
        fresh = IdentitySampler(pids, cams, p, k, rank=ref.rank, world_size=world, seed=seed)
        fresh.load_state_dict(state)
        assert len(fresh) == len(batches) - consumed
        assert list(fresh) == batches[consumed:]
        fresh.set_epoch(epoch + 1)
        ref.set_epoch(epoch + 1)
        assert len(fresh) == fresh.batches_per_epoch
        assert list(fresh) == list(ref)


@FAST
@given(setups(worlds=(4,)), st.integers(0, 10))
def test_global_batches_are_the_same_multisets_at_world_1_2_4(setup, epoch):
    pids, cams, p, k, _, seed = setup
    p_global = 4 * p

    def union_per_global_batch(world: int) -> list[list[int]]:
        ranks = [
            list(s) for s in rank_samplers(pids, cams, p_global // world, k, world, seed, epoch)
        ]
        return [sorted(joined(rank_batches)) for rank_batches in zip(*ranks, strict=True)]

    single = union_per_global_batch(1)
    assert len(single) == len(set(pids)) // p_global
    assert union_per_global_batch(2) == single
    assert union_per_global_batch(4) == single


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.integers(0, 4), st.data())
def test_resume_at_another_world_size_with_the_same_global_batch_continues_the_plan(
    seed, epoch, data
):
    pids, cams = make_records(200, data_seed=seed % 1000)
    four = [list(s) for s in rank_samplers(pids, cams, 16, 4, 4, seed, epoch)]
    global_batches = [joined(parts) for parts in zip(*four, strict=True)]
    consumed = data.draw(st.integers(0, len(global_batches)))
    state = IdentitySampler(pids, cams, 16, 4, rank=3, world_size=4, seed=seed).state_dict(0)
    state.update(epoch=epoch, batches_consumed=consumed)
    two = rank_samplers(pids, cams, 32, 4, 2, seed)
    for s in two:
        s.load_state_dict(state)
    resumed = [joined(parts) for parts in zip(*map(list, two), strict=True)]
    assert resumed == global_batches[consumed:]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"world_size": 2},
            "global batch of 64 identities at save time, 32 now: the sampling plan differs; "
            "keep P x world size constant",
        ),
        ({"seed": 8}, "'seed': seed 7 at save time, 8 now"),
        ({"num_instances": 2}, "'num_instances': K=4 images per identity at save time, 2 now"),
        ({"drop": 1}, "'num_records': .* training records at save time, .* now"),
        ({"passes": 2}, "'passes': 1 passes per epoch at save time, 2 now"),
    ],
)
def test_resume_with_another_plan_raises_naming_key_and_both_values(change, message):
    pids, cams = make_records(200, data_seed=1)
    saved = IdentitySampler(pids, cams, 16, 4, world_size=4, seed=7).state_dict(2)
    drop = change.pop("drop", 0)
    args = {"world_size": 4, "seed": 7, "num_instances": 4, **change}
    k = args.pop("num_instances")
    now = IdentitySampler(pids[drop:], cams[drop:], 16, k, **args)
    with pytest.raises(ValueError, match=message):
        now.load_state_dict(saved)


@FAST
@given(setups(), st.integers(2, 4), st.integers(0, 3))
def test_an_epoch_of_n_passes_is_n_independent_single_pass_plans(setup, passes, epoch):
    """Pass 0 is the single-pass epoch; each pass holds every identity at most once; the epoch is
    passes x as long; ranks stay equal in length and the plan does not depend on the world size
    beyond the global batch."""
    pids, cams, p, k, world, seed = setup
    single = IdentitySampler(pids, cams, p * world, k, seed=seed)
    multi = IdentitySampler(pids, cams, p * world, k, seed=seed, passes=passes)
    one, many = single.global_plan(epoch), multi.global_plan(epoch)
    per_pass = len(one)
    assert len(many) == passes * per_pass == multi.batches_per_epoch
    assert many[:per_pass] == one
    pid_of = np.asarray(pids)
    for i in range(passes):
        ids = [
            pid_of[b[j]]
            for b in many[i * per_pass : (i + 1) * per_pass]
            for j in range(0, len(b), k)
        ]
        assert len(ids) == len(set(ids))
    ranks = rank_samplers(pids, cams, p, k, world, seed, epoch, passes=passes)
    parts = [list(r) for r in ranks]
    assert {len(x) for x in parts} == {len(many)}
    assert [joined(batch) for batch in zip(*parts, strict=True)] == many


def test_state_dict_holds_position_and_plan_keys_and_rejects_impossible_counts():
    pids, cams = make_records(40, data_seed=2)
    s = IdentitySampler(pids, cams, 4, 2, rank=1, world_size=2, seed=3)
    s.set_epoch(5)
    assert s.state_dict(batches_consumed=1) == {
        "epoch": 5,
        "batches_consumed": 1,
        "seed": 3,
        "global_identities": 8,
        "num_instances": 2,
        "num_records": len(pids),
        "passes": 1,
    }
    with pytest.raises(ValueError, match="batches_consumed must be in"):
        s.state_dict(batches_consumed=s.batches_per_epoch + 1)
    with pytest.raises(ValueError, match="lacks key"):
        s.load_state_dict({"epoch": 1})


def test_too_small_identity_without_replacement_raises_naming_it():
    pids = [3] * 5 + [7] * 2 + [9] * 6
    cams = [0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="identity 7 has 2 images, fewer than K=4"):
        IdentitySampler(pids, cams, 1, 4, allow_replacement=False)
    IdentitySampler(pids, cams, 1, 2, allow_replacement=False)  # every identity has >= K


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_identities": 0}, "P=0"),
        ({"num_instances": 0}, "K=0"),
        ({"rank": 2, "world_size": 2}, "rank=2, world_size=2"),
        ({"rank": -1}, "rank=-1"),
        ({"num_identities": 3, "world_size": 2}, "5 identities cannot fill .* P=3 .* world size 2"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    pids = [0, 0, 1, 1, 2, 3, 4]
    args = {"num_identities": 2, "num_instances": 2, **kwargs}
    p, k = args.pop("num_identities"), args.pop("num_instances")
    with pytest.raises(ValueError, match=message):
        IdentitySampler(pids, [0] * len(pids), p, k, **args)


def test_pids_and_camids_of_different_lengths_raise():
    with pytest.raises(ValueError, match="same length"):
        IdentitySampler([0, 1, 2], [0], 1, 1)


def test_drives_a_dataloader_as_batch_sampler():
    pids, cams = make_records(30, data_seed=4)
    s = IdentitySampler(pids, cams, 3, 2, rank=1, world_size=2, seed=9)
    s.set_epoch(2)
    dataset = torch.utils.data.TensorDataset(torch.arange(len(pids)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=s)
    assert len(loader) == len(s)
    assert [b[0].tolist() for b in loader] == list(s)


def test_planning_100k_records_takes_well_under_a_second():
    rng = np.random.default_rng(0)
    pids, cams = rng.integers(0, 5000, 100_000), rng.integers(0, 15, 100_000)
    s = IdentitySampler(pids, cams, 16, 4, rank=1, world_size=4)
    times = []
    for epoch in range(3):
        tic = time.perf_counter()
        s.set_epoch(epoch)
        batches = list(s)
        times.append(time.perf_counter() - tic)
    assert len(batches) == s.batches_per_epoch == 5000 // 64
    assert min(times) < 0.5
