"""``hpc-reid export``: a trained model as one ONNX or TorchScript file for an inference server,
checked against torch before it is kept.

The exported graph (:class:`InferenceGraph`) is the model in eval mode with the test transform's
normalisation folded in:

- input ``images``: float32 RGB in [0, 1] (uint8 pixels / 255), already resized to the model's
  input size (``data.height`` x ``data.width``; the test transform's bilinear resize stays with
  the caller, as a server decodes and resizes anyway), (N, 3, H, W); a tracklet model (a temporal
  head, or a model trained on tracklets) takes one clip of T = ``data.video.seq_len`` frames per
  row, (N, T, 3, H, W). A tracklet's feature in evaluation is the mean of its dense clips' (T
  consecutive frames, the last clip padded by cycling its own frames): that averaging stays with
  the caller. Float rather than uint8, so a caller that has floats (a GPU decoder, an earlier
  resize) passes them unrounded; a uint8 caller divides by 255.
- inside: ``(x - mean) / std`` (``loader.augment.mean``/``std``), the model, and with
  ``flip_average`` the mean of the features of x and of x flipped left-right, per part, as
  evaluation averages them (:func:`hpc_reid.evaluation.features.extract_features`).
- outputs: one per retrieval part the model declares, named after it (``global``; AlignedReID's
  ``local`` (N, S, C) stripes), float32, as the part's rows of ``hpc-reid extract``'s feature files.

Without ``dynamic_batch`` the graph takes exactly one image (one clip), N = 1.

The metadata (ONNX ``metadata_props``, TorchScript extra file ``hpc_reid.json``; every value JSON,
read back by :func:`read_metadata`) records the input (name, shape, layout, range, mean/std), the
outputs and their row layout (the feature files' ``layout``), the evaluation metric and distance,
the head, backbone, flip averaging, the source checkpoint (path and SHA-256) and the hpc-reid
version.

After export the file is loaded and run (onnxruntime on the CPU; TorchScript by ``torch.jit.load``)
on real images (a folder given, else the first query images of the model's own data set through
the test loader) and compared with the eager graph on the same inputs, with a dynamic batch both
all at once and one at a time. An output whose max |difference| exceeds ``tolerance`` times its
scale (the largest |value| of the torch output) is refused: the file is never renamed into place.
The default 1e-3 is two orders above what float32 reordering gives (fused conv+BN, other GEMM
kernels: 1e-7 to 1e-6 of the scale measured on every head, see ``tests/test_export.py``) and far
below a real fault (a missing normalisation, a wrong op, a baked batch size: O(1)).

ONNX comes from torch's TorchScript-based exporter (``dynamo=False``: the torch.export-based one
needs ``onnxscript``, not a dependency), at opset 17 by default (ONNX Runtime >= 1.11, TensorRT
>= 8.6, OpenVINO read it). An operator it cannot export is an :class:`ExportError` naming the
operator, the exporter's reason and the modules that call it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import hpc_reid
from hpc_reid.atomic import temporary_sibling
from hpc_reid.config import Config, ConfigError
from hpc_reid.data.datasets.base import are_tracklets
from hpc_reid.data.transforms import resize_to_tensor
from hpc_reid.engine.checkpoint import resolve_checkpoint
from hpc_reid.evaluation.parts import (
    RowLayout,
    declared_parts,
    part_features,
    retrieval_layout,
    takes_clips,
)
from hpc_reid.launch.distributed import detect_env

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "FORMATS",
    "ExportError",
    "ExportResult",
    "InferenceGraph",
    "export_checkpoint",
    "export_graph",
    "exported_layout",
    "exported_runner",
    "read_metadata",
]

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-3
#: The images (clips) the check runs, and the graph's input name.
CHECK_COUNT = 16
INPUT = "images"
#: The TorchScript extra file holding the metadata.
METADATA_FILE = "hpc_reid.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class ExportError(RuntimeError):
    """A model the exporter cannot convert, or an exported file that disagrees with torch."""


class InferenceGraph(nn.Module):
    """What is exported: float RGB [0, 1] ``images`` -> ``(x - mean) / std`` -> the model (eval
    mode) -> its retrieval parts in declaration order (``names``), each flip-averaged with
    ``flip_average`` (module docstring). Eval mode is fixed: ``train()`` is refused, as a graph
    exported in training mode would normalise with batch statistics."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        flip_average: bool = False,
    ):
        super().__init__()
        self.model = model
        self.flip_average = flip_average
        # (3, 1, 1) broadcasts over (N, 3, H, W) images and (N, T, 3, H, W) clips alike
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))
        self.eval()

    def train(self, mode: bool = True) -> InferenceGraph:
        if mode:
            raise ValueError("an InferenceGraph is eval-mode only (BatchNorm running statistics)")
        return super().train(False)

    def parts(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The retrieval parts of normalised ``images``, float32 (the rows' dtype)."""
        return {k: v.float() for k, v in part_features(self.model, self.model(images)).items()}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images - self.mean) / self.std
        feats = self.parts(x)
        if self.flip_average:
            # as extract_features: (f(x) + f(flip x)) / 2, each part elementwise
            flipped = self.parts(torch.flip(x, dims=[-1]))
            feats = {k: (v + flipped[k]) * 0.5 for k, v in feats.items()}
        return tuple(feats.values())


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
        files = _image_files(Path(folder))
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


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"--check-images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(
            f"--check-images {folder} holds no image file (suffixes {', '.join(IMAGE_SUFFIXES)})"
        )
    return files


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


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """Tracing for export, quiet: the tracer's warnings (Python bools and ints from tensors) and
    the exporter's deprecation notice are silenced, since what they warn of, a graph that differs
    at other inputs, is what the check after export measures. (The tracklet models reshape their
    (B*T, ...) maps with ``unflatten(0, (-1, T))``, never the batch's own size, so a dynamic batch
    stays dynamic in the traced graph.)"""
    with _quiet():
        yield


@contextlib.contextmanager
def _no_ir_dump() -> Iterator[None]:
    """Standard output (the file descriptor) to /dev/null: on a failure torch's exporter writes
    the whole TorchScript IR there from C++ (hundreds of lines for a ResNet; its
    ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled`` instead of calling it,
    so the log is always on), burying :func:`_export_failure`'s message."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without torch's notices that the TorchScript-based ONNX exporter and TorchScript itself
    are deprecated (torch 2.9+: the successors need onnxscript or give no file a server loads),
    and the tracer's warnings (see :func:`_tracing`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def export_graph(
    graph: InferenceGraph,
    example: torch.Tensor,
    path: str | Path,
    fmt: str = "onnx",
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``graph`` traced on ``example`` (a batch of its inputs) to ``path`` as ``fmt``, its
    outputs named after the model's retrieval parts, with ``metadata`` (no check: that is
    :func:`export_checkpoint`'s; benchmarks call this directly)."""
    if fmt == "torchscript":
        _export_torchscript(graph, example, Path(path), metadata or {})
        return
    import onnx

    names = list(declared_parts(graph.model))
    axes = {n: {0: "batch"} for n in [INPUT, *names]} if dynamic_batch else None
    try:
        with _tracing(), _no_ir_dump(), torch.no_grad():
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
            )
    except Exception as exc:  # the exporter raises several types; each is reported, not hidden
        raise ExportError(_export_failure(exc, graph, example, opset, dynamic_batch)) from exc
    if metadata:
        proto = onnx.load(str(path))
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=json.dumps(value))
        onnx.save(proto, str(path))


def _export_torchscript(
    graph: InferenceGraph, example: torch.Tensor, path: Path, metadata: dict[str, Any]
) -> None:
    try:
        with _tracing(), torch.no_grad():
            traced = torch.jit.trace(graph, (example,), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    except Exception as exc:  # the tracer raises several types; each is reported, not hidden
        raise ExportError(f"TorchScript export (trace, save) failed: {exc}") from exc


_OPERATOR = re.compile(r"operator '?(?P<op>[\w:.]+)'?(?:,\s*(?P<why>[^.]*))?")


def _export_failure(
    exc: Exception, graph: InferenceGraph, example: torch.Tensor, opset: int, dynamic: bool
) -> str:
    """The exporter's failure as one message: the operator, why, and where the model calls it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    found = _OPERATOR.search(text)
    if not found:
        return f"the ONNX exporter (opset {opset}) failed: {type(exc).__name__}: {text}"
    op = found["op"] if "::" in found["op"] else f"aten::{found['op']}"
    why = found["why"] or f"no conversion at opset {opset}"
    sites = _call_sites(graph, example, op)
    where = f" (called by {'; '.join(sites)})" if sites else ""
    hint = (
        " It may export with a fixed batch (without --dynamic-batch): the exporter loses static "
        "sizes after a reshape by traced sizes."
        if dynamic and "size not accessible" in why
        else " A newer --opset may have it."
        if found["why"] is None
        else ""
    )
    return f"cannot export the model to ONNX (opset {opset}): operator {op}: {why}{where}.{hint}"


def _call_sites(graph: nn.Module, example: torch.Tensor, op: str, limit: int = 4) -> list[str]:
    """Where the traced graph calls ``op``: "module path (Class, file:line)", first ``limit``."""
    try:
        with _tracing(), torch.no_grad():
            traced = torch.jit.trace(graph, (example,), check_trace=False)
    except Exception:  # the export failed already; this only adds where, when it can
        return []
    modules = dict(graph.named_modules())
    sites: list[str] = []
    for node in traced.inlined_graph.nodes():
        if node.kind() != op:
            continue
        name = node.scopeName().split("/")[-1].removeprefix("__module.")
        kind = type(modules[name]).__name__ if name in modules else "?"
        place = _first_caller(node.sourceRange())
        site = f"{name or 'graph'} ({kind}{', ' + place if place else ''})"
        if site not in sites:
            sites.append(site)
    return sites[:limit]


_FRAME = re.compile(r"^(?P<file>.+)\((?P<line>\d+)\): \w+$")


def _first_caller(stack: str) -> str:
    """ "file:line" of the innermost frame of a traced node's stack outside torch itself (the
    model's code calling the op), relative to the working directory where it lies below it."""
    torch_dir = str(Path(torch.__file__).parent)
    for line in stack.splitlines():
        frame = _FRAME.match(line.strip())
        if frame and not frame["file"].startswith(torch_dir):
            path = Path(frame["file"])
            with contextlib.suppress(ValueError):
                path = path.resolve().relative_to(Path.cwd())
            return f"{path}:{frame['line']}"
    return ""


# --- running and checking ------------------------------------------------------------------------


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
    with _quiet():
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
    with _quiet():
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
