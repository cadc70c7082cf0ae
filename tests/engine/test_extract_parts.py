"""`hpc-reid extract` of an AlignedReID checkpoint writes both retrieval parts and their layout;
the streamed evaluation of those files ranks as the checkpoint's own evaluation does, for the local
and the global+local distance."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from hpc_reid.cli import main
from hpc_reid.config import load_config
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import train
from hpc_reid.evaluation import RowLayout
from hpc_reid.evaluation.feature_files import evaluate_feature_files
from tests.engine.test_trainer import REPO, TINY, _torchrun

# 64x32 images give OSNet a 4-row map: 4 stripes
ALIGNED = ["model.local.stripes=4", "model.local.dim=8", "evaluation.plots=false"]


def aligned_config(tmp_path, *extra: str):
    return load_config(
        REPO / "configs/synthetic/alignedreid.yaml",
        [
            *TINY,
            *ALIGNED,
            f"data.synthetic.cache_dir={tmp_path / 'cache'}",
            f"logging.output_dir={tmp_path / 'runs'}",
            "logging.run_name=a",
            *extra,
        ],
    )


def test_extracted_parts_evaluate_as_the_checkpoint_does(tmp_path):
    train(aligned_config(tmp_path), max_steps=1)
    checkpoint = CheckpointManager(tmp_path / "runs/a").latest()
    out = tmp_path / "features"
    assert main(["extract", "--checkpoint", str(checkpoint), "--out-dir", str(out)]) == 0
    for split in ("query", "gallery"):
        with h5py.File(out / f"{split}.h5") as f:
            layout = RowLayout.from_json(f.attrs["layout"])
            assert f["features"].shape[1] == layout.width
            assert f.attrs["distance"] == "global"  # the config's, a hint for eval
            local = f["features"][:, layout.part("local").start :]
        assert layout.names == ("global", "local")
        assert layout.part("local").shape == (4, 8) and layout.part("local").distance == "dmli"
        assert np.all(local >= 0) and local.any()  # the stripes after their ReLU
    maps = {}
    for distance, weight in (("local", 1.0), ("global+local", 0.5)):
        weights = {"local": weight}
        streamed = evaluate_feature_files(
            out / "query.h5", out / "gallery.h5", None, 50, 7, 19, distance, weights
        )
        sets = [f"evaluation.distance={distance}", f"evaluation.distance_weights.local={weight}"]
        summary = evaluate_checkpoint(
            checkpoint, aligned_config(tmp_path, *sets), out_dir=tmp_path / distance
        )
        assert summary["mAP"] == pytest.approx(streamed.mAP, abs=1e-6)
        assert summary["rank-1"] == pytest.approx(streamed.cmc[0], abs=1e-6)
        maps[distance] = summary["mAP"]
    assert maps["local"] != maps["global+local"]  # each distance ranks differently


@pytest.mark.slow
def test_two_ranks_evaluate_global_plus_local_reranked_as_one_process(tmp_path):
    """The sharded path of a many-part distance end to end (each rank probes the layout, ranks
    its gallery shard with DMLI, finds the ranked-list candidates), re-ranked as well."""
    train(aligned_config(tmp_path), max_steps=1)
    checkpoint = CheckpointManager(tmp_path / "runs/a").latest()
    sets = ["evaluation.distance=global+local", "evaluation.distance_weights.local=0.5"]
    sets += ["evaluation.plots=true", "evaluation.rerank.enabled=true", "evaluation.rerank.k1=6"]
    sets += ["evaluation.rerank.k2=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    expected = evaluate_checkpoint(checkpoint, aligned_config(tmp_path, *sets), out_dir=one)
    assert "without_rerank/mAP" in expected
    args = ["eval", "--checkpoint", str(checkpoint), "--out", str(two)]
    proc = _torchrun(2, [*args, *(f"--set={s}" for s in sets)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert b.pop("cmc") == pytest.approx(a.pop("cmc"), abs=1e-6)
    assert b == pytest.approx(a, abs=1e-6)
    assert (two / "ranked.png").read_bytes() == (one / "ranked.png").read_bytes()
