"""The exported graph and the exporters: :class:`InferenceGraph` (the model with the test
normalisation and flip averaging folded in), :func:`export_graph` (traced to ONNX or TorchScript,
outputs named after the retrieval parts, metadata attached), and an ONNX exporter failure turned
into one message naming the operator, the reason and the modules that call it. The package
docstring (:mod:`hpc_reid.export`) describes the graph's inputs and outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpc_reid.evaluation.parts import declared_parts, part_features

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
#: The graph's input name.
INPUT = "images"
#: The TorchScript extra file holding the metadata.
METADATA_FILE = "hpc_reid.json"


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


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """Tracing for export, quiet: the tracer's warnings (Python bools and ints from tensors) and
    the exporter's deprecation notice are silenced, since what they warn of, a graph that differs
    at other inputs, is what the check after export measures. (The tracklet models reshape their
    (B*T, ...) maps with ``unflatten(0, (-1, T))``, never the batch's own size, so a dynamic batch
    stays dynamic in the traced graph.)"""
    with quiet():
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
def quiet() -> Iterator[None]:
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
