"""``hpc-reid export`` on tiny trained runs of every head: the exported graph (ONNX run by
onnxruntime, TorchScript by torch.jit.load) against the model run directly on inputs normalised
here in numpy, at batch 1 and 3 through one file; the in-graph flip-average against evaluation's
flip-averaged rows; the metadata against the config, the layout and the checkpoint's own hash; the
refusals (a graph that disagrees, an operator the exporter lacks, bad arguments)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_reid.cli import main
from hpc_reid.config import ConfigError
from hpc_reid.data.loaders import build_test_loader
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.saved import saved_model
from hpc_reid.engine.trainer import train
from hpc_reid.evaluation.features import extract_features
from hpc_reid.evaluation.parts import probe_layout
from hpc_reid.export import exported_layout, exported_runner, read_metadata
from hpc_reid.models.heads import AvgPool, GlobalHead
from tests.shared_data import shared_data_root
from tests.tiny import TINY_TRACKLETS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: The tiny tracklet set (tests/tiny.py): clips of T = 3 frames at 64x32.
VIDEO = TINY_TRACKLETS
FGREID = ["model.fgreid.mid_dim=32", "model.fgreid.nonlocal_dim=16"]
#: Every registered head (and the methods' heads) on OSNet x0.25 at 64x32, one training step each;
#: one more trunk: ResNet-18 with GeM pooling and non-local blocks.
RUNS = {
    "bnneck": ("bot.yaml", []),
    "bnneck_resnet18": (
        "bot.yaml",
        ["model.backbone=resnet18", "model.pooling=gem", "model.non_local=true"],
    ),
    "aligned": ("alignedreid.yaml", ["model.local.stripes=4", "model.local.dim=8"]),
    "san": ("san.yaml", ["loss.decoder_triplet.mining=hard", "model.san.texture_size=[16,8]"]),
    "cace": ("cace.yaml", ["sampler.num_identities=4", "sampler.num_instances=2"]),
    "fgreid": ("fgreid.yaml", FGREID),
    "temporal_avg": ("video.yaml", VIDEO),
    "temporal_attention": ("video.yaml", [*VIDEO, "model.head=temporal_attention"]),
    "fgreid_video": ("fgreid_video.yaml", [*VIDEO, *FGREID]),
    # a real model the exporter refuses: 3 stripes of OSNet's 4-row map (module docstring of
    # hpc_reid.export; adaptive pooling to a size that does not divide the input's)
    "aligned_3_stripes": ("alignedreid.yaml", ["model.local.stripes=3", "model.local.dim=8"]),
}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name)``: the checkpoint of RUNS[name] trained for one step (once per module; the
    synthetic sets are generated once in a shared cache)."""
    tmp = tmp_path_factory.mktemp("export")
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            config = run_config(tmp, name)
            train(config, max_steps=1)
            done[name] = CheckpointManager(tmp / "runs" / name).latest()
        return done[name]

    run.tmp = tmp
    return run


def run_config(tmp: Path, name: str):
    file, sets = RUNS[name]
    return tiny_config(tmp, f"configs/synthetic/{file}", *sets, f"logging.run_name={name}")


def check_images() -> list[str]:
    """VIPeR's photos for the export's own check, where the shared data is (else the run's own
    query images)."""
    viper = shared_data_root() / "viper/images"
    return ["--check-images", str(viper)] if viper.is_dir() else []


def export(checkpoint: Path, out: Path, *args: str) -> int:
    return main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *args])


def reference_parts(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """The model run directly on ``images`` in [0, 1] normalised here, each declared part read
    from its output key."""
    x = torch.from_numpy(((images - MEAN[:, None, None]) / STD[:, None, None]).astype(np.float32))
    with torch.no_grad():
        outputs = model.eval()(x)
    return {name: outputs[part.key].numpy() for name, part in model.retrieval_parts.items()}


def random_inputs(config, batch: int, seed: int) -> np.ndarray:
    clip = (config.data.video.seq_len,) if config.data.synthetic.tracklets else ()
    shape = (batch, *clip, 3, config.data.height, config.data.width)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RUNS if n != "aligned_3_stripes"])
def test_onnx_of_every_head_gives_the_models_parts_at_batch_1_and_3(runs, name, tmp_path, capsys):
    checkpoint = runs(name)
    out = tmp_path / "model.onnx"
    assert export(checkpoint, out, "--dynamic-batch", *check_images()) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (onnx)" in printed and "max |diff|" in printed
    run = exported_runner(out, "onnx")
    with saved_model(checkpoint) as (config, _, _, _, model):
        for seed, batch in enumerate((1, 3)):
            images = random_inputs(config, batch, seed)
            expected = reference_parts(model, images)
            got = dict(zip(expected, run(torch.from_numpy(images)), strict=True))
            for part, want in expected.items():
                assert got[part].shape == want.shape, part
                scale = np.abs(want).max()
                assert np.abs(got[part] - want).max() <= 1e-5 * scale, (name, part, batch)


def test_torchscript_gives_the_models_parts_at_any_batch(runs, tmp_path):
    checkpoint = runs("aligned")
    out = tmp_path / "model.pt"
    assert export(checkpoint, out, "--format", "torchscript", "--dynamic-batch") == 0
    run = exported_runner(out, "torchscript")
    with saved_model(checkpoint) as (config, _, _, _, model):
        for seed, batch in enumerate((1, 3)):
            images = random_inputs(config, batch, seed)
            expected = reference_parts(model, images)
            got = dict(zip(expected, run(torch.from_numpy(images)), strict=True))
            assert got["local"].shape == (batch, 4, 8)
            for part, want in expected.items():
                np.testing.assert_allclose(got[part], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_flip_averaged_export_equals_evaluations_flip_averaged_rows(runs, tmp_path):
    """AlignedReID: both parts, flattened into rows in layout order, against extract_features
    with flip on the query images through the test loader (the export gets them back in [0, 1])."""
    checkpoint = runs("aligned")
    out = tmp_path / "flip.onnx"
    assert export(checkpoint, out, "--dynamic-batch", "--flip-average") == 0
    assert read_metadata(out)["flip_average"] is True
    with saved_model(checkpoint) as (config, _, _, dataset, model):
        records = dataset.query[:12]
        loader = build_test_loader(records, config.loader, config.data.height, config.data.width)
        rows, _, _ = extract_features(model, loader, "cpu", flip=True)
        plain, _, _ = extract_features(model, loader, "cpu", flip=False)
        normalised = torch.cat([b["images"] for b in loader]).numpy()
    images = normalised * STD[:, None, None] + MEAN[:, None, None]
    got = exported_runner(out, "onnx")(torch.from_numpy(images.astype(np.float32)))
    exported_rows = np.concatenate([g.reshape(len(g), -1) for g in got], axis=1)
    scale = np.abs(rows.numpy()).max()
    np.testing.assert_allclose(exported_rows, rows.numpy(), rtol=0, atol=1e-5 * scale)
    assert np.abs(exported_rows - plain.numpy()).max() > 1e-3 * scale  # flipping changes them


def test_metadata_holds_the_input_normalisation_outputs_and_source(runs, tmp_path):
    checkpoint = runs("temporal_attention")
    config = run_config(runs.tmp, "temporal_attention")
    onnx_file, script = tmp_path / "m.onnx", tmp_path / "m.pt"
    assert export(checkpoint, onnx_file, "--dynamic-batch", "--opset", "18") == 0
    assert export(checkpoint, script, "--format", "torchscript") == 0
    with saved_model(checkpoint) as (_, _, _, _, model):
        layout = probe_layout(model, config.data.height, config.data.width, "cpu")
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for path, batch in ((onnx_file, "batch"), (script, 1)):
        meta = read_metadata(path)
        assert meta["input"] == "images" and meta["input_layout"] == "NTCHW"
        assert meta["input_shape"] == [batch, 3, 3, 64, 32] and meta["clip_length"] == 3
        assert (meta["height"], meta["width"]) == (64, 32)
        assert meta["mean"] == list(config.loader.augment.mean)
        assert meta["std"] == list(config.loader.augment.std)
        assert exported_layout(meta) == layout
        assert meta["outputs"] == [{"name": "global", "shape": [batch, 128], "distance": "metric"}]
        assert meta["head"] == "temporal_attention" and meta["backbone"] == "osnet_x0_25"
        assert meta["metric"] == config.evaluation.metric
        assert meta["checkpoint"] == str(checkpoint.resolve()) and meta["checkpoint_sha256"] == sha
        assert meta["dynamic_batch"] is (batch == "batch") and meta["flip_average"] is False
    import onnx

    proto = onnx.load(str(onnx_file))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert proto.graph.input[0].name == "images" and dims == ["batch", 3, 3, 64, 32]
    assert [o.name for o in proto.graph.output] == ["global"]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["height"]) == 64


def test_a_graph_that_disagrees_with_torch_is_refused_and_nothing_is_written(
    runs, tmp_path, monkeypatch, capsys
):
    """A head that turns a tensor into a Python float is traced with the example's value: the
    exported graph then adds a constant that eager recomputes per input, and the check refuses
    it (exit 1), leaving a file already at --out as it was and no temporary file."""
    checkpoint = runs("bnneck")
    forward = GlobalHead.forward

    def baked(self, fmap):
        out = forward(self, fmap)
        return {**out, "bn": out["bn"] + float(fmap.amax())}

    monkeypatch.setattr(GlobalHead, "forward", baked)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier model")
    assert export(checkpoint, out, "--dynamic-batch") == 1
    err = capsys.readouterr().err
    assert "export refused" in err and "disagrees with torch" in err and "global" in err
    assert out.read_bytes() == b"an earlier model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_the_tolerance_is_relative_to_the_output_scale(runs, tmp_path, capsys):
    """float32 reordering differs by about 1e-7 of the scale: refused at 1e-12, kept at 1e-3."""
    checkpoint = runs("bnneck")
    out = tmp_path / "model.onnx"
    assert export(checkpoint, out, "--tolerance", "1e-12", "--check-count", "2") == 1
    assert "beyond the tolerance 1e-12" in capsys.readouterr().err and not out.exists()
    assert export(checkpoint, out, "--check-count", "2") == 0 and out.is_file()


def test_an_operator_without_onnx_conversion_is_named_with_the_module_calling_it(
    runs, tmp_path, monkeypatch, capsys
):
    def cummax_pool(self, x):  # max pooling through cummax, which has no ONNX conversion
        return torch.cummax(x.flatten(2), dim=2).values[..., -1]

    monkeypatch.setattr(AvgPool, "forward", cummax_pool)
    out = tmp_path / "model.onnx"
    assert export(runs("bnneck"), out) == 1
    err = capsys.readouterr().err
    assert "operator aten::cummax" in err
    assert "head.pool (AvgPool, tests/test_export.py:" in err
    assert not out.exists()


def test_adaptive_pooling_to_stripes_that_do_not_divide_the_map_is_refused_naming_the_head(
    runs, tmp_path, capsys
):
    out = tmp_path / "model.onnx"
    assert export(runs("aligned_3_stripes"), out) == 1
    err = capsys.readouterr().err
    assert "operator aten::adaptive_avg_pool2d: output size that are not factor of input" in err
    assert "model.head (AlignedHead, hpc_reid/methods/alignedreid/model.py:" in err
    assert not out.exists()


def test_bad_arguments_exit_2_naming_what_is_wrong(runs, tmp_path, capsys):
    missing = tmp_path / "nowhere.pt"
    assert export(missing, tmp_path / "m.onnx") == 2
    assert f"checkpoint {missing} not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        export(runs("bnneck"), tmp_path / "m.onnx", "--format", "tflite")
    assert exit_.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert export(runs("bnneck"), tmp_path / "m.onnx", "--opset", "5") == 2
    assert "--opset 5" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(runs("bnneck"), tmp_path / "m.onnx", "--check-images", str(empty)) == 2
    assert f"--check-images {empty} holds no image file" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ConfigError, match="not found"):
        read_metadata(tmp_path / "m.onnx")
