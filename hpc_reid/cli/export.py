"""``hpc-reid export-weights`` (a model-only checkpoint) and ``hpc-reid export`` (ONNX,
TorchScript)."""

from __future__ import annotations

import argparse
import sys

from hpc_reid.cli.common import add_config_args, checkpoint_config


def cmd_export_weights(args: argparse.Namespace) -> int:
    from hpc_reid.engine.deepspeed_strategy import export_weights

    print(f"wrote {export_weights(args.checkpoint, args.out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``hpc-reid export``: exit 1 (nothing written) when the model cannot be exported or the
    exported file disagrees with torch beyond --tolerance."""
    from hpc_reid.export import ExportError, export_checkpoint

    try:
        # flags left out take export_checkpoint's defaults (the parser does not import torch)
        given = {k: getattr(args, k) for k in ("opset", "tolerance", "check_count")}
        result = export_checkpoint(
            args.checkpoint,
            args.out,
            args.format,
            checkpoint_config(args),
            dynamic_batch=args.dynamic_batch,
            flip_average=args.flip_average,
            check_images=args.check_images,
            **{k: v for k, v in given.items() if v is not None},
        )
    except ExportError as exc:
        print(f"hpc-reid: export refused: {exc}", file=sys.stderr)
        return 1
    meta = result.metadata
    shape = ", ".join(str(s) for s in meta["input_shape"])
    print(
        f"wrote {result.path} ({result.format}): input {meta['input']} ({shape}), float RGB "
        "in [0, 1]"
    )
    runtime = "onnxruntime (CPU)" if result.format == "onnx" else "the loaded TorchScript module"
    print(
        f"checked {runtime} against torch on {result.check_count} inputs of {result.check_source}:"
    )
    for out in meta["outputs"]:
        name = out["name"]
        print(
            f"  {name} {tuple(out['shape'])}: max |diff| {result.max_abs_diff[name]:.3g}, "
            f"{result.relative(name):.3g} of the scale {result.scale[name]:.3g} "
            f"(tolerance {result.tolerance:g})"
        )
    return 0


def add_parsers(commands) -> None:
    """``export-weights`` and ``export``."""
    export = commands.add_parser(
        "export-weights",
        help="consolidate a (DeepSpeed ZeRO or DDP) checkpoint into a model-only checkpoint",
    )
    export.add_argument("checkpoint", help="a checkpoint written by train")
    export.add_argument("--out", required=True, help="the model-only checkpoint to write")
    export.set_defaults(func=cmd_export_weights)

    export = commands.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript for inference, checked against torch",
        description="The graph takes float RGB images in [0, 1] (N, 3, H, W) at the model's "
        "input size (tracklet models: clips (N, T, 3, H, W)), normalises them inside and returns "
        "one output per retrieval part (global; AlignedReID's local); the input size, mean/std "
        "and outputs are in its metadata. After export the file is run (onnxruntime on the CPU, "
        "or the loaded TorchScript) on real images and compared with torch; above --tolerance it "
        "is refused (exit 1, nothing written). With the config the checkpoint stores, or "
        "--config; --set overrides either.",
    )
    export.add_argument("--checkpoint", required=True, help="a checkpoint, run or folder")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="(onnx)")
    export.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    export.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: exactly 1)"
    )
    export.add_argument("--opset", type=int, help="ONNX opset (17)")
    export.add_argument(
        "--flip-average",
        action="store_true",
        help="each output the mean of the image's and its left-right flip's, as evaluation's "
        "flip_average",
    )
    export.add_argument(
        "--tolerance",
        type=float,
        help="largest max |exported - torch| allowed, relative to each output's largest "
        "|value| (1e-3)",
    )
    export.add_argument(
        "--check-images",
        help="a folder of images to check on (default: the data set's first query images)",
    )
    export.add_argument("--check-count", type=int, help="images (clips) checked (16)")
    add_config_args(export, required=False)
    export.set_defaults(func=cmd_export)
