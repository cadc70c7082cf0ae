"""The synthetic set's transit frames (``SynthSpec(transit=True)``, ``data.synthetic.transit``):
off, the set of before; on, the same images and splits with frames from identities walking
around the camera ring."""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict

import numpy as np
import pytest

from hpc_reid.config import load_config
from hpc_reid.data.build import synth_spec
from hpc_reid.data.datasets import DatasetError
from hpc_reid.data.synthetic import SynthSpec, plan
from hpc_reid.data.synthetic.transit import (
    EDGE_FRAMES,
    PACE,
    SPAN,
    CameraNetwork,
    camera_network,
)
from hpc_reid.data.synthetic.writer import _TRANSIT, _rng
from tests.tiny import REPO

SMALL = {"ids": 20, "cams": 4, "images_per_id": 6, "distractors": 5, "junk": 2, "seed": 3}


def plan_hash(spec: SynthSpec) -> str:
    return hashlib.sha256(repr(plan(spec)).encode()).hexdigest()[:16]


def name_parts(relpath: str) -> tuple[str, int, int, int, int, int]:
    """(folder, pid, camera 1-based, sequence, frame, box) of a planned image."""
    folder, name = relpath.split("/")
    pid, camseq, frame, box = name[:-4].split("_")
    cam, seq = camseq[1:].split("s")
    return folder, int(pid), int(cam), int(seq), int(frame), int(box)


# Computed from the generator before transit existed: the cache keys (folder names, meta.json) and
# every planned name of a spec without transit must stay what they were.
BEFORE = [
    (SynthSpec(), "e3b4191fadec65e1", "99c5aa0e05bf7466"),
    (SynthSpec(**SMALL), "f372da7abce08bc4", "ade5682be25135a8"),
]


@pytest.mark.parametrize(("spec", "key", "names"), BEFORE, ids=["default", "small"])
def test_transit_off_keeps_the_cache_key_and_every_planned_image_of_before(spec, key, names):
    assert spec.key() == key and "transit" not in spec.to_dict()
    assert plan_hash(spec) == names


def test_config_key_reaches_the_generator_spec_with_its_own_cache_key():
    base = load_config(REPO / "configs/synthetic/bot.yaml")
    assert synth_spec(base.data) == SynthSpec()
    on = load_config(REPO / "configs/synthetic/bot.yaml", ["data.synthetic.transit=true"])
    spec = synth_spec(on.data)
    assert spec.transit and spec.to_dict()["transit"] is True
    assert spec.key() != SynthSpec().key()


def test_transit_is_a_boolean():
    with pytest.raises(DatasetError, match=r"SynthSpec.transit=1 must be true or false"):
        SynthSpec(transit=1)


def test_transit_changes_only_sequence_and_frame_of_each_name():
    plain, walked = plan(SynthSpec(**SMALL)), plan(SynthSpec(**SMALL, transit=True))
    assert len(plain) == len(walked)
    for a, b in zip(plain, walked, strict=True):
        assert a._replace(relpath="") == b._replace(relpath="")  # pid, camera, person, image
        fa, fb = name_parts(a.relpath), name_parts(b.relpath)
        assert (fa[:3], fa[5]) == (fb[:3], fb[5])  # folder, pid, camera, box
        assert fb[3] == 1  # one sequence per camera: frames on the camera's clock
        assert 0 <= fb[4] < 1_000_000  # Market names hold 6 digits


def test_each_identity_walks_the_camera_ring_with_travel_times_of_its_edges():
    """Ordered by the first frame in each camera, an identity's cameras follow the ring in one
    direction, and each walk between them takes the ring edges' mean times x a pace in PACE."""
    spec = SynthSpec(ids=60, cams=6, images_per_id=10, distractors=0, junk=0, seed=5, transit=True)
    edges = camera_network(_rng(spec.seed, _TRANSIT, 0), spec.cams)
    assert all(EDGE_FRAMES[0] <= e < EDGE_FRAMES[1] for e in edges.edge_frames)
    tracks: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for job in plan(spec):
        _, pid, cam, _, frame, _ = name_parts(job.relpath)
        tracks[pid][cam - 1].append(frame)
    directions = set()
    for pid, by_cam in tracks.items():
        visits = sorted(by_cam, key=lambda c: min(by_cam[c]))
        assert min(by_cam[visits[0]]) < SPAN

        # the walk's direction: one in which the visits go round the ring in order and every
        # walk took its edges' mean time x a pace in PACE (rounded to a frame)
        def walked(d: int, visits=visits, by_cam=by_cam) -> bool:
            position = [((c - visits[0]) * d) % spec.cams for c in visits]
            gaps = [
                (min(by_cam[b]) - max(by_cam[a]), edges.ring_frames(a, b, d))
                for a, b in itertools.pairwise(visits)
            ]
            in_order = all(p < q for p, q in itertools.pairwise(position))
            return in_order and all(PACE[0] * m - 1 <= g <= PACE[1] * m + 1 for g, m in gaps)

        fits = [d for d in (1, -1) if walked(d)]
        assert fits, f"identity {pid}: cameras {visits} in this order are no walk of the ring"
        directions.update(fits if len(fits) == 1 else ())
        # in a camera's view the frames keep the plan's spacing (5..39 frames apart)
        for frames in by_cam.values():
            steps = np.diff(sorted(frames))
            assert steps.size == 0 or (steps.min() >= 5 and steps.max() < 40)
    assert directions == {1, -1}  # both ways round


def test_ring_frames_sum_the_edges_passed_in_either_direction():
    ring = CameraNetwork((10, 20, 30, 40))  # edge c joins cameras c and c + 1 (mod 4)
    assert ring.ring_frames(0, 2, 1) == 10 + 20
    assert ring.ring_frames(2, 0, -1) == 20 + 10
    assert ring.ring_frames(1, 0, 1) == 20 + 30 + 40
    assert ring.ring_frames(0, 3, -1) == 40
    assert ring.ring_frames(3, 3, 1) == 0


def test_cli_data_synth_transit_writes_the_transit_spec_and_refuses_it_for_tracklets(
    tmp_path, capsys
):
    import json

    from hpc_reid.cli import main as cli_main

    out = tmp_path / "t"
    args = ["data", "synth", "--transit", "--out", str(out), "--ids", "8", "--cams", "3"]
    args += ["--images-per-id", "3", "--distractors", "1", "--junk", "1"]
    assert cli_main(args) == 0
    spec = json.loads((out / "meta.json").read_text())["spec"]
    expected = SynthSpec(ids=8, cams=3, images_per_id=3, distractors=1, junk=1, transit=True)
    assert spec == expected.to_dict() and spec["transit"] is True
    bad = ["data", "synth", "--transit", "--tracklets", "--out", str(tmp_path / "x")]
    assert cli_main(bad) == 2
    assert "--transit is for images" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
