"""VeRi-776 and VehicleID parsers against miniature release layouts written here, the VehicleID
gallery-draw protocol's properties, errors, and the vehicle configs.

Every expectation is built from what the test wrote (names, list lines), never with the parsers'
code; images are empty files (parsing never opens them).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from hpc_reid.config import ConfigError, load_config
from hpc_reid.data.build import check_options, dataset_from_config
from hpc_reid.data.datasets import DatasetError, available_datasets, build_dataset

REPO = Path(__file__).resolve().parents[2]


def as_tuples(records) -> list[tuple[str, int, int, int | None]]:
    return [(r.path, r.pid, r.camid, r.frame) for r in records]


def relabelled(rows: list[tuple]) -> list[tuple]:
    label = {pid: i for i, pid in enumerate(sorted({r[1] for r in rows}))}
    return [(r[0], label[r[1]], *r[2:]) for r in rows]


def test_both_vehicle_sets_are_registered():
    assert {"veri776", "vehicleid"} <= set(available_datasets())


# --- VeRi-776 ---------------------------------------------------------------------------------

VERI_FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}


def make_veri(root: Path, seed: int) -> dict[str, list[tuple[str, int, int, int]]]:
    """``root/image_{train,query,test}/VVVV_cCCC_FFFFFFFF_N.jpg`` with random vehicles, cameras
    1..20 and frame numbers; returns {split: [(path, vid, 0-based camera, frame)]} sorted by name
    (the parser's record order)."""
    rng = np.random.default_rng(seed)
    expected: dict[str, list[tuple[str, int, int, int]]] = {}
    vids = {"train": rng.choice(np.arange(1, 400), 6, replace=False)}
    vids["query"] = vids["gallery"] = rng.choice(np.arange(400, 777), 4, replace=False)
    for split, folder in VERI_FOLDERS.items():
        (root / folder).mkdir(parents=True)
        rows = []
        for vid in vids[split]:
            for index in range(int(rng.integers(1, 4))):
                cam = int(rng.integers(1, 21))
                frame = int(rng.integers(0, 10**8))
                name = f"{vid:04d}_c{cam:03d}_{frame:08d}_{index}.jpg"
                (root / folder / name).touch()
                rows.append((str(root / folder / name), int(vid), cam - 1, frame))
        expected[split] = sorted(rows)
    (root / "image_train" / "Thumbs.db").touch()  # not an image: ignored
    (root / "name_query.txt").write_text("")  # the release's other files: ignored
    return expected


@pytest.mark.parametrize("seed", [0, 1])
def test_veri_records_carry_the_names_vehicle_camera_and_frame(tmp_path, seed):
    expected = make_veri(tmp_path / "VeRi", seed)
    for root in (tmp_path, tmp_path / "VeRi"):
        dataset = build_dataset("veri776", root)
        assert dataset.root == tmp_path / "VeRi"
        assert as_tuples(dataset.train) == relabelled(expected["train"])
        assert as_tuples(dataset.query) == expected["query"]
        assert as_tuples(dataset.gallery) == expected["gallery"]
        assert dataset.skipped == {}


def test_veri_frame_keeps_all_eight_digits_and_camera_is_zero_based(tmp_path):
    for folder in VERI_FOLDERS.values():
        (tmp_path / folder).mkdir()
    for name in ("0001_c001_00016450_0.jpg", "0776_c020_00000007_1.jpg"):
        for folder in VERI_FOLDERS.values():
            (tmp_path / folder / name).touch()
    dataset = build_dataset("veri776", tmp_path)
    assert [(r.pid, r.camid, r.frame) for r in dataset.query] == [(1, 0, 16450), (776, 19, 7)]
    assert dataset.num_train_cams == 2


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("0001_c021_00016450_0.jpg", "camera 21"),
        ("0001_c000_00016450_0.jpg", "camera 0"),
        ("0001_c001_0.jpg", "does not match the expected pattern"),
        ("0001_001_00016450_0.jpg", "does not match the expected pattern"),
    ],
)
def test_veri_bad_file_name_is_named(tmp_path, name, message):
    make_veri(tmp_path, 0)
    (tmp_path / "image_query" / name).touch()
    with pytest.raises(DatasetError, match=message) as info:
        build_dataset("veri776", tmp_path)
    assert name in str(info.value)


@pytest.mark.parametrize("folder", list(VERI_FOLDERS.values()))
def test_veri_missing_folder_names_it_and_the_layout(tmp_path, folder):
    make_veri(tmp_path, 0)
    for path in (tmp_path / folder).iterdir():
        path.unlink()
    (tmp_path / folder).rmdir()
    with pytest.raises(DatasetError) as info:
        build_dataset("veri776", tmp_path)
    assert str(tmp_path / folder) in str(info.value) and "image_train/" in str(info.value)


def test_veri_takes_no_options():
    with pytest.raises(ConfigError, match="veri776 takes no options"):
        check_options("veri776", {"split_id": 0})


# --- VehicleID --------------------------------------------------------------------------------

TEST_SIZES = (800, 1600, 2400)


def make_vehicleid(root: Path, seed: int, vids_per_list: int = 6) -> dict[str, list[tuple]]:
    """``root/image/NAME.jpg`` and ``root/train_test_split/{train_list,test_list_*}.txt``: train
    vehicles, then three test lists over other vehicles (here each larger list extends the
    smaller), lines shuffled, every fifth vehicle id with a single image. Returns {list file:
    [(name, vid)] in line order}."""
    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True)
    (root / "train_test_split").mkdir()
    next_name = iter(rng.permutation(10**6)[:5000])

    def images_of(vids) -> list[tuple[str, int]]:
        lines = []
        for vid in vids:
            count = 1 if vid % 5 == 0 else int(rng.integers(2, 7))  # every fifth: one image
            lines += [(f"{next(next_name):07d}", int(vid)) for _ in range(count)]
        return lines

    all_vids = rng.choice(np.arange(1, 30_000), 4 * vids_per_list, replace=False)
    lists = {"train_list.txt": images_of(all_vids[:vids_per_list])}
    test_lines: list[tuple[str, int]] = []
    for k, size in enumerate(TEST_SIZES, start=1):
        test_lines = test_lines + images_of(all_vids[k * vids_per_list : (k + 1) * vids_per_list])
        lists[f"test_list_{size}.txt"] = test_lines
    for list_name, lines in lists.items():
        lines[:] = [lines[i] for i in rng.permutation(len(lines))]
        text = "".join(f"{name} {vid}\n" for name, vid in lines)
        (root / "train_test_split" / list_name).write_text(text)
        for name, _ in lines:
            (root / "image" / f"{name}.jpg").touch()
    return lists


def path_of(root: Path, name: str) -> str:
    return str(root / "image" / f"{name}.jpg")


@pytest.mark.parametrize("seed", [0, 1])
def test_vehicleid_train_records_are_the_train_list_in_order(tmp_path, seed):
    lists = make_vehicleid(tmp_path / "VehicleID_V1.0", seed)
    root = tmp_path / "VehicleID_V1.0"
    for given in (tmp_path, root):
        dataset = build_dataset("vehicleid", given)
        assert dataset.root == root
        expected = [(path_of(root, n), vid, 0, None) for n, vid in lists["train_list.txt"]]
        assert as_tuples(dataset.train) == relabelled(expected)
        assert dataset.skipped == {}


@pytest.mark.parametrize("test_size", TEST_SIZES)
def test_vehicleid_query_and_gallery_split_exactly_the_chosen_test_list(tmp_path, test_size):
    lists = make_vehicleid(tmp_path, 0)
    lines = lists[f"test_list_{test_size}.txt"]
    dataset = build_dataset("vehicleid", tmp_path, test_size=test_size)
    query, gallery = as_tuples(dataset.query), as_tuples(dataset.gallery)
    # list order kept within each split, paths and vehicle ids as written, no frames
    written = [(path_of(tmp_path, n), vid) for n, vid in lines]
    assert sorted([q[:2] for q in query] + [g[:2] for g in gallery]) == sorted(written)
    position = {w: i for i, w in enumerate(written)}
    assert [position[q[:2]] for q in query] == sorted(position[q[:2]] for q in query)
    assert [position[g[:2]] for g in gallery] == sorted(position[g[:2]] for g in gallery)
    assert {q[3] for q in query} == {g[3] for g in gallery} == {None}


@pytest.mark.parametrize("split_id", range(4))
def test_vehicleid_one_gallery_image_per_test_vehicle_and_the_rest_queries(tmp_path, split_id):
    lists = make_vehicleid(tmp_path, 3)
    lines = lists["test_list_800.txt"]
    dataset = build_dataset("vehicleid", tmp_path, split_id=split_id)
    per_vid = Counter(vid for _, vid in lines)
    gallery_per_vid = Counter(g.pid for g in dataset.gallery)
    assert gallery_per_vid == Counter(dict.fromkeys(per_vid, 1))
    assert Counter(q.pid for q in dataset.query) == {v: n - 1 for v, n in per_vid.items() if n > 1}
    assert not {q.path for q in dataset.query} & {g.path for g in dataset.gallery}
    # single-image vehicles are gallery only (distractors for the other queries)
    singles = {vid for vid, n in per_vid.items() if n == 1}
    assert singles and singles <= {g.pid for g in dataset.gallery}
    assert not singles & {q.pid for q in dataset.query}


def test_vehicleid_cross_camera_removal_keeps_every_gallery_match(tmp_path):
    """The Market protocol drops gallery items of the query's pid and camera: with queries camid
    0 and gallery camid 1 every query keeps exactly its vehicle's one gallery image."""
    make_vehicleid(tmp_path, 4)
    dataset = build_dataset("vehicleid", tmp_path, split_id=1)
    q_pid = np.array([r.pid for r in dataset.query])[:, None]
    q_cam = np.array([r.camid for r in dataset.query])[:, None]
    g_pid = np.array([r.pid for r in dataset.gallery])[None, :]
    g_cam = np.array([r.camid for r in dataset.gallery])[None, :]
    kept = ~((q_pid == g_pid) & (q_cam == g_cam))
    matches = ((q_pid == g_pid) & kept).sum(axis=1)
    assert kept.all() and (matches == 1).all()
    assert {r.camid for r in dataset.query} == {0} and {r.camid for r in dataset.gallery} == {1}


def gallery_paths(root: Path, **options) -> frozenset[str]:
    return frozenset(r.path for r in build_dataset("vehicleid", root, **options).gallery)


def test_vehicleid_draw_is_deterministic_and_differs_across_the_ten_draws(tmp_path):
    make_vehicleid(tmp_path, 5, vids_per_list=12)
    draws = [gallery_paths(tmp_path, split_id=d) for d in range(10)]
    assert draws == [gallery_paths(tmp_path, split_id=d) for d in range(10)]
    assert len(set(draws)) == 10
    assert gallery_paths(tmp_path, split_id=0, seed=1) != draws[0]
    assert gallery_paths(tmp_path, split_id=0, seed=0) == draws[0]


def test_vehicleid_draw_ignores_the_list_line_order(tmp_path):
    lists = make_vehicleid(tmp_path / "a", 6)
    other = tmp_path / "b"
    (other / "train_test_split").mkdir(parents=True)
    (other / "image").symlink_to(tmp_path / "a" / "image")
    rng = np.random.default_rng(1)
    for list_name, lines in lists.items():
        text = "".join(f"{lines[i][0]} {lines[i][1]}\n" for i in rng.permutation(len(lines)))
        (other / "train_test_split" / list_name).write_text(text)
    for split_id in range(3):
        names_a = {Path(p).name for p in gallery_paths(tmp_path / "a", split_id=split_id)}
        names_b = {Path(p).name for p in gallery_paths(other, split_id=split_id)}
        assert names_a == names_b


def test_vehicleid_draw_uses_the_documented_generator(tmp_path):
    """default_rng([seed, split_id]); per vehicle in increasing id order, integers(0, n) picks
    among its n images sorted by name: written here as a plain loop."""
    lists = make_vehicleid(tmp_path, 7)
    per_vid: dict[int, list[str]] = defaultdict(list)
    for name, vid in lists["test_list_1600.txt"]:
        per_vid[vid].append(name)
    rng = np.random.default_rng([3, 2])
    expected = set()
    for vid in sorted(per_vid):
        names = sorted(per_vid[vid])
        expected.add(path_of(tmp_path, names[int(rng.integers(0, len(names)))]))
    assert gallery_paths(tmp_path, test_size=1600, split_id=2, seed=3) == expected


def test_vehicleid_gallery_image_is_drawn_uniformly(tmp_path):
    """Over 240 draws each of a 4-image vehicle's images is its gallery image about 60 times
    (binomial sd 6.7; the bounds are 4.5 sd)."""
    image, lists = tmp_path / "image", tmp_path / "train_test_split"
    image.mkdir()
    lists.mkdir()
    for name in ("t1", "t2", "a", "b", "c", "d"):
        (image / f"{name}.jpg").touch()
    (lists / "train_list.txt").write_text("t1 1\nt2 1\n")
    (lists / "test_list_800.txt").write_text("a 2\nb 2\nc 2\nd 2\n")
    picks = Counter()
    for split_id in range(240):
        (gallery,) = build_dataset("vehicleid", tmp_path, split_id=split_id).gallery
        picks[Path(gallery.path).stem] += 1
    assert set(picks) == {"a", "b", "c", "d"}
    assert all(30 <= n <= 90 for n in picks.values()), picks


def test_vehicleid_repeated_line_is_read_once_and_counted(tmp_path):
    lists = make_vehicleid(tmp_path, 8)
    name, vid = lists["test_list_800.txt"][0]
    with open(tmp_path / "train_test_split" / "test_list_800.txt", "a") as f:
        f.write(f"{name} {vid}\n\n")
    dataset = build_dataset("vehicleid", tmp_path)
    assert dataset.skipped == {"repeated list lines": 1}
    assert len(dataset.query) + len(dataset.gallery) == len(lists["test_list_800.txt"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"test_size": 1000}, r"test_size=1000 is not one of \(800, 1600, 2400\)"),
        ({"test_size": "800"}, r"test_size='800' is not one of"),
        ({"test_size": True}, r"test_size=True is not one of"),
        ({"split_id": -1}, "split_id=-1 is not a non-negative integer"),
        ({"split_id": 1.5}, "split_id=1.5 is not a non-negative integer"),
        ({"seed": -2}, "seed=-2 is not a non-negative integer"),
    ],
)
def test_vehicleid_bad_option_value_is_named(tmp_path, options, message):
    make_vehicleid(tmp_path, 0)
    with pytest.raises(DatasetError, match=message):
        build_dataset("vehicleid", tmp_path, **options)


def test_vehicleid_unknown_option_is_named_with_a_suggestion():
    check_options("vehicleid", {"test_size": 800, "split_id": 0, "seed": 0})
    with pytest.raises(ConfigError, match=r"data.options.test_sizes.*'test_size'"):
        check_options("vehicleid", {"test_sizes": 800})


@pytest.mark.parametrize(
    ("list_name", "text", "message"),
    [
        ("test_list_800.txt", "0000001\n", r"line 1: '0000001' is not 'NAME VID'"),
        ("test_list_800.txt", "0000001 x\n", r"line 1: '0000001 x' is not 'NAME VID'"),
        ("train_list.txt", "9999999 1\n", r"line 1: image .*9999999\.jpg does not exist"),
    ],
)
def test_vehicleid_malformed_list_line_is_named(tmp_path, list_name, text, message):
    make_vehicleid(tmp_path, 0)
    (tmp_path / "train_test_split" / list_name).write_text(text)
    with pytest.raises(DatasetError, match=message) as info:
        build_dataset("vehicleid", tmp_path)
    assert list_name in str(info.value)


def test_vehicleid_image_with_two_vehicle_ids_is_an_error(tmp_path):
    lists = make_vehicleid(tmp_path, 0)
    name, vid = lists["test_list_800.txt"][0]
    with open(tmp_path / "train_test_split" / "test_list_800.txt", "a") as f:
        f.write(f"{name} {vid + 1}\n")
    with pytest.raises(DatasetError, match=f"image {name} is listed as vehicle {vid + 1}"):
        build_dataset("vehicleid", tmp_path)


def test_vehicleid_vehicle_in_train_and_test_is_an_error(tmp_path):
    lists = make_vehicleid(tmp_path, 0)
    train_name, _ = lists["train_list.txt"][0]
    _, test_vid = lists["test_list_800.txt"][0]
    with open(tmp_path / "train_test_split" / "train_list.txt", "a") as f:
        f.write(f"{train_name}x {test_vid}\n")
    (tmp_path / "image" / f"{train_name}x.jpg").touch()
    with pytest.raises(DatasetError, match=rf"vehicle\(s\) \[{test_vid}\] .* both"):
        build_dataset("vehicleid", tmp_path)


@pytest.mark.parametrize("missing", ["image", "train_test_split/test_list_2400.txt"])
def test_vehicleid_missing_folder_or_list_names_it_and_the_layout(tmp_path, missing):
    make_vehicleid(tmp_path, 0)
    target = tmp_path / missing
    if target.is_dir():
        for path in target.iterdir():
            path.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset("vehicleid", tmp_path, test_size=2400)
    assert str(target) in str(info.value) and "train_test_split/train_list.txt" in str(info.value)


# --- Configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "dataset"),
    [("veri/bot_r50.yaml", "veri776"), ("vehicleid/bot_r50.yaml", "vehicleid")],
)
def test_vehicle_config_validates_at_256x256_with_options_its_parser_takes(config, dataset):
    # load_config checks the keys and values, not the data folder; check_options is what a run
    # checks next, before parsing
    loaded = load_config(REPO / "configs" / config)
    assert loaded.data.dataset == dataset
    assert (loaded.data.height, loaded.data.width) == (256, 256)
    check_options(loaded.data.dataset, dict(loaded.data.options))


def test_vehicleid_config_parses_a_miniature_set_through_its_options(tmp_path):
    lists = make_vehicleid(tmp_path, 9)
    config = load_config(
        REPO / "configs/vehicleid/bot_r50.yaml",
        [f"data.root={tmp_path}", "data.options.split_id=3", "data.options.test_size=1600"],
    )
    dataset = dataset_from_config(config.data, announce=lambda _: None)
    assert len(dataset.gallery) == len({vid for _, vid in lists["test_list_1600.txt"]})
    assert frozenset(r.path for r in dataset.gallery) == gallery_paths(
        tmp_path, test_size=1600, split_id=3
    )
