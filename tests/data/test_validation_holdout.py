"""The validation holdout (``data.validation``, hpc_reid/data/holdout.py) against direct
computations on random sets: held-out and training identities disjoint, no test record in any
split, the source's train records partitioned, the documented draw of identities, one query per
non-gallery camera with a cross-camera positive, the distractor count, the training labels
relabelled; deterministic per seed; the one-camera (VehicleID) rule; tracklets; folders and packs
through ``dataset_from_config``; and the errors."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from hpc_reid.config import load_config
from hpc_reid.data.build import dataset_from_config
from hpc_reid.data.datasets import DatasetError, ImageRecord, ReidDataset
from hpc_reid.data.datasets.base import TrackletRecord
from hpc_reid.data.holdout import ValidationHoldout
from hpc_reid.data.pack import pack_dataset
from hpc_reid.data.synthetic import SynthSpec, generate

REPO = Path(__file__).resolve().parents[2]


class Parsed(ReidDataset):
    """A parsed set made in memory (the parser's ``_finish`` relabels its train ids)."""

    name = "parsed"

    def __init__(self, train, query, gallery):
        self.root = Path("/nowhere")
        self._finish(train, query, gallery, {"junk images": 3})


def random_set(seed: int, ids: int = 40, cams: int = 6, tracklets: bool = False, one_cam=False):
    """Train ids with 1-4 random cameras and 1-4 records in each; test ids apart, other paths."""
    rng = np.random.default_rng(seed)
    cams = 1 if one_cam else cams

    def record(split, pid, cam, k):
        name = f"{split}/{pid:04d}_c{cam}_{k}"
        if tracklets:
            frames = tuple(f"{name}/f{j}.jpg" for j in range(int(rng.integers(1, 4))))
            return TrackletRecord(frames, pid, cam, tid=int(rng.integers(1000)))
        return ImageRecord(f"{name}.jpg", pid, cam, int(rng.integers(10**6)))

    def records(split, pids):
        out = []
        for pid in pids:
            n_cams = 1 if one_cam else int(rng.integers(1, 5))
            for cam in sorted(rng.choice(cams, size=n_cams, replace=False)):
                out += [record(split, pid, int(cam), k) for k in range(int(rng.integers(1, 5)))]
        rng.shuffle(out)  # the parser's order is not grouped by identity
        return out

    train_pids = sorted(rng.choice(np.arange(100, 1000), size=ids, replace=False).tolist())
    test = records("test", range(2000, 2010))
    return Parsed(records("train", train_pids), test[: len(test) // 3], test[len(test) // 3 :])


def key(record) -> str:
    return record.frames[0] if isinstance(record, TrackletRecord) else record.path


def by_key(records) -> dict[str, object]:
    return {key(r): r for r in records}


def check_holdout(source: ReidDataset, fraction: float, distractors: float, seed: int):
    """Every documented property of the split, computed directly from ``source``."""
    held = ValidationHoldout(source, fraction, distractors, seed)
    train, query, gallery = by_key(held.train), by_key(held.query), by_key(held.gallery)
    src = by_key(source.train)
    # the source's train records, partitioned; no test record anywhere
    assert len(train) + len(query) + len(gallery) == len(held.train) + len(held.query) + len(
        held.gallery
    )
    assert set(train) | set(query) | set(gallery) == set(src)
    assert not (set(train) & set(query) or set(train) & set(gallery) or set(query) & set(gallery))
    test_keys = {key(r) for r in source.query + source.gallery}
    assert not test_keys & (set(train) | set(query) | set(gallery))
    # the held-out identities: the documented first draw of default_rng(seed)
    ids = sorted({r.pid for r in source.train})
    count = round(fraction * len(ids))
    rng = np.random.default_rng(seed)
    expected_held = {ids[i] for i in rng.choice(len(ids), size=count, replace=False)}
    query_ids = {r.pid for r in held.query}
    assert query_ids <= expected_held
    held_keys = {k for k, r in src.items() if r.pid in expected_held}
    assert held_keys <= set(query) | set(gallery)
    # disjoint identities: no record of a held-out identity trains
    assert not held_keys & set(train)
    # distractors: round(distractors x M) of the M remaining records, all in the gallery
    remaining = len(src) - len(held_keys)
    moved = set(gallery) - held_keys
    assert len(moved) == round(distractors * remaining)
    assert {src[k].pid for k in moved}.isdisjoint(expected_held)
    # train relabelled to 0..N'-1 in the order of the source labels, one label per identity
    labels = sorted({r.pid for r in held.train})
    assert labels == list(range(len(labels)))
    pairs = {(src[k].pid, r.pid) for k, r in train.items()}
    assert len({a for a, _ in pairs}) == len(pairs) == len(labels)
    assert sorted(pairs) == sorted(pairs, key=lambda p: p[1])
    # the other fields travel unchanged (frames for st-ReID)
    for k, r in train.items():
        assert (r.camid, getattr(r, "frame", None)) == (
            src[k].camid,
            getattr(src[k], "frame", None),
        )
    return held, expected_held, src


@pytest.mark.parametrize("tracklets", [False, True], ids=["images", "tracklets"])
@pytest.mark.parametrize("seed", [0, 7])
def test_the_split_partitions_train_into_disjoint_ids_with_one_query_per_other_camera(
    seed, tracklets
):
    source = random_set(seed + 1, tracklets=tracklets)
    held, expected_held, _ = check_holdout(source, 0.2, 0.25, seed)
    # per held-out identity: one camera whole in the gallery, one query from each other camera
    cams_of = defaultdict(set)
    for r in source.train:
        cams_of[r.pid].add(r.camid)
    expected_queries = sum(len(cams_of[p]) - 1 for p in expected_held)
    assert len(held.query) == expected_queries
    queries_of = defaultdict(list)
    for q in held.query:
        queries_of[q.pid].append(q.camid)
    for pid in expected_held:
        cams = queries_of[pid]
        assert len(cams) == len(set(cams)) == len(cams_of[pid]) - 1
        (whole,) = cams_of[pid] - set(cams) if len(cams_of[pid]) > 1 else cams_of[pid]
        in_gallery = [r for r in held.gallery if r.pid == pid and r.camid == whole]
        assert len(in_gallery) == sum(r.pid == pid and r.camid == whole for r in source.train)
    # every query keeps a positive under the cross-camera protocol
    for q in held.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in held.gallery)
    # queries and gallery keep the source's order
    order = {key(r): i for i, r in enumerate(source.train)}
    for split in (held.query, held.gallery, held.train):
        positions = [order[key(r)] for r in split]
        assert positions == sorted(positions)


def test_the_same_seed_gives_the_same_split_and_another_seed_another():
    source = random_set(3)
    a, b = ValidationHoldout(source, 0.1, 0.25, 5), ValidationHoldout(source, 0.1, 0.25, 5)
    assert (a.train, a.query, a.gallery) == (b.train, b.query, b.gallery)
    c = ValidationHoldout(source, 0.1, 0.25, 6)
    assert a.split.held_out != c.split.held_out


def test_a_one_camera_train_split_follows_vehicleids_protocol():
    source = random_set(4, one_cam=True)
    held, expected_held, _ = check_holdout(source, 0.25, 0.1, 2)
    assert held.split.one_camera
    counts = defaultdict(int)
    for r in source.train:
        counts[r.pid] += 1
    for pid in expected_held:
        n_query = sum(q.pid == pid for q in held.query)
        n_gallery = sum(g.pid == pid for g in held.gallery)
        assert (n_query, n_gallery) == ((counts[pid] - 1, 1) if counts[pid] > 1 else (0, 1))
    assert {q.camid for q in held.query} == {0} and {g.camid for g in held.gallery} == {1}


def test_statistics_say_what_was_held_out():
    text = ValidationHoldout(random_set(5), 0.1, 0.25, 0).statistics()
    assert "parsed:validation" in text and "4 of 40 train ids" in text
    assert "the test split is not used" in text


@pytest.mark.parametrize(
    "fraction, distractors, error",
    [
        (0.01, 0.25, r"holds out 0 and leaves 40; at least 1 must be held out and 2 must train"),
        (0.97, 0.0, r"holds out 39 and leaves 1"),
        (0.5, 0.99, r"distractors=0.99 leaves fewer than 2 train identities"),
    ],
)
def test_fractions_leaving_no_validation_or_too_few_train_ids_are_errors(
    fraction, distractors, error
):
    with pytest.raises(DatasetError, match=rf"parsed under /nowhere: data\.validation\..*{error}"):
        ValidationHoldout(random_set(6), fraction, distractors, 0)


def test_held_out_ids_seen_by_one_camera_only_give_no_query_an_error():
    train = [ImageRecord(f"t/{p}_{c}.jpg", p, c) for p in range(10) for c in (0, 1)]
    train += [ImageRecord(f"t/{p}_0.jpg", p, 0) for p in range(10, 12)]  # one camera each
    test = [ImageRecord("q.jpg", 99, 0)]
    source = Parsed(train, test, test)
    # the first draw of seed s holds out one of 12 ids: find a seed picking 10 or 11
    seed = next(s for s in range(100) if np.random.default_rng(s).choice(12, 1)[0] >= 10)
    with pytest.raises(DatasetError, match="none of the 1 held-out identities has records in two"):
        ValidationHoldout(source, 1 / 12, 0.0, seed)


def test_off_by_default_and_the_config_refuses_a_fraction_of_one():
    from hpc_reid.config import ConfigError

    base = load_config(REPO / "configs/synthetic/bot.yaml")
    assert base.data.validation.fraction == 0
    with pytest.raises(ConfigError, match=r"data\.validation\.fraction"):
        load_config(REPO / "configs/synthetic/bot.yaml", ["data.validation.fraction=1"])


SMALL = SynthSpec(ids=16, cams=3, images_per_id=5, distractors=4, junk=2, seed=3)


def test_dataset_from_config_holds_out_the_same_records_from_a_folder_and_its_pack(tmp_path):
    folder = tmp_path / "market_synth"
    generate(folder, SMALL)
    sets = ["data.dataset=market1501", "data.validation.fraction=0.25", "data.validation.seed=1"]
    config = load_config(REPO / "configs/synthetic/bot.yaml", [*sets, f"data.root={folder}"])
    held = dataset_from_config(config.data, announce=lambda _: None)
    config.data.validation.fraction = 0.0
    plain = dataset_from_config(config.data, announce=lambda _: None)
    assert isinstance(held, ValidationHoldout) and held.num_train_pids == 6
    check_holdout(plain, 0.25, 0.25, 1)
    pack = tmp_path / "market.h5"
    pack_dataset(plain, pack)
    packed_config = load_config(REPO / "configs/synthetic/bot.yaml", [*sets, f"data.root={pack}"])
    from_pack = dataset_from_config(packed_config.data, announce=lambda _: None)

    def fields(records):
        return [(Path(r.path).name, r.pid, r.camid, r.frame) for r in records]

    for split in ("train", "query", "gallery"):
        assert fields(getattr(from_pack, split)) == fields(getattr(held, split)), split
