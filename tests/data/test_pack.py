"""HDF5 packs: a pack round-trips the parser's records and the image bytes, the loader gives the
same tensors from a pack as from the folder (in worker processes too), shards, corrupt images,
atomic writes, checksum verification and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpc_reid.cli import main
from hpc_reid.config import DataConfig, LoaderConfig
from hpc_reid.data import pack as packing
from hpc_reid.data.build import dataset_from_config
from hpc_reid.data.datasets import DatasetError, ImageRecord, ReidDataset, build_dataset
from hpc_reid.data.datasets.market1501 import Market1501
from hpc_reid.data.loaders import CorruptImageError, build_test_loader, build_train_loader
from hpc_reid.data.pack import pack_dataset
from hpc_reid.data.packed import (
    PackedDataset,
    PackError,
    pack_files,
    parse_pack_path,
    read_image_bytes,
    verify_pack,
)
from hpc_reid.data.samplers import IdentitySampler
from hpc_reid.data.synthetic import SynthSpec, generate

SMALL = SynthSpec(ids=8, cams=3, images_per_id=5, distractors=6, junk=4, seed=3)
SPLITS = ("train", "query", "gallery")
H, W = 32, 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "market_synth"
    generate(out, SMALL)
    return out


@pytest.fixture(scope="module")
def parsed(folder) -> Market1501:
    return Market1501(folder)


@pytest.fixture(scope="module")
def packed(parsed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "market.h5"
    summary = pack_dataset(parsed, out)
    assert summary.files == [out] and summary.skipped == []
    return out


def fields(records) -> list[tuple]:
    return [(r.pid, r.camid, r.frame) for r in records]


def rel(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def broken_copy(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the set with one gallery JPEG (late in pack order) truncated to half its bytes."""
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    bad = sorted((copy / "bounding_box_test").glob("0*.jpg"))[-1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return copy, bad


def loader_config(workers: int = 0) -> LoaderConfig:
    return LoaderConfig(num_workers=workers, prefetch=2, pin_memory=False, test_batch_size=7)


def test_pack_round_trips_the_parsers_records_in_order_and_the_image_bytes(parsed, packed):
    dataset = build_dataset("market1501", packed)
    assert isinstance(dataset, PackedDataset) and dataset.name == "market1501"
    index = 0  # one file: rows in order, train then query then gallery
    for split in SPLITS:
        ours, theirs = getattr(dataset, split), getattr(parsed, split)
        assert fields(ours) == fields(theirs)
        for mine, source in zip(ours, theirs, strict=True):
            assert mine.path == f"{packed.resolve()}::{index}/{rel(source.path)}"
            assert parse_pack_path(mine.path) == (str(packed.resolve()), index)
            assert read_image_bytes(mine.path) == Path(source.path).read_bytes()
            index += 1
    assert dataset.skipped == parsed.skipped == {"junk images": SMALL.junk}
    assert dataset.statistics().splitlines()[1:] == parsed.statistics().splitlines()[1:]
    with h5py.File(packed) as f:
        assert f["images"].dtype == h5py.vlen_dtype(np.uint8)
        assert f.attrs["dataset"] == "market1501" and f.attrs["checksum"] == "crc32"
        assert list(f.attrs["split_names"]) == list(SPLITS)


def test_frames_of_none_round_trip_and_any_pack_opens_as_pack(parsed, tmp_path):
    class NoFrames(ReidDataset):
        name = "no_frames"

        def __init__(self):
            self.root = Path(parsed.root)
            strip = [ImageRecord(r.path, r.pid, r.camid, None) for r in parsed.train]
            self._finish(strip, parsed.query[:3], parsed.gallery[:5])

    source = NoFrames()
    pack_dataset(source, tmp_path / "nf.h5")
    dataset = build_dataset("pack", tmp_path / "nf.h5")
    assert dataset.name == "no_frames"
    assert [fields(getattr(dataset, s)) for s in SPLITS] == [
        fields(getattr(source, s)) for s in SPLITS
    ]
    assert all(r.frame is None for r in dataset.train)


def test_torch_loader_gives_identical_tensors_from_the_pack_and_the_folder(parsed, packed):
    dataset = build_dataset("market1501", packed)

    def train_batches(records):
        sampler = IdentitySampler([r.pid for r in records], [r.camid for r in records], 2, 2)
        return list(build_train_loader(records, sampler, loader_config(), H, W, seed=7))

    from_folder, from_pack = train_batches(parsed.train), train_batches(dataset.train)
    assert len(from_folder) == len(from_pack) > 0
    for a, b in zip(from_folder, from_pack, strict=True):
        assert a["indices"].tolist() == b["indices"].tolist()
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["pids"], b["pids"])
    folder_test = list(build_test_loader(parsed.gallery, loader_config(), H, W))
    pack_test = list(build_test_loader(dataset.gallery, loader_config(), H, W))
    for a, b in zip(folder_test, pack_test, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["camids"], b["camids"])


def test_a_pack_is_read_from_two_dataloader_workers(parsed, packed):
    dataset = build_dataset("market1501", packed)
    read_image_bytes(dataset.query[0].path)  # the parent holds an open handle when workers fork
    records = dataset.query + dataset.gallery
    two = list(build_test_loader(records, loader_config(workers=2), H, W))
    reference = list(build_test_loader(parsed.query + parsed.gallery, loader_config(), H, W))
    assert len(two) == len(reference) > 2
    for a, b in zip(two, reference, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["pids"], b["pids"])


def test_shards_are_self_describing_and_reassemble_the_set_in_order(parsed, packed, tmp_path):
    out = tmp_path / "market.h5"
    summary = pack_dataset(parsed, out, shards=3)
    names = [f"market-{k:05d}-of-00003.h5" for k in range(3)]
    assert [f.name for f in summary.files] == names and not out.exists()
    single = build_dataset("market1501", packed)
    sizes = []
    for k, name in enumerate(names):
        with h5py.File(tmp_path / name) as f:
            assert (f.attrs["dataset"], f.attrs["shard"], f.attrs["num_shards"]) == (
                "market1501",
                k,
                3,
            )
            assert f.attrs["statistics"] == h5py.File(packed)["/"].attrs["statistics"]
            assert set(f["splits"][:]) == {0, 1, 2}  # round-robin: every shard has every split
            sizes.append(len(f["images"]))
    assert sum(sizes) == summary.images and max(sizes) - min(sizes) <= 1
    for root in (out, tmp_path / names[1], tmp_path / "market-*-of-00003.h5"):
        dataset = build_dataset("market1501", root)
        assert [f.name for f in dataset.files] == names
        for split in SPLITS:
            ours, theirs = getattr(dataset, split), getattr(single, split)
            assert fields(ours) == fields(theirs)
            assert [read_image_bytes(r.path) for r in ours] == [
                read_image_bytes(r.path) for r in theirs
            ]
    (tmp_path / names[2]).unlink()
    with pytest.raises(PackError, match=r"shards \[0, 1\] found, 3 expected"):
        pack_files(out)


def test_a_corrupt_image_stops_the_pack_naming_it_and_leaves_no_file(folder, tmp_path):
    copy, bad = broken_copy(folder, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(PackError, match=rf"{bad.name} is corrupt .*truncated"):
        pack_dataset(Market1501(copy), out_dir / "market.h5", shards=2)
    assert list(out_dir.iterdir()) == []


def test_skip_corrupt_packs_the_rest_and_reports_each_skipped_file(folder, tmp_path, capsys):
    copy, bad = broken_copy(folder, tmp_path)
    parsed = Market1501(copy)
    summary = pack_dataset(parsed, tmp_path / "market.h5", skip_corrupt=True)
    assert [(Path(p).name, "truncated" in why) for p, why in summary.skipped] == [(bad.name, True)]
    assert bad.name in capsys.readouterr().err
    dataset = build_dataset("market1501", tmp_path / "market.h5")
    assert fields(dataset.gallery) == fields([r for r in parsed.gallery if r.path != str(bad)])
    assert fields(dataset.train) == fields(parsed.train)
    assert dataset.skipped_corrupt == [f"bounding_box_test/{bad.name}: {summary.skipped[0][1]}"]
    assert "skipped as corrupt when packed: 1 images" in dataset.statistics()


def test_an_interrupted_pack_leaves_neither_the_final_nor_a_temporary_file(
    parsed, tmp_path, monkeypatch
):
    decode = packing._decode_error
    calls = 0

    def fail_midway(data: bytes):
        nonlocal calls
        calls += 1
        if calls == 30:
            raise KeyboardInterrupt
        return decode(data)

    monkeypatch.setattr(packing, "_decode_error", fail_midway)
    for shards in (1, 2):
        calls = 0
        with pytest.raises(KeyboardInterrupt):
            pack_dataset(parsed, tmp_path / "market.h5", shards=shards)
        assert list(tmp_path.iterdir()) == []


def test_an_existing_pack_is_replaced_only_with_overwrite(parsed, packed, tmp_path):
    out = tmp_path / "market.h5"
    shutil.copy(packed, out)
    with pytest.raises(PackError, match="exists"):
        pack_dataset(parsed, out)
    pack_dataset(parsed, out, overwrite=True)
    assert (
        build_dataset("pack", out).attrs["fingerprint"]
        == build_dataset("pack", packed).attrs["fingerprint"]
    )


def test_verify_names_the_image_with_a_flipped_byte_and_the_loader_refuses_it(
    packed, tmp_path, capsys
):
    out = tmp_path / "market.h5"
    shutil.copy(packed, out)
    assert verify_pack(out) == (47, [])
    assert main(["data", "verify", str(out)]) == 0
    dataset = build_dataset("market1501", out)
    index = 25
    with h5py.File(out, "r+") as f:
        data = f["images"][index]
        data[len(data) // 2] ^= 0x01
        f["images"][index] = data
        relpath = f["relpaths"].asstr()[index]
    checked, bad = verify_pack(out)
    assert checked == 47 and [(b.index, b.relpath) for b in bad] == [(index, relpath)]
    capsys.readouterr()
    assert main(["data", "verify", str(out)]) == 1
    assert f"::{index} ({relpath})" in capsys.readouterr().out
    record = next(r for s in SPLITS for r in getattr(dataset, s) if r.path.endswith(relpath))
    records = [record]
    with pytest.raises(CorruptImageError, match=rf"{relpath}.*crc32 checksum"):
        list(build_test_loader(records, loader_config(), H, W))


def test_a_pack_opens_only_as_the_set_and_options_it_holds(packed):
    dataset = dataset_from_config(DataConfig(dataset="market1501", root=str(packed)), print)
    assert isinstance(dataset, PackedDataset)
    with pytest.raises(DatasetError, match="pack of the data set 'market1501', not 'dukemtmcreid'"):
        build_dataset("dukemtmcreid", packed)
    with pytest.raises(DatasetError, match="options"):
        build_dataset("market1501", packed, variant="detected")
    with pytest.raises(PackError, match="not found"):
        build_dataset("market1501", packed.with_name("missing.h5"))


def test_cli_packs_the_synthetic_set_from_a_config_and_prints_its_info(tmp_path, capsys):
    config = [
        "--config",
        "configs/synthetic/bot.yaml",
        *("--set", f"data.synthetic.cache_dir={tmp_path / 'cache'}"),
        *("--set", "data.synthetic.ids=8", "--set", "data.synthetic.cams=3"),
        *("--set", "data.synthetic.images_per_id=5", "--set", "data.synthetic.distractors=6"),
        *("--set", "data.synthetic.junk=4", "--set", "data.synthetic.seed=3"),
    ]
    out = tmp_path / "synth.h5"
    assert main(["data", "pack", *config, "--out", str(out), "--shards", "2"]) == 0
    assert "packed 47 images" in capsys.readouterr().out
    assert main(["data", "info", str(out)]) == 0
    info = capsys.readouterr().out
    for line in (
        "data set: market1501",
        "protocol: hpc_reid.data.datasets.market1501.Market1501: Market-1501",
        "format version: 1 (written by hpc-reid ",
        "checksum: crc32",
        "files: 2 shard(s)",
        "  train    |      4 |        22 |         3",
        "  gallery  |      5 |        17 |         3",
        "skipped by protocol: 4 junk images",
    ):
        assert line in info
    assert main(["data", "stats", "--dataset", "market1501", "--root", str(out)]) == 0
    assert "query    |      4 |         8 |         3" in capsys.readouterr().out
    assert main(["data", "info", str(tmp_path / "nothing.h5")]) == 2
    assert "not found" in capsys.readouterr().err
