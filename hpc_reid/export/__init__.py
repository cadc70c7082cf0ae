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

from hpc_reid.export.checkpoint import (
    DEFAULT_TOLERANCE,
    ExportResult,
    export_checkpoint,
    exported_layout,
    exported_runner,
    read_metadata,
)
from hpc_reid.export.graph import (
    DEFAULT_OPSET,
    FORMATS,
    INPUT,
    ExportError,
    InferenceGraph,
    export_graph,
)

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "FORMATS",
    "INPUT",
    "ExportError",
    "ExportResult",
    "InferenceGraph",
    "export_checkpoint",
    "export_graph",
    "exported_layout",
    "exported_runner",
    "read_metadata",
]
