"""The identity sampler over tracklets (video sets): P identities x K tracklets per rank batch.

:class:`IdentitySampler` balances any records with ``pid`` and ``camid``; here it is built the way
a run builds it (:func:`build_sampler` from the ``sampler`` section) over TrackletRecord lists with
an uneven number of tracklets per identity (1..7, some fewer than K, on 1..4 of 6 cameras, records
in random order), and every property is checked against the records themselves.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from hpc_reid.config import SamplerConfig
from hpc_reid.data.datasets.base import TrackletRecord
from hpc_reid.data.samplers import IdentitySampler, build_sampler

DATA_SEEDS = (0, 1, 2)
#: (P, K, world size, passes)
SETUPS = ((2, 4, 1, 1), (3, 4, 2, 1), (2, 3, 3, 1), (4, 2, 2, 2))


def make_tracklets(num_ids: int, data_seed: int) -> list[TrackletRecord]:
    """Random tracklets: each identity has 1..7 of them on 1..4 of 6 cameras, 1..30 frames each;
    pids are not contiguous and the records come in random order."""
    rng = np.random.default_rng(data_seed)
    records = []
    for pid in rng.choice(10**4, size=num_ids, replace=False).tolist():
        cams = rng.choice(6, size=rng.integers(1, 5), replace=False)
        for _ in range(int(rng.integers(1, 8))):
            tid, camid = len(records), int(rng.choice(cams))
            frames = tuple(f"{pid:04d}/{tid}_{f:03d}.jpg" for f in range(rng.integers(1, 31)))
            records.append(TrackletRecord(frames, pid, camid, tid))
    return [records[i] for i in rng.permutation(len(records))]


def samplers(records, p, k, world, passes, seed=0, epoch=0) -> list[IdentitySampler]:
    cfg = SamplerConfig(num_identities=p, num_instances=k, passes_per_epoch=passes)
    out = [build_sampler(records, cfg, seed, rank=r, world_size=world) for r in range(world)]
    for s in out:
        s.set_epoch(epoch)
    return out


def groups(batch: list[int], k: int) -> list[list[int]]:
    return [batch[i : i + k] for i in range(0, len(batch), k)]


def tracklets_of(records) -> dict[int, list[int]]:
    own = defaultdict(list)
    for i, r in enumerate(records):
        own[r.pid].append(i)
    return own


@pytest.mark.parametrize("data_seed", DATA_SEEDS)
@pytest.mark.parametrize(("p", "k", "world", "passes"), SETUPS)
def test_each_batch_holds_k_tracklets_of_each_of_p_identities(data_seed, p, k, world, passes):
    records = make_tracklets(40, data_seed)
    own = tracklets_of(records)
    for s in samplers(records, p, k, world, passes, seed=data_seed, epoch=2):
        assert s.batch_size == p * k
        for batch in s:
            assert len(batch) == p * k
            pids = []
            for group in groups(batch, k):
                (pid,) = {records[i].pid for i in group}  # K consecutive: one identity
                pids.append(pid)
                mine = own[pid]
                if len(mine) >= k:
                    assert len(set(group)) == k  # K distinct tracklets
                else:  # all of its tracklets, then repeats among them
                    assert set(group) == set(mine)
                cams = {records[i].camid for i in mine}
                assert len({records[i].camid for i in group}) == min(k, len(cams))
            assert len(set(pids)) == p


@pytest.mark.parametrize("data_seed", DATA_SEEDS)
@pytest.mark.parametrize(("p", "k", "world", "passes"), SETUPS)
def test_ranks_are_disjoint_within_an_epoch_and_yield_equal_batch_counts(
    data_seed, p, k, world, passes
):
    records = make_tracklets(40, data_seed)
    ranks = samplers(records, p, k, world, passes, seed=7, epoch=1)
    per_pass = len({r.pid for r in records}) // (p * world)  # the last partial batch dropped
    per_rank = [list(s) for s in ranks]
    assert [len(b) for b in per_rank] == [len(s) for s in ranks] == [passes * per_pass] * world
    for one_pass in range(passes):
        part = slice(one_pass * per_pass, (one_pass + 1) * per_pass)
        ids = [{records[i].pid for b in batches[part] for i in b} for batches in per_rank]
        seen = [{i for b in batches[part] for i in b} for batches in per_rank]
        for a, b in itertools.combinations(range(world), 2):
            assert not ids[a] & ids[b] and not seen[a] & seen[b]
        # each identity in at most one batch of the pass, on one rank
        counts = Counter(
            records[g[0]].pid for batches in per_rank for b in batches[part] for g in groups(b, k)
        )
        assert set(counts.values()) == {1} and len(counts) == per_pass * p * world


@pytest.mark.parametrize("data_seed", DATA_SEEDS)
def test_the_batches_are_a_function_of_seed_and_epoch(data_seed):
    records = make_tracklets(40, data_seed)

    def plan(seed: int, epoch: int) -> list[list[list[int]]]:
        return [list(s) for s in samplers(records, 3, 4, 2, 1, seed=seed, epoch=epoch)]

    first = plan(5, 3)
    assert plan(5, 3) == first  # fresh samplers replay it
    reused = samplers(records, 3, 4, 2, 1, seed=5, epoch=9)
    for s in reused:
        s.set_epoch(3)
    assert [list(s) for s in reused] == first
    assert plan(5, 4) != first and plan(6, 3) != first


@pytest.mark.parametrize("data_seed", DATA_SEEDS)
@pytest.mark.parametrize(("p", "k", "world", "passes"), SETUPS)
def test_resume_mid_epoch_yields_exactly_the_untrained_batches(data_seed, p, k, world, passes):
    records = make_tracklets(40, data_seed)
    cfg = SamplerConfig(num_identities=p, num_instances=k, passes_per_epoch=passes)
    for ref in samplers(records, p, k, world, passes, seed=3, epoch=4):
        batches = list(ref)
        for consumed in sorted({0, 1, len(batches) // 2, len(batches)}):
            state = json.loads(json.dumps(ref.state_dict(batches_consumed=consumed)))
            fresh = build_sampler(records, cfg, 3, rank=ref.rank, world_size=world)
            fresh.load_state_dict(state)
            assert len(fresh) == len(batches) - consumed
            assert list(fresh) == batches[consumed:]
            fresh.set_epoch(5)  # then the next epoch from its start, as the run would have
            assert list(fresh) == ref.rank_batches(5)


def test_resume_refuses_another_training_split_naming_the_counts():
    records = make_tracklets(40, 0)
    (s,) = samplers(records, 2, 4, 1, 1)
    state = s.state_dict(batches_consumed=1)
    (other,) = samplers(records[:-1], 2, 4, 1, 1)
    with pytest.raises(ValueError, match=rf"{len(records)} training records at save time, "):
        other.load_state_dict(state)
