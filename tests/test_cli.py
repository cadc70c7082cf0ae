"""`hpc-reid eval|extract --checkpoint CKPT --set KEY=VALUE` without `--config`: the checkpoint's
stored config with the overrides, validated as a config file is (an unknown key is refused)."""

from __future__ import annotations

import json

import h5py
import pytest
import torch

from hpc_reid.cli import main
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.engine.trainer import train
from hpc_reid.models import build_model
from tests.engine.test_trainer import tiny_config, weights

NO_PLOTS = "evaluation.plots=false"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained one step (flip_average off, cosine) and its latest checkpoint."""
    tmp = tmp_path_factory.mktemp("cli")
    train(tiny_config(tmp, "logging.run_name=x", NO_PLOTS), max_steps=1)
    return tmp, CheckpointManager(tmp / "runs/x").latest()


def results(folder) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_eval_set_without_config_evaluates_the_stored_config_with_the_override(run, tmp_path):
    tmp, checkpoint = run
    argv = ["eval", "--checkpoint", str(checkpoint)]
    assert main([*argv, "--set", "evaluation.flip_average=true", "--out", str(tmp_path / "f")]) == 0
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    flipped, plain = results(tmp_path / "f"), results(tmp_path / "plain")
    # the reference: the training config rebuilt from its YAML and --set list, flip averaging on
    config = tiny_config(tmp, "logging.run_name=x", NO_PLOTS, "evaluation.flip_average=true")
    expected = evaluate_checkpoint(checkpoint, config, out_dir=tmp_path / "reference")
    assert {k: flipped[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert flipped["cmc"] == pytest.approx(results(tmp_path / "reference")["cmc"], abs=1e-9)
    # flip-averaged features rank differently from the plain ones the stored config gives
    assert flipped["mAP"] != plain["mAP"]


def test_eval_set_without_config_refuses_an_unknown_key_naming_it(run, tmp_path, capsys):
    _, checkpoint = run
    argv = ["eval", "--checkpoint", str(checkpoint), "--set", "evaluation.flip_averag=true"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.flip_averag: unknown key" in err and "'evaluation.flip_average'" in err
    assert str(checkpoint) in err
    assert not (tmp_path / "results.json").exists()


def test_eval_set_without_config_refuses_an_invalid_value_naming_it(run, capsys):
    _, checkpoint = run
    argv = ["eval", "--checkpoint", str(checkpoint), "--set", "evaluation.metric=manhattan"]
    assert main(argv) == 2
    assert "evaluation.metric" in capsys.readouterr().err


def test_extract_set_without_config_writes_features_of_the_overridden_config(run, tmp_path):
    _, checkpoint = run
    argv = ["extract", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path)]
    assert main([*argv, "--set", "evaluation.metric=euclidean"]) == 0
    with h5py.File(tmp_path / "query.h5") as h:
        assert h.attrs["metric"] == "euclidean"  # the stored config says cosine


def test_eval_of_a_bn_checkpoint_with_the_pooled_retrieval_feature_ranks_differently(run, tmp_path):
    """model.retrieval_feature is a test-time choice: a checkpoint trained ranking with the BN
    feature loads (model_meta does not hold it) and ranks with the pooled feature on request."""
    tmp, checkpoint = run
    argv = ["eval", "--checkpoint", str(checkpoint)]
    assert (
        main([*argv, "--set", "model.retrieval_feature=global", "--out", str(tmp_path / "g")]) == 0
    )
    assert main([*argv, "--out", str(tmp_path / "bn")]) == 0
    pooled, bn = results(tmp_path / "g"), results(tmp_path / "bn")
    config = tiny_config(tmp, "logging.run_name=x", NO_PLOTS, "model.retrieval_feature=global")
    expected = evaluate_checkpoint(checkpoint, config, out_dir=tmp_path / "reference")
    assert {k: pooled[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert pooled["mAP"] != bn["mAP"]


def test_extract_with_the_pooled_feature_writes_what_the_bn_feature_normalises(run, tmp_path):
    """The independent reference: the BN features (``bn``, the stored config's choice) are the
    checkpoint's BatchNorm, with its running statistics, applied to the pooled ones (``global``)."""
    _, checkpoint = run
    for key in ("bn", "global"):
        argv = ["extract", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / key)]
        assert main([*argv, "--set", f"model.retrieval_feature={key}"]) == 0
    state = weights(checkpoint)
    mean, var = state["head.neck.bn.running_mean"], state["head.neck.bn.running_var"]
    scale, shift = state["head.neck.bn.weight"], state["head.neck.bn.bias"]
    for split in ("query", "gallery"):
        with (
            h5py.File(tmp_path / "global" / f"{split}.h5") as g,
            h5py.File(tmp_path / "bn" / f"{split}.h5") as b,
        ):
            pooled, bn = torch.from_numpy(g["features"][:]), torch.from_numpy(b["features"][:])
        expected = (pooled - mean) / torch.sqrt(var + 1e-5) * scale + shift
        torch.testing.assert_close(bn, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(bn, pooled, rtol=1e-3, atol=1e-3)


def test_a_checkpoint_evaluates_after_its_initial_weight_file_is_gone(tmp_path):
    """The checkpoint holds every weight: evaluating it reads neither model.pretrained nor
    FGReID's second_init_from, which were only read when training began (and may be gone)."""
    init = tmp_path / "imagenet.pth"
    source = build_model(tiny_config(tmp_path, "logging.run_name=s").model, 8).backbone
    torch.save(source.state_dict(), init)
    train(
        tiny_config(tmp_path, "logging.run_name=x", NO_PLOTS, f"model.pretrained={init}"),
        max_steps=1,
    )
    checkpoint = CheckpointManager(tmp_path / "runs/x").latest()
    with_file = evaluate_checkpoint(checkpoint, out_dir=tmp_path / "a")
    init.unlink()
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")]) == 0
    assert results(tmp_path / "b")["mAP"] == pytest.approx(with_file["mAP"], abs=1e-12)


def test_a_checkpoint_evaluates_on_another_set_with_its_own_classifier_size(run, tmp_path):
    """Cross-domain evaluation: a model trained on the tiny set (8 training identities) ranks a
    set with 10; its classifier (unused by ranking) keeps the checkpoint's size. The reference is
    the same weights saved as if trained on the other set, a classifier of 10 rows (random), which
    loads the old way."""
    tmp, checkpoint = run
    other = "data.synthetic.ids=20"  # 10 training identities
    assert main(["eval", "--checkpoint", str(checkpoint), "--set", other,
                 "--out", str(tmp_path / "cross")]) == 0  # fmt: skip
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["model_meta"]["num_classes"] == 8
    weights = state["strategy"]["model"]
    resized = [k for k in weights if "classifier" in k and weights[k].shape[0] == 8]
    assert resized
    for key in resized:
        weights[key] = torch.randn(10, *weights[key].shape[1:])
    state["model_meta"]["num_classes"] = 10
    native = tmp_path / "native.pt"
    torch.save(state, native)
    config = tiny_config(tmp, "logging.run_name=x", NO_PLOTS, other)
    expected = evaluate_checkpoint(native, config, out_dir=tmp_path / "reference")
    got = results(tmp_path / "cross")
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)
