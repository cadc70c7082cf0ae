"""`hpc-reid eval --checkpoint RUN --draws N`: one checkpoint on N gallery draws (VehicleID), each
draw's metrics equal to evaluating that draw alone, their mean and std as numpy computes them; a
set whose splits are train/test partitions is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hpc_reid.cli import main
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import train
from hpc_reid.evaluation.draws import summarise_draws
from tests.data.test_vehicle_datasets import make_vehicleid
from tests.engine.test_trainer import tiny_config
from tests.shared_data import require_shared_data

NO_PLOTS = "evaluation.plots=false"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained one step and its latest checkpoint, and a miniature VehicleID set with
    real (random) images."""
    tmp = tmp_path_factory.mktemp("draws")
    train(tiny_config(tmp, "logging.run_name=x", NO_PLOTS), max_steps=1)
    root = tmp / "VehicleID"
    make_vehicleid(root, seed=3, vids_per_list=8)
    rng = np.random.default_rng(0)
    for path in sorted((root / "image").iterdir()):
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG")
    return tmp, CheckpointManager(tmp / "runs/x").latest(), root


def vehicle_sets(root, split_id=0) -> list[str]:
    return [
        "data.dataset=vehicleid",
        f"data.root={root}",
        f"data.options={{test_size: 800, split_id: {split_id}, seed: 5}}",
    ]


def test_summary_is_numpy_mean_and_sample_std_of_each_shared_scalar():
    rng = np.random.default_rng(1)
    results = [
        {"rank-1": float(a), "mAP": float(b), "cmc": [0.1, 0.2], "final": True}
        for a, b in rng.random((5, 2))
    ]
    summary = summarise_draws(results)
    for key in ("rank-1", "mAP"):
        values = np.array([r[key] for r in results])
        assert summary[key] == pytest.approx(values.mean(), abs=1e-12)
        assert summary[f"std/{key}"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert "cmc" not in summary and "final" not in summary
    assert [d["split_id"] for d in summary["draws"]] == [0, 1, 2, 3, 4]


def test_each_draw_equals_evaluating_it_alone_and_the_summary_is_their_mean(run, tmp_path):
    tmp, checkpoint, root = run
    argv = ["eval", "--checkpoint", str(checkpoint), "--draws", "3", "--out", str(tmp_path / "d")]
    sets = [a for s in (*vehicle_sets(root), NO_PLOTS) for a in ("--set", s)]
    assert main([*argv, *sets]) == 0
    summary = json.loads((tmp_path / "d" / "results.json").read_text())
    alone = []
    for s in range(3):  # the reference: the training config rebuilt, this draw's split_id
        config = tiny_config(tmp, "logging.run_name=x", NO_PLOTS, *vehicle_sets(root, s))
        alone.append(evaluate_checkpoint(checkpoint, config, out_dir=tmp_path / f"alone{s}"))
        drawn = json.loads((tmp_path / "d" / f"draw_{s}" / "results.json").read_text())
        assert {k: drawn[k] for k in alone[s]} == pytest.approx(alone[s], abs=1e-9)
    assert len({round(r["mAP"], 9) for r in alone}) > 1  # the draws differ
    for key in ("rank-1", "rank-5", "mAP", "mINP"):
        values = np.array([r[key] for r in alone])
        assert summary[key] == pytest.approx(values.mean(), abs=1e-9)
        assert summary[f"std/{key}"] == pytest.approx(values.std(ddof=1), abs=1e-9)


def test_a_set_whose_splits_partition_train_and_test_is_refused(run, tmp_path, capsys):
    viper = require_shared_data("viper/images", directory=True).parent
    _, checkpoint, _ = run
    argv = ["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]
    sets = ["data.dataset=viper", f"data.root={viper}", "data.options={split_id: 0, seed: 0}"]
    assert main([*argv, "--draws", "2", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "'viper' trains on a different split" in err and "vehicleid" in err
    assert not (tmp_path / "results.json").exists()
    assert main([*argv, "--draws", "1"]) == 2
    assert "eval --draws 1: give at least 2 draws" in capsys.readouterr().err


def test_every_test_image_is_extracted_once_over_all_draws(run, tmp_path, monkeypatch):
    from hpc_reid.data.build import dataset_from_config
    from hpc_reid.engine import evaluate

    tmp, checkpoint, root = run
    extracted = []
    for name in ("shard_features", "shard_features_and_plain"):
        real = getattr(evaluate, name)

        def counting(model, records, config, device, real=real):
            extracted.extend(r.path for r in records)
            return real(model, records, config, device)

        monkeypatch.setattr(evaluate, name, counting)
    argv = ["eval", "--checkpoint", str(checkpoint), "--draws", "3", "--out", str(tmp_path)]
    assert main([*argv, *[a for s in (*vehicle_sets(root), NO_PLOTS) for a in ("--set", s)]]) == 0
    config = tiny_config(tmp, *vehicle_sets(root))
    test = dataset_from_config(config.data, lambda *_: None)
    images = {r.path for r in (*test.query, *test.gallery)}
    assert len(test.gallery) < len(images)  # draws split the same images otherwise
    assert sorted(extracted) == sorted(images)  # each once, in the first draw


@pytest.mark.slow
def test_two_ranks_draw_as_one_process(run, tmp_path):
    """Each rank extracts its shard of the images once, the rows gathered to every rank; each
    draw then takes its own shard's rows: the same metrics as one process."""
    from tests.engine.test_trainer import _torchrun

    _, checkpoint, root = run
    sets = [a for s in (*vehicle_sets(root), NO_PLOTS) for a in ("--set", s)]
    results = {}
    for n in (1, 2):
        argv = [
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--draws",
            "3",
            "--out",
            str(tmp_path / f"w{n}"),
        ]
        if n == 1:
            assert main([*argv, *sets]) == 0
        else:
            proc = _torchrun(2, [*argv, *sets], tmp_path)
            assert proc.returncode == 0, proc.stderr[-3000:]
        results[n] = json.loads((tmp_path / f"w{n}" / "results.json").read_text())
    draws = [d.pop("draws") for d in results.values()]
    assert results[2] == pytest.approx(results[1], abs=1e-6)
    for a, b in zip(*draws, strict=True):
        assert b == pytest.approx(a, abs=1e-6)
