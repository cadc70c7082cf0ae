"""HDF5 packs of video sets: a pack gives the folder's tracklets (pids, cameras, tracklet ids,
frames in order) with each frame's bytes equal to its file's, every frame stored once and a
tracklet's frames consecutive in one shard; shards, corrupt frames, options and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from hpc_reid.cli import main
from hpc_reid.data import pack as packing
from hpc_reid.data.datasets import DatasetError, build_dataset
from hpc_reid.data.pack import pack_dataset
from hpc_reid.data.packed import (
    TRACKLET_FORMAT_VERSION,
    PackError,
    image_file,
    parse_pack_path,
    read_image_bytes,
    verify_pack,
)
from tests.data.test_video_datasets import (
    Layout,
    make_ilidsvid,
    make_mars,
    make_prid,
    relabelled,
)

SPLITS = ("train", "query", "gallery")


@pytest.fixture(scope="module")
def mars(tmp_path_factory) -> Layout:
    return make_mars(tmp_path_factory.mktemp("video") / "mars", seed=5)


@pytest.fixture(scope="module")
def mars_pack(mars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video_pack") / "mars.h5"
    summary = pack_dataset(build_dataset("mars", mars.root), out)
    assert summary.files == [out] and summary.skipped == []
    return out


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pack_view(records) -> list[tuple]:
    """(frame relative paths, frame bytes, pid, camid, tid) of packed tracklets."""
    out = []
    for r in records:
        rel = tuple(str(f).split("::", 1)[1].split("/", 1)[1] for f in r.frames)
        out.append((rel, tuple(read_image_bytes(f) for f in r.frames), r.pid, r.camid, r.tid))
    return out


def folder_view(tracklets, root: Path) -> list[tuple]:
    """The same of tracklets as a test wrote them: (frames, pid, camid, tid)."""
    return [
        (
            tuple(Path(f).relative_to(root).as_posix() for f in frames),
            tuple(file_bytes(f) for f in frames),
            pid,
            camid,
            tid,
        )
        for frames, pid, camid, tid in tracklets
    ]


def test_a_mars_pack_holds_the_written_tracklets_with_each_frames_bytes(mars, mars_pack):
    dataset = build_dataset("mars", mars_pack)
    assert dataset.is_video and dataset.skipped == mars.skipped
    expected = {**mars.splits, "train": relabelled(mars.splits["train"])}
    for split in SPLITS:
        assert pack_view(getattr(dataset, split)) == folder_view(expected[split], mars.root)
    with h5py.File(mars_pack) as f:
        assert f.attrs["format_version"] == TRACKLET_FORMAT_VERSION
        assert f.attrs["records"] == "tracklets"
        # Every frame once: as many rows as the tracklets' frames, no relative path twice.
        frames = sum(len(t[0]) for split in SPLITS for t in mars.splits[split])
        assert len(f["images"]) == len(set(f["relpaths"].asstr()[:])) == frames
    assert verify_pack(mars_pack) == (frames, [])


def test_a_packed_frame_opens_as_the_same_pixels_as_its_file(mars, mars_pack):
    dataset = build_dataset("pack", mars_pack)
    packed, written = dataset.gallery[-1], mars.splits["gallery"][-1]
    for ours, theirs in zip(packed.frames, written[0], strict=True):
        with Image.open(image_file(ours)) as a, Image.open(theirs) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["ilidsvid", "prid2011_video"])
def test_ilidsvid_and_prid_packs_equal_their_folders_for_the_split_packed(name, tmp_path):
    if name == "ilidsvid":
        root, _, _ = make_ilidsvid(tmp_path / "set", seed=6)
    else:
        root, _, _ = make_prid(tmp_path / "set", seed=6)
    folder = build_dataset(name, root, split_id=7)
    pack_dataset(folder, tmp_path / "set.h5", options={"split_id": 7})
    packed = build_dataset(name, tmp_path / "set.h5", split_id=7)
    for split in SPLITS:
        written = [(r.frames, r.pid, r.camid, r.tid) for r in getattr(folder, split)]
        assert pack_view(getattr(packed, split)) == folder_view(written, folder.root)
    with pytest.raises(DatasetError, match=r"packs .* with options \{'split_id': 7\}"):
        build_dataset(name, tmp_path / "set.h5", split_id=2)


def test_frames_of_equal_byte_size_pack_and_read_back(tmp_path):
    # h5py reads n equal-length byte arrays as one n x L array: the writer must not.
    root, written, _ = make_ilidsvid(tmp_path / "set", seed=8)
    sizes = {len(file_bytes(f)) for frames in written.values() for f in frames}
    assert len(sizes) == 1  # random 8x4 PNGs do not compress: all the same size
    folder = build_dataset("ilidsvid", root)
    pack_dataset(folder, tmp_path / "set.h5")
    packed = build_dataset("ilidsvid", tmp_path / "set.h5")
    assert [read_image_bytes(f) for r in packed.query for f in r.frames] == [
        file_bytes(f) for r in folder.query for f in r.frames
    ]


def test_shards_hold_whole_tracklets_consecutively_and_reassemble_in_order(
    mars, mars_pack, tmp_path, monkeypatch
):
    monkeypatch.setattr(packing, "_BATCH", 5)  # writes flushed in the middle of tracklets
    summary = pack_dataset(build_dataset("mars", mars.root), tmp_path / "mars.h5", shards=3)
    assert len(summary.files) == 3
    single, sharded = build_dataset("mars", mars_pack), build_dataset("mars", tmp_path / "mars.h5")
    k = 0  # the tracklet's position in the whole set: round-robin sends it to shard k % 3
    for split in SPLITS:
        ours, theirs = getattr(sharded, split), getattr(single, split)
        assert pack_view(ours) == pack_view(theirs)
        for record in ours:
            where = [parse_pack_path(f) for f in record.frames]
            files, rows = {w[0] for w in where}, [w[1] for w in where]
            assert files == {str(summary.files[k % 3].resolve())}  # one shard ...
            assert rows == list(range(rows[0], rows[0] + len(rows)))  # ... consecutive rows
            k += 1
    rows = 0
    for file in summary.files:
        with h5py.File(file) as f:
            rows += len(f["images"])
            assert all(len(f[f"tracklets/{s}/start"]) > 0 for s in SPLITS)
    assert rows == summary.images == sum(r.num_frames for s in SPLITS for r in getattr(single, s))


def test_a_pack_of_a_pack_equals_it(mars_pack, tmp_path):
    source = build_dataset("pack", mars_pack)
    pack_dataset(source, tmp_path / "again.h5", shards=2)
    again = build_dataset("mars", tmp_path / "again.h5")
    for split in SPLITS:
        assert pack_view(getattr(again, split)) == pack_view(getattr(source, split))


def test_a_corrupt_frame_stops_the_pack_or_leaves_its_whole_tracklet_out(mars, tmp_path, capsys):
    copy = tmp_path / "mars"
    shutil.copytree(mars.root, copy)
    folder = build_dataset("mars", copy)
    victim = folder.gallery[1]
    bad = Path(victim.frames[-1])
    bad.write_bytes(bad.read_bytes()[:40])
    out_dir = tmp_path / "out"
    with pytest.raises(PackError, match=rf"{bad.name} is corrupt .*tracklet {victim.tid} of"):
        pack_dataset(folder, out_dir / "mars.h5", shards=2)
    assert list(out_dir.iterdir()) == []

    summary = pack_dataset(folder, out_dir / "mars.h5", skip_corrupt=True)
    assert [Path(p).name for p, _ in summary.skipped] == [bad.name]
    assert bad.name in capsys.readouterr().err
    packed = build_dataset("mars", out_dir / "mars.h5")
    kept = [r for r in folder.gallery if r.tid != victim.tid]
    assert [(r.pid, r.tid, r.num_frames) for r in packed.gallery] == [
        (r.pid, r.tid, r.num_frames) for r in kept
    ]
    train = [(r.frames, r.pid, r.camid, r.tid) for r in folder.train]
    assert pack_view(packed.train) == folder_view(train, copy)
    assert "skipped as corrupt when packed: 1 tracklets" in packed.statistics()


def test_cli_packs_a_video_set_and_info_counts_tracklets_and_frames(mars, tmp_path, capsys):
    out = tmp_path / "m.h5"
    args = ["--dataset", "mars", "--root", str(mars.root)]
    assert main(["data", "pack", *args, "--out", str(out)]) == 0
    frames = sum(len(t[0]) for s in SPLITS for t in mars.splits[s])
    assert f"packed {frames} images" in capsys.readouterr().out
    assert main(["data", "info", str(out)]) == 0
    info = capsys.readouterr().out
    gallery = mars.splits["gallery"]
    ids, cams = len({t[1] for t in gallery}), len({t[2] for t in gallery})
    row = f"gallery  | {ids:>6} | {len(gallery):>11} | {sum(len(t[0]) for t in gallery):>9}"
    assert f"format version: {TRACKLET_FORMAT_VERSION}" in info
    assert "files: 1 shard(s), " in info and f"on disk, {frames} frames" in info
    assert row + f" | {cams:>9}" in info
