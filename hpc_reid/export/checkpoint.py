"""Exporting a checkpoint and checking the file: :func:`export_checkpoint` (the model of a
checkpoint exported, run on real images and compared with torch before the file is renamed into
place), and reading an exported file back (:func:`read_metadata`, :func:`exported_runner`,
:func:`exported_layout`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import hpc_reid
from hpc_reid.atomic import temporary_sibling
from hpc_reid.config import Config, ConfigError
from hpc_reid.data.datasets.base import are_tracklets, image_folder
from hpc_reid.data.transforms import resize_to_tensor
from hpc_reid.engine.checkpoint import resolve_checkpoint
from hpc_reid.evaluation.parts import RowLayout, retrieval_layout, takes_clips
from hpc_reid.export.graph import (
    DEFAULT_OPSET,
    FORMATS,
    INPUT,
    METADATA_FILE,
    ExportError,
    InferenceGraph,
    export_graph,
    quiet,
)
from hpc_reid.launch.distributed import detect_env

DEFAULT_TOLERANCE = 1e-3
#: The images (clips) the check runs.
CHECK_COUNT = 16


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and measured: per output the max |exported - torch|
    over the check inputs and its scale (max |torch|), the inputs' source and count."""

    path: Path
    format: str
    metadata: dict[str, Any]
    max_abs_diff: dict[str, float]
    scale: dict[str, float]
    tolerance: float
    check_source: str
    check_count: int

    def relative(self, name: str) -> float:
        return self.max_abs_diff[name] / self.scale[name] if self.scale[name] else 0.0


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "onnx",
    config: Config | None = None,
    *,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    flip_average: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    check_images: str | Path | None = None,
    check_count: int = CHECK_COUNT,
) -> ExportResult:
    """Export the model saved at ``checkpoint`` to ``out`` (``fmt``: "onnx" or "torchscript"),
    check it (module docstring) and rename it into place; an :class:`ExportError` leaves nothing
    at ``out`` (a file already there is kept). ``config`` defaults to the checkpoint's own;
    ``check_images`` is a folder of images (else the data set's first query images)."""
    from hpc_reid.engine.saved import saved_model  # it imports the trainer, hence the whole engine

    _check_arguments(fmt, opset, tolerance, check_count)
    env = detect_env()
    if env.world_size > 1:
        raise ConfigError(
            f"hpc-reid export runs on one process; it was launched as rank {env.rank} of "
            f"{env.world_size} ({env.launcher}): run it without torchrun or srun"
        )
    out = Path(out)
    path = resolve_checkpoint(checkpoint)
    with saved_model(path, config) as (config, _, _, dataset, model):
        model = model.cpu().eval()  # exported for any device; checked on the CPU
        augment = config.loader.augment
        graph = InferenceGraph(model, augment.mean, augment.std, flip_average)
        clips = takes_clips(model) or are_tracklets(dataset.query)
        frames = config.data.video.seq_len if clips else None
        inputs, source = _check_inputs(config, dataset, check_images, check_count, frames)
        metadata = _metadata(graph, config, path, fmt, frames, dynamic_batch, opset)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(out)
        try:
            # traced at batch 2 for a dynamic batch: at 1 a tracer may take a size-1 dim as fixed
            example = inputs[[0, -1]] if dynamic_batch else inputs[:1]
            export_graph(graph, example, tmp, fmt, dynamic_batch, opset, metadata)
            names = [o["name"] for o in metadata["outputs"]]
            diffs, scales = _compare(graph, tmp, fmt, inputs, names, dynamic_batch)
            bad = [k for k in diffs if diffs[k] > tolerance * scales[k]]
            if bad:
                shown = "; ".join(
                    f"{k}: max |diff| {diffs[k]:.3g}, {diffs[k] / scales[k]:.3g} of its scale "
                    f"{scales[k]:.3g}"
                    for k in bad
                )
                raise ExportError(
                    f"the exported {fmt} model disagrees with torch on {len(inputs)} inputs of "
                    f"{source} beyond the tolerance {tolerance:g} (relative to each output's "
                    f"largest |value|): {shown}; nothing written to {out}"
                )
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return ExportResult(out, fmt, metadata, diffs, scales, tolerance, source, len(inputs))


def _check_arguments(fmt: str, opset: int, tolerance: float, check_count: int) -> None:
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as max_opset

    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx" and not 9 <= opset <= max_opset:
        raise ConfigError(f"--opset {opset}: torch's ONNX exporter writes opsets 9..{max_opset}")
    if not tolerance > 0 or check_count < 1:
        raise ConfigError(
            f"--tolerance {tolerance} and --check-count {check_count}: expected > 0 and >= 1"
        )
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"export --format onnx needs onnx and onnxruntime ({exc}): pip install "
                "'hpc-reid[deploy]'"
            ) from None


# --- the check's inputs --------------------------------------------------------------------------


def _check_inputs(
    config: Config, dataset, folder: str | Path | None, count: int, frames: int | None
) -> tuple[torch.Tensor, str]:
    """(inputs in [0, 1], where they come from): ``count`` images (clips of ``frames``)."""
    height, width = config.data.height, config.data.width
    if folder is not None:
        files = image_folder(Path(folder), "--check-images", ConfigError)
        per = frames or 1
        if len(files) < per:
            raise ConfigError(
                f"--check-images {folder}: {len(files)} image(s), a clip needs {per} frames"
            )
        files = files[: count * per]
        files = files[: len(files) - len(files) % per]
        images = torch.stack([_pixels(f, height, width) for f in files])
        if frames:
            images = images.unflatten(0, (-1, frames))
        return images, f"{folder}"
    return _dataset_inputs(config, dataset, count), f"the first query images of {dataset.name}"


def _pixels(path: Path, height: int, width: int) -> torch.Tensor:
    """The image at ``path`` as the test transform resizes it, float RGB in [0, 1] (3, H, W)."""
    try:
        with Image.open(path) as img:
            pixels = resize_to_tensor(img.convert("RGB"), height, width)
    except OSError as exc:
        raise ConfigError(f"--check-images: {path} is not a readable image ({exc})") from None
    return pixels.float() / 255.0


def _dataset_inputs(config: Config, dataset, count: int) -> torch.Tensor:
    """The first ``count`` query images (dense clips) through the torch test loader, mapped
    back from its normalised tensors to [0, 1]."""
    from hpc_reid.data.loaders import build_test_loader

    records = dataset.query[:count]
    if not records:
        raise ConfigError(f"{dataset.name} has no query record to check the export on")
    loader_cfg = config.loader.model_copy(update={"num_workers": 0})
    loader = build_test_loader(
        records, loader_cfg, config.data.height, config.data.width, config.data.video
    )
    mean = torch.tensor(config.loader.augment.mean).view(3, 1, 1)
    std = torch.tensor(config.loader.augment.std).view(3, 1, 1)
    batches = [batch["images"] for batch in loader]
    return (torch.cat(batches)[:count] * std + mean).clamp_(0.0, 1.0)


# --- writing -------------------------------------------------------------------------------------


def _metadata(
    graph: InferenceGraph,
    config: Config,
    checkpoint: Path,
    fmt: str,
    frames: int | None,
    dynamic_batch: bool,
    opset: int,
) -> dict[str, Any]:
    h, w = config.data.height, config.data.width
    example = torch.zeros(1, *((frames,) if frames else ()), 3, h, w)
    with torch.inference_mode():
        layout = retrieval_layout(graph.model, graph.model(example))
    batch = "batch" if dynamic_batch else 1
    ev = config.evaluation
    return {
        "hpc_reid_version": hpc_reid.__version__,
        "format": fmt,
        "opset": opset if fmt == "onnx" else None,
        "input": INPUT,
        "input_shape": [batch, *((frames,) if frames else ()), 3, h, w],
        "input_layout": "NTCHW" if frames else "NCHW",
        "input_dtype": "float32",
        "input_range": "RGB in [0, 1] (uint8 / 255), resized bilinearly to height x width",
        "height": h,
        "width": w,
        "clip_length": frames,
        "mean": list(config.loader.augment.mean),
        "std": list(config.loader.augment.std),
        "normalisation": "inside the graph: (images - mean) / std",
        "dynamic_batch": dynamic_batch,
        "flip_average": graph.flip_average,
        "outputs": [
            {"name": p.name, "shape": [batch, *p.shape], "distance": p.distance}
            for p in layout.parts
        ],
        "layout": json.loads(layout.to_json()),
        "metric": ev.metric,
        "distance": ev.distance,
        "head": config.model.head,
        "backbone": config.model.backbone,
        "config": config.name,
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": _sha256(checkpoint),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exported_layout(metadata: dict[str, Any]) -> RowLayout:
    """The row layout of an exported model's outputs, from its :func:`read_metadata`."""
    return RowLayout.from_json(json.dumps(metadata["layout"]), "the exported model's layout")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export_checkpoint` wrote into an ONNX or TorchScript file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"exported model {path} not found")
    if path.suffix.lower() == ".onnx" or _is_onnx(path):
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        return {k: json.loads(v) for k, v in props.items()}
    files = {METADATA_FILE: ""}
    with quiet():
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    if not files[METADATA_FILE]:
        raise ConfigError(f"{path} holds no {METADATA_FILE}: not a model from hpc-reid export")
    return json.loads(files[METADATA_FILE])


def _is_onnx(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) != b"PK"  # a TorchScript file is a zip archive


def exported_runner(path: str | Path, fmt: str) -> Callable[[torch.Tensor], list[np.ndarray]]:
    """``run(images)``: the exported model's outputs for ``images``, in its output order, from
    onnxruntime on the CPU (as many threads as torch uses) or the loaded TorchScript module."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {INPUT: images.numpy()})
    with quiet():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in module(images)]

    return run


def _compare(
    graph: InferenceGraph,
    path: Path,
    fmt: str,
    inputs: torch.Tensor,
    names: Sequence[str],
    dynamic_batch: bool,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per output ``names``: max |exported - torch| over ``inputs`` and max |torch|. A dynamic
    batch runs them all at once and one at a time (a size baked into the graph fails one of the
    two); a fixed one, one at a time."""
    with torch.no_grad():
        expected = {n: t.numpy() for n, t in zip(names, graph(inputs), strict=True)}
    batches = [(0, inputs)] if dynamic_batch else []
    batches += [(i, inputs[i : i + 1]) for i in range(len(inputs))]
    diffs = dict.fromkeys(expected, 0.0)
    run = exported_runner(path, fmt)
    for start, batch in batches:
        try:
            got = run(batch)
        except Exception as exc:  # the runtime's own error types, reported with the input shape
            raise ExportError(
                f"the exported {fmt} model fails on inputs of shape {tuple(batch.shape)}: {exc}"
            ) from exc
        for (name, e), g in zip(expected.items(), got, strict=True):
            want = e[start : start + len(batch)]
            if g.shape != want.shape:
                raise ExportError(
                    f"the exported {fmt} model's output {name!r} is {g.shape} for inputs "
                    f"{tuple(batch.shape)}; torch gives {want.shape}"
                )
            diffs[name] = max(diffs[name], float(np.abs(g - want).max()))
    scales = {name: float(np.abs(e).max()) for name, e in expected.items()}
    return diffs, scales
