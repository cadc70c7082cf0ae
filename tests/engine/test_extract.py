"""`hpc-reid extract` on a tiny checkpoint, then `hpc-reid eval --query-features`: the streamed
metrics equal the checkpoint evaluation's, and two gloo ranks write the same files as one."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from hpc_reid.cli import main
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import train
from tests.engine.test_trainer import _torchrun, tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    train(tiny_config(tmp, "logging.run_name=x"), max_steps=1)
    return CheckpointManager(tmp / "runs/x").latest()


def read(path):
    with h5py.File(path) as h:
        return {k: h[k][:] for k in ("features", "pids", "camids", "paths")}, dict(h.attrs)


def test_extracted_features_evaluate_as_the_checkpoint(checkpoint, tmp_path, capsys):
    assert main(["extract", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path)]) == 0
    query, attrs = read(tmp_path / "query.h5")
    gallery, _ = read(tmp_path / "gallery.h5")
    assert query["features"].dtype == np.float32 and query["features"].ndim == 2
    assert attrs["metric"] == "cosine" and attrs["model"] == "osnet_x0_25"
    assert len(gallery["pids"]) == len(gallery["paths"]) > len(query["pids"]) > 0
    assert not list(tmp_path.glob(".*"))  # no part or temporary file is left
    expected = evaluate_checkpoint(checkpoint, out_dir=tmp_path / "eval")
    argv = ["eval", "--query-features", str(tmp_path / "query.h5")]
    argv += ["--gallery-features", str(tmp_path / "gallery.h5"), "--gallery-chunk", "7"]
    assert main([*argv, "--out", str(tmp_path / "streamed")]) == 0
    got = json.loads((tmp_path / "streamed/results.json").read_text())
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_two_gloo_ranks_write_the_files_of_one(checkpoint, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["extract", "--checkpoint", str(checkpoint), "--out-dir", str(one)]) == 0
    args = ["extract", "--checkpoint", str(checkpoint), "--out-dir", str(two)]
    proc = _torchrun(2, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("query", "gallery"):
        a, _ = read(one / f"{split}.h5")
        b, _ = read(two / f"{split}.h5")
        for key in ("pids", "camids", "paths"):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-5)
