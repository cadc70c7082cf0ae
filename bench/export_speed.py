"""onnxruntime (CPU) against torch eager: images a second of the exported baseline per input size.

The config's model with its initial weights (random: the speed does not depend on the weights) is
wrapped as ``hpc-reid export`` wraps it (:class:`hpc_reid.export.InferenceGraph`: normalisation and
the retrieval feature, no flip), exported to ONNX with a dynamic batch, and run on the same batch
of random [0, 1] images by torch eager (fp32, NCHW, under ``inference_mode``, as extract runs it)
and by an onnxruntime CPU session (all graph optimisations, as many intra-op threads as torch's).
Their timings alternate, each run first every other time, so load on the machine hits both alike.
Reported per size: the median img/s of each over ``--reps`` after ``--warmup``, onnxruntime /
torch, and their largest |difference| on the batch (a wrong graph would be fast for nothing).

    OMP_NUM_THREADS=2 python bench/export_speed.py --config configs/market/bot_r50.yaml \\
        --sizes 256x128 128x64 --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from hpc_reid.bench.machine import cpu_model
from hpc_reid.cli import add_overrides
from hpc_reid.config import load_config
from hpc_reid.engine.saved import without_initial_weights
from hpc_reid.export import DEFAULT_OPSET, INPUT, InferenceGraph, export_graph
from hpc_reid.models import build_model

#: Market-1501's training identities: the classifier's size, which inference never runs.
NUM_CLASSES = 751


def parse_size(text: str) -> tuple[int, int]:
    height, sep, width = text.partition("x")
    if not (sep and height.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HEIGHTxWIDTH, e.g. 256x128")
    return int(height), int(width)


def baseline_graph(config) -> InferenceGraph:
    torch.manual_seed(config.engine.seed)
    model = build_model(without_initial_weights(config.model), NUM_CLASSES)
    augment = config.loader.augment
    return InferenceGraph(model, augment.mean, augment.std)


def measure(
    graph: InferenceGraph,
    height: int,
    width: int,
    batch: int,
    reps: int,
    warmup: int,
    opset: int = DEFAULT_OPSET,
) -> dict:
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_graph(graph, images[:2], path, "onnx", dynamic_batch=True, opset=opset)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT: images.numpy()}

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            return graph(images)[0].numpy()

    def run_ort() -> np.ndarray:
        return session.run(None, feed)[0]

    runs = {"torch": run_torch, "onnxruntime": run_ort}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, np.ndarray] = {}
    for i in range(warmup + reps):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            tic = time.perf_counter()
            outputs[name] = runs[name]()
            elapsed = time.perf_counter() - tic
            if i >= warmup:
                times[name].append(elapsed)
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    return {
        "input": f"{height}x{width}",
        "batch": batch,
        "torch_img_s": round(rate["torch"], 1),
        "onnxruntime_img_s": round(rate["onnxruntime"], 1),
        "ratio": round(rate["onnxruntime"] / rate["torch"], 2),
        "max_abs_diff": float(np.abs(outputs["onnxruntime"] - outputs["torch"]).max()),
        "timed_reps": reps,
        "threads": torch.get_num_threads(),
        "opset": opset,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/market/bot_r50.yaml"))
    add_overrides(p)
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(256, 128), (128, 64)])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    graph = baseline_graph(config)
    rows = [
        measure(graph, h, w, args.batch, args.reps, args.warmup, args.opset) for h, w in args.sizes
    ]
    head = f"{config.name} ({config.model.backbone}, {config.model.head})"
    print(f"{head}, batch {args.batch}, {rows[0]['threads']} threads, {args.reps} timed runs each")
    print("| input | torch eager img/s | onnxruntime img/s | onnxruntime / torch | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['input']} | {r['torch_img_s']} | {r['onnxruntime_img_s']} | {r['ratio']}x "
            f"| {r['max_abs_diff']:.2g} |"
        )
    info = {
        "config": config.name,
        "backbone": config.model.backbone,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "rows": rows,
    }
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
