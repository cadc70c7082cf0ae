"""The ``hpc-reid`` command line: ``hpc-reid config|data|train|eval|bench|tune ...``.

Run as ``hpc-reid ...`` or ``python -m hpc_reid.cli ...`` (the form torchrun and srun launch).
Errors in user input (config keys, data set folders) end with exit code 2 and one clear message,
not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from hpc_reid.config import ConfigError, load_config
from hpc_reid.data.datasets import DatasetError, available_datasets, build_dataset
from hpc_reid.engine.errors import CheckpointError, TrainingError


def add_overrides(
    p: argparse.ArgumentParser,
    help: str = "override one config key (repeatable), e.g. --set optimizer.lr=1e-3",
) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, read as YAML and validated like a
    config file's keys (also the bench scripts' ``--set``)."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="experiment YAML under configs/")
    add_overrides(p)


def _parse_options(pairs: Sequence[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args.file, args.overrides)
    print(config.to_yaml(), end="")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from hpc_reid.data.synthetic import SynthSpec, TrackletSpec, generate, generate_tracklets

    own = {"tracklets_per_camera", "frames_per_tracklet"} if args.tracklets else {"images_per_id"}
    if args.transit:
        own.add("transit")
    for key in ("images_per_id", "tracklets_per_camera", "frames_per_tracklet"):
        if key not in own and getattr(args, key) is not None:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"data synth: {flag} is for {'images' if args.tracklets else 'tracklets'}"
            )
    # a size left out takes its spec's default (the image set's and the tracklet set's differ)
    sizes = ("ids", "distractors", "junk", "images_per_id", "tracklets_per_camera")
    given = {k: getattr(args, k) for k in sizes if getattr(args, k) is not None}
    if args.frames_per_tracklet:
        given["min_frames"], given["max_frames"] = args.frames_per_tracklet
    if args.tracklets and args.transit:
        raise ConfigError("data synth: --transit is for images (Market-style frame numbers)")
    if args.tracklets:
        spec = TrackletSpec(**given, cams=args.cams, seed=args.seed)
        summary = generate_tracklets(args.out, spec, workers=args.workers, overwrite=args.overwrite)
        kind = "MARS-format tracklet"
    else:
        spec = SynthSpec(**given, cams=args.cams, seed=args.seed, transit=args.transit)
        summary = generate(args.out, spec, workers=args.workers, overwrite=args.overwrite)
        kind = "Market-1501-format"
    print(f"wrote synthetic {kind} data set to {args.out}")
    print(yaml.safe_dump(summary, sort_keys=False, default_flow_style=None), end="")
    return 0


def _dataset_from_args(args: argparse.Namespace, command: str):
    """(data set, the options it was built with) from --config, or --dataset/--root/--option."""
    if args.config:
        from hpc_reid.config import SYNTHETIC
        from hpc_reid.data.build import dataset_from_config

        if args.dataset or args.root:
            raise ConfigError(f"{command}: give either --config or --dataset/--root, not both")
        data = load_config(args.config, args.overrides).data
        options = {} if data.dataset == SYNTHETIC else dict(data.options)
        return dataset_from_config(data), options
    if not (args.dataset and args.root):
        raise ConfigError(f"{command}: give --dataset NAME --root DIR, or --config FILE")
    options = _parse_options(args.options)
    return build_dataset(args.dataset, args.root, **options), options


def cmd_data_stats(args: argparse.Namespace) -> int:
    dataset, _ = _dataset_from_args(args, "data stats")
    print(dataset.statistics())
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from hpc_reid.data.pack import pack_dataset

    dataset, options = _dataset_from_args(args, "data pack")
    summary = pack_dataset(
        dataset,
        args.out,
        shards=args.shards,
        skip_corrupt=args.skip_corrupt,
        progress=sys.stderr.isatty(),
        options=options,
        overwrite=args.overwrite,
    )
    mib = summary.image_bytes / 2**20
    print(
        f"packed {summary.images} images ({mib:.1f} MiB) of {dataset.name} in {summary.seconds} s:"
    )
    for file in summary.files:
        print(f"  {file}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} corrupt image(s):")
        for path, reason in summary.skipped:
            print(f"  {path}: {reason}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from hpc_reid.data.pack import pack_info

    print(pack_info(args.file))
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from hpc_reid.data.pack import verify_pack

    checked, bad = verify_pack(args.file, progress=sys.stderr.isatty())
    for image in bad:
        print(f"bad image: {image}")
    if bad:
        print(f"{len(bad)} of {checked} images fail their checksum", file=sys.stderr)
        return 1
    print(f"{checked} images: all checksums match")
    return 0


_RAY_OPTIONS = ("num_workers", "gpus_per_worker", "cpus_per_worker", "address", "max_failures")


def _add_launcher_args(parser: argparse.ArgumentParser, ranks: str, failures: bool) -> None:
    """``--launcher auto|ray`` and the Ray Train options (``--max-failures`` if ``failures``)."""
    parser.add_argument(
        "--launcher",
        choices=["auto", "ray"],
        default="auto",
        help="auto: one process, torchrun or srun, from the environment; ray: Ray Train workers",
    )
    ray = parser.add_argument_group("Ray Train (--launcher ray; pip install 'hpc-reid[ray]')")
    ray.add_argument("--num-workers", type=int, help=f"{ranks} processes (ranks)")
    ray.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 0: CPU, gloo)")
    ray.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default 1)")
    ray.add_argument(
        "--address", help="Ray cluster: auto, or ray://HOST:10001 (default: start Ray here)"
    )
    if failures:
        ray.add_argument(
            "--max-failures",
            type=int,
            help="restarts from the last checkpoint after a worker fails",
        )


def _uses_ray(args: argparse.Namespace, command: str) -> bool:
    """Whether ``command`` runs on Ray Train workers (``--launcher ray``, checked: this process
    drives the workers, it is not a rank); Ray options without it are an error."""
    if args.launcher != "ray":
        given = [
            f"--{o.replace('_', '-')}" for o in _RAY_OPTIONS if getattr(args, o, None) is not None
        ]
        if given:
            raise ConfigError(f"{command}: {', '.join(given)} need(s) --launcher ray")
        return False
    from hpc_reid.launch.distributed import detect_env
    from hpc_reid.launch.ray_launcher import require_ray

    if detect_env().distributed:
        raise ConfigError(
            f"{command} --launcher ray: start it as one process, not under torchrun/srun"
        )
    if args.num_workers is None or args.num_workers < 1:
        raise ConfigError(f"{command} --launcher ray needs --num-workers N (N >= 1)")
    require_ray()
    return True


def cmd_train(args: argparse.Namespace) -> int:
    from hpc_reid.engine.trainer import train
    from hpc_reid.launch.slurm import requeue_if_preempted

    if _uses_ray(args, "train"):
        if args.then:
            raise ConfigError(
                "train --then runs its stages in this launch (one process, torchrun or srun), "
                "not on Ray: with --launcher ray train each stage on its own, the next one with "
                "--set model.init_from=RUN_FOLDER"
            )
        return _train_on_ray(args)
    if args.then:
        result = _train_stages(args)
    else:
        result = train(
            load_config(args.config, args.overrides), resume=args.resume, max_steps=args.max_steps
        )
    # stopped by SIGUSR1/SIGTERM with a checkpoint: under SLURM, rank 0 requeues the job
    requeue_if_preempted(result)
    return 0


def _train_stages(args: argparse.Namespace) -> dict:
    """``train --config s1.yaml --then s2.yaml ...``: every stage's config is read (and ``--set``
    applied to each) before the first trains, so an error in a later stage costs nothing."""
    from hpc_reid.engine.stages import run_stages

    files = [args.config, *args.then]
    stages = [(file, load_config(file, args.overrides)) for file in files]
    return run_stages(stages, resume=args.resume, max_steps=args.max_steps)


def _train_on_ray(args: argparse.Namespace) -> int:
    """``train --launcher ray``: this process drives N Ray Train workers (it is not a rank)."""
    from hpc_reid.launch.ray_launcher import train_on_ray

    result = train_on_ray(
        load_config(args.config, args.overrides),
        num_workers=args.num_workers,
        gpus_per_worker=args.gpus_per_worker or 0,
        cpus_per_worker=args.cpus_per_worker or 1,
        address=args.address,
        resume=args.resume,
        max_steps=args.max_steps,
        max_failures=args.max_failures or 0,
    )
    metrics = {k: v for k, v in (result.metrics or {}).items() if k != "final"}
    shown = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )
    print(f"Ray Train run {result.path}: last checkpoint {result.checkpoint}; {shown}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hpc_reid.engine.trainer import evaluate_checkpoint

    if args.query_features or args.gallery_features:
        if args.draws is not None:
            raise ConfigError("eval --draws evaluates a --checkpoint, not feature files")
        return _eval_feature_files(args)
    if not args.checkpoint:
        raise ConfigError("eval: give --checkpoint, or --query-features and --gallery-features")
    if args.distance or args.distance_weight:
        raise ConfigError(
            "eval --checkpoint ranks with the config's evaluation.distance: give it as --set "
            "evaluation.distance=global+local (--set evaluation.distance_weights.local=0.5); "
            "--distance and --distance-weight are for feature files"
        )
    if args.draws is not None:
        from hpc_reid.engine.checkpoint import resolve_checkpoint
        from hpc_reid.evaluation.draws import evaluate_draws

        config = _with_run_histogram(args.checkpoint, _checkpoint_config(args, always=True))
        run_dir = resolve_checkpoint(args.checkpoint).resolve().parent.parent
        evaluate_draws(args.checkpoint, config, args.draws, args.out or run_dir / "eval_draws")
        return 0
    config = _with_run_histogram(args.checkpoint, _checkpoint_config(args))
    evaluate_checkpoint(args.checkpoint, config, args.out)
    return 0


def _with_run_histogram(checkpoint: str, config):
    """``config`` whose ``evaluation.st.histogram``, when st-ReID is on and names no file, is the
    evaluated run's own st_histogram.npz (in the run folder holding the checkpoint's
    ``checkpoints/``, wherever that folder is now), if there is one. A stored config (None) keeps
    its default: the run folder it was trained in."""
    if config is None or not config.evaluation.st.enabled or config.evaluation.st.histogram:
        return config
    from hpc_reid.engine.checkpoint import resolve_checkpoint
    from hpc_reid.evaluation.st import ST_HISTOGRAM

    beside = resolve_checkpoint(checkpoint).resolve().parent.parent / ST_HISTOGRAM
    if beside.is_file():
        config.evaluation.st.histogram = str(beside)
    return config


def _checkpoint_config(args: argparse.Namespace, always: bool = False):
    """The config to evaluate or extract ``args.checkpoint`` with: ``--config`` with ``--set``;
    without ``--config``, the resolved config the checkpoint stores with ``--set`` applied and
    validated as a file's would be; None (the stored config as it is) when neither is given,
    unless ``always``."""
    if args.config:
        return load_config(args.config, args.overrides)
    if not args.overrides and not always:
        return None
    from hpc_reid.config import config_with_overrides
    from hpc_reid.engine.checkpoint import load_checkpoint

    stored = load_checkpoint(args.checkpoint).get("config")
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {args.checkpoint} stores no config to apply --set to")
    return config_with_overrides(stored, args.overrides, f"of checkpoint {args.checkpoint}")


def _eval_feature_files(args: argparse.Namespace) -> int:
    """``eval --query-features q.h5 --gallery-features g.h5``: streamed, bounded memory."""
    import json
    from pathlib import Path

    from hpc_reid.config import write_atomic
    from hpc_reid.evaluation.feature_files import FeatureFileError, evaluate_feature_files

    if not (args.query_features and args.gallery_features) or args.checkpoint or args.config:
        raise ConfigError(
            "eval: --query-features and --gallery-features go together, without --checkpoint "
            "or --config"
        )
    try:
        result = evaluate_feature_files(
            args.query_features,
            args.gallery_features,
            metric=args.metric,
            max_rank=args.max_rank,
            query_tile=args.query_tile,
            gallery_chunk=args.gallery_chunk,
            distance=args.distance,
            distance_weights=_distance_weights(args.distance_weight),
        )
    except FeatureFileError as exc:
        print(f"hpc-reid: error: {exc}", file=sys.stderr)
        return 2
    summary = result.summary()
    print(", ".join(f"{k} {100 * v:.2f}%" for k, v in summary.items()))
    print(f"{result.num_valid} valid queries of {result.valid.size}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**summary, "cmc": [float(c) for c in result.cmc]}, indent=2) + "\n"
        write_atomic(out / "results.json", text)
        print(f"results: {out / 'results.json'}")
    return 0


def _distance_weights(items: list[str] | None) -> dict[str, float] | None:
    """``--distance-weight PART=W`` (repeated) as ``evaluation.distance_weights``."""
    if not items:
        return None
    weights = {}
    for item in items:
        part, sep, value = item.partition("=")
        try:
            weights[part] = float(value)
        except ValueError:
            sep = ""
        if not sep or not part:
            raise ConfigError(f"--distance-weight {item!r}: expected PART=WEIGHT, e.g. local=0.5")
    return weights


def cmd_extract(args: argparse.Namespace) -> int:
    from hpc_reid.engine.extract import extract_checkpoint

    extract_checkpoint(args.checkpoint, args.out_dir, _checkpoint_config(args))
    return 0


def cmd_textures(args: argparse.Namespace) -> int:
    from hpc_reid.methods.san.generate import generate_textures

    data_config = load_config(args.config, args.overrides)
    generate_textures(args.checkpoint, data_config, args.out, preview=args.preview)
    return 0


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
            _checkpoint_config(args),
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


def _add_export_parser(commands) -> None:
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
    _add_config_args(export, required=False)
    export.set_defaults(func=cmd_export)


def _eval_size(text: str) -> tuple[int, int]:
    q, _, g = text.partition(",")
    try:
        return int(q), int(g)
    except ValueError:
        raise ConfigError(
            f"--eval-size {text!r}: expected QUERIES,GALLERY, e.g. 3368,15913"
        ) from None


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from hpc_reid.bench.report import run_markdown
    from hpc_reid.bench.runner import check_settings, parse_loaders, run_bench
    from hpc_reid.launch.distributed import detect_env

    if not args.config:
        raise ConfigError("bench: give --config FILE (or use `bench summarize` / `bench model`)")
    eval_query, eval_gallery = _eval_size(args.eval_size)
    check_settings(args.steps, args.warmup, args.scaling, eval_query, eval_gallery)
    config = load_config(args.config, args.overrides)
    loaders = parse_loaders(args.loaders, config)  # before any process group: exit 2 on all ranks
    out = args.out or f"runs/bench-{config.name}"
    options = dict(
        steps=args.steps,
        warmup=args.warmup,
        loaders=loaders or "none",
        out_dir=out,
        scaling=args.scaling,
        eval_query=eval_query,
        eval_gallery=eval_gallery,
        eval_dim=args.eval_dim,
        command="hpc-reid " + shlex.join(args.argv),
    )
    if _uses_ray(args, "bench"):
        report = _bench_on_ray(args, config, options)
    else:
        report = run_bench(config, **options)
    if detect_env().rank == 0:
        print(run_markdown(report), end="")
        print(f"results: {out}/bench.json")
    return 0


def _bench_on_ray(args: argparse.Namespace, config, options: dict) -> dict:
    """``bench --launcher ray``: run_bench on N Ray Train workers (this process is not a rank)."""
    from pathlib import Path

    from hpc_reid.bench.runner import run_bench
    from hpc_reid.launch.ray_launcher import run_on_ray, worker_config

    gpus = args.gpus_per_worker or 0
    config = worker_config(config, gpus)
    out = Path(options["out_dir"]).resolve()
    return run_on_ray(
        run_bench,
        {**options, "config": config, "out_dir": str(out), "launcher": "ray"},
        num_workers=args.num_workers,
        gpus_per_worker=gpus,
        cpus_per_worker=args.cpus_per_worker or 1,
        address=args.address,
        storage_path=out,
        name="ray",
        timeout_s=config.distributed.timeout_s,
    )


def cmd_bench_summarize(args: argparse.Namespace) -> int:
    from hpc_reid.bench.report import load_runs, scaling_markdown, scaling_rows, write_scaling

    runs = load_runs(args.runs)
    paths = write_scaling(runs, args.summary_out)
    print(scaling_markdown(scaling_rows(runs)), end="")
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from hpc_reid.bench.comm_model import predict_step

    if args.params <= 0 or args.bandwidth_gbps <= 0 or args.latency_us < 0 or args.bucket_mb <= 0:
        raise ConfigError("bench model: --params, --bandwidth-gbps and --bucket-mb must be > 0")
    print(
        "| ranks | buckets | gradient MiB | all-reduce ms/step |"
        + (" / step |" if args.step_ms else "")
    )
    print("|---:|---:|---:|---:|" + ("---:|" if args.step_ms else ""))
    for world in args.world:
        if world < 1:
            raise ConfigError(f"bench model: --world must be >= 1, got {world}")
        pred = predict_step(
            int(args.params),
            world,
            args.bandwidth_gbps * 1e9 / 8,
            args.latency_us * 1e-6,
            bucket_mb=args.bucket_mb,
            bytes_per_element=args.bytes_per_element,
        )
        ratio = f" {1e3 * pred.seconds / args.step_ms:.2f} |" if args.step_ms else ""
        print(
            f"| {world} | {pred.buckets} | {pred.gradient_bytes / 2**20:.1f} "
            f"| {1e3 * pred.seconds:.2f} |{ratio}"
        )
    return 0


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure training/loader/evaluation throughput and communication on every rank",
        description="`hpc-reid bench --config C` under any launcher writes OUT/bench.json; "
        "`bench summarize RUN...` writes the scaling table and plot; `bench model` predicts "
        "all-reduce time per step (bench/COMM_MODEL.md).",
    )
    _add_config_args(bench, required=False)
    bench.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps before each phase")
    bench.add_argument(
        "--loaders",
        help="comma-separated loader backends: dali,torch,auto or none "
        "(default: the config's loader.backend)",
    )
    bench.add_argument("--out", help="folder for bench.json (default runs/bench-<config name>)")
    bench.add_argument(
        "--scaling",
        choices=["weak", "strong"],
        default="weak",
        help="weak: P per rank as configured; strong: P divided by the world size",
    )
    bench.add_argument(
        "--eval-size",
        default="3368,15913",
        metavar="Q,G",
        help="random query,gallery features for the evaluation timing (0,0 skips it)",
    )
    bench.add_argument("--eval-dim", type=int, help="feature dimension (default: the model's)")
    _add_launcher_args(bench, "benchmark", failures=False)
    bench.set_defaults(func=cmd_bench)
    actions = bench.add_subparsers(dest="bench_command", metavar="ACTION")
    summarize = actions.add_parser(
        "summarize", help="scaling.json/.md/.png from several runs' bench.json"
    )
    summarize.add_argument("runs", nargs="+", help="bench.json files or folders holding one")
    summarize.add_argument("--out", dest="summary_out", required=True, help="output folder")
    summarize.set_defaults(func=cmd_bench_summarize)
    model = actions.add_parser("model", help="predict DDP all-reduce time per step")
    model.add_argument("--params", type=float, required=True, help="parameters, e.g. 25.6e6")
    model.add_argument("--world", type=int, nargs="+", required=True, help="ranks (several ok)")
    model.add_argument("--bandwidth-gbps", type=float, required=True, help="link Gbit/s")
    model.add_argument("--latency-us", type=float, default=10.0, help="per all-reduce call")
    model.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb")
    model.add_argument("--bytes-per-element", type=int, default=4, help="gradient dtype size")
    model.add_argument("--step-ms", type=float, help="compute time per step, for the ratio")
    model.set_defaults(func=cmd_bench_model)


def cmd_tune(args: argparse.Namespace) -> int:
    from hpc_reid.tune.runner import SearchSettings, prepare, run_search
    from hpc_reid.tune.space import read_space

    if not args.config:
        raise ConfigError("tune: give --config FILE (the experiment to search over)")
    config = load_config(args.config, args.overrides)
    settings = space_raw = None
    if not args.resume:
        if not args.space or args.trials is None:
            raise ConfigError("tune: give --space FILE and --trials N (or --resume)")
        space_raw = read_space(args.space)
        settings = SearchSettings(
            trials=args.trials,
            concurrent=args.concurrent,
            objective=args.objective,
            seed=args.seed,
            cpus_per_trial=args.cpus_per_trial,
            workers_per_trial=args.workers_per_trial,
            early_stopping=not args.no_early_stopping,
            init_trials=args.init_trials,
        )
    folder, base, space, settings, setup = prepare(
        config, space_raw, args.space or "", settings, args.name, args.resume
    )
    out = run_search(folder, base, space, settings, setup, address=args.address, resume=args.resume)
    _print_search(out)
    return 0


def _print_search(out: dict) -> None:
    from hpc_reid.tune.report import format_table

    best = out["best"]
    print(f"\nsearch {out['folder']}: {len(out['rows'])} trial(s)")
    print(format_table(out["rows"], best), end="")
    if best is None:
        print("no trial completed: no best.yaml")
    else:
        print(f"best: trial {best['trial']}, objective {best['objective']:.4f}")
        print(f"best config: {out['best_yaml']} (hpc-reid train --config {out['best_yaml']})")
    for key in ("results", "progress", "params", "ax_experiment"):
        print(f"{key}: {out[key]}")


def _add_tune_parser(commands) -> None:
    tune = commands.add_parser(
        "tune",
        help="Bayesian hyperparameter search (Ax) over training runs, on Ray Tune",
        description="Each trial trains the config with values Ax suggests from the search space; "
        "ASHA stops weak trials early. Outputs go to <logging.output_dir>/tune/<name>.",
    )
    _add_config_args(tune, required=False)
    tune.add_argument("--space", help="search space YAML, e.g. configs/search/bot_synthetic.yaml")
    tune.add_argument("--trials", type=int, help="trials in all")
    tune.add_argument("--concurrent", type=int, default=1, help="trials running at once")
    tune.add_argument(
        "--address",
        help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start Ray here)",
    )
    tune.add_argument(
        "--objective",
        choices=["map", "mean", "rank1"],
        default="map",
        help="maximise mAP; rank1: rank-1 (the fine-grained ReID search on CUHK01, iLIDS, PRID); "
        "or mean: (rank-1 + mAP) / 2",
    )
    tune.add_argument("--name", help="search folder name (default: the config's name)")
    tune.add_argument(
        "--resume", action="store_true", help="continue the interrupted search of that name"
    )
    tune.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial process")
    tune.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        help="training processes per trial (more than 1: Ray Train workers)",
    )
    tune.add_argument("--seed", type=int, default=0, help="Ax's seed (suggestions)")
    tune.add_argument(
        "--init-trials", type=int, help="quasi-random trials before BO (default: Ax's choice)"
    )
    tune.add_argument(
        "--no-early-stopping", action="store_true", help="no ASHA: every trial runs to its end"
    )
    tune.set_defaults(func=cmd_tune)


def cmd_visualize_attention(args: argparse.Namespace) -> int:
    from hpc_reid.visualize import attention_figure

    path = attention_figure(
        args.checkpoint, args.out, args.split, args.num, _checkpoint_config(args)
    )
    print(f"wrote {path}")
    return 0


def cmd_visualize_tsne(args: argparse.Namespace) -> int:
    from hpc_reid.visualize import tsne_figure

    path = tsne_figure(
        args.checkpoint,
        args.out,
        args.split,
        args.max_ids,
        centers=not args.no_centers,
        config=_checkpoint_config(args),
        seed=args.seed,
    )
    print(f"wrote {path}")
    return 0


def cmd_visualize_textures(args: argparse.Namespace) -> int:
    from hpc_reid.visualize import texture_figure

    path, titles = texture_figure(
        args.checkpoint, args.out, args.split, args.num, _checkpoint_config(args)
    )
    print(f"wrote {path} (columns: {', '.join(titles)})")
    return 0


def _add_visualize_parser(commands) -> None:
    visualize = commands.add_parser(
        "visualize",
        help="pictures of a checkpoint: attention maps, a t-SNE of features and centers, "
        "decoded textures (PNG)",
        description="Drawn on one process (a torchrun/srun launch is refused), with the config "
        "the checkpoint stores, or --config; --set overrides either.",
    )
    pictures = visualize.add_subparsers(dest="picture", required=True, metavar="PICTURE")
    attention = pictures.add_parser(
        "attention",
        help="the model's attention map over images of a split (a head with an 'attention' "
        "output: fgreid)",
        description="OUT/attention_SPLIT.png: --num images spread over the split, a row of the "
        "inputs above a row with the map (upsampled, min-max scaled, jet, alpha 0.5) over them; "
        "for tracklets one row per tracklet, the T frames of its first clip.",
    )
    tsne = pictures.add_parser(
        "tsne",
        help="a 2-D t-SNE of features of a few identities with their center-loss centers",
        description="OUT/tsne_SPLIT.png: the features of the first --max-ids identities (for "
        "query and gallery, of those with a query), coloured by identity, and their center-loss "
        "centers (train split only; the features are then the center loss's input, the global "
        "output) fitted in the same seeded t-SNE.",
    )
    textures = pictures.add_parser(
        "textures",
        help="a SAN decoder's textures of images of a split beside the true ones (model.head: san)",
        description="OUT/textures_SPLIT.png: --num images spread over the split, a row each: the "
        "input as the model saw it, the texture its decoder gives it, the true texture where the "
        "data set has them (the synthetic set; black for an image of no identity), then the "
        "pseudo texture the run trained on (data.textures.kind: pseudo); textures magnified by "
        "an integer factor to the input's height. The column titles are printed.",
    )
    for p, split in ((attention, "query"), (tsne, "train"), (textures, "query")):
        p.add_argument("--checkpoint", required=True, help="a checkpoint, run or folder")
        p.add_argument("--out", required=True, help="folder for the PNG")
        p.add_argument(
            "--split", choices=["train", "query", "gallery"], default=split, help=f"({split})"
        )
        _add_config_args(p, required=False)
    attention.add_argument("--num", type=int, default=8, help="images or tracklets drawn (8)")
    attention.set_defaults(func=cmd_visualize_attention)
    textures.add_argument("--num", type=int, default=6, help="images drawn (6)")
    textures.set_defaults(func=cmd_visualize_textures)
    tsne.add_argument("--max-ids", type=int, default=20, help="identities drawn (20)")
    tsne.add_argument(
        "--no-centers", action="store_true", help="the retrieval features alone, no centers"
    )
    tsne.add_argument("--seed", type=int, default=0, help="t-SNE's seed")
    tsne.set_defaults(func=cmd_visualize_tsne)


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """A data set named on the command line (--dataset, --root, --option) or by --config."""
    parser.add_argument("--dataset", help=f"one of: {', '.join(available_datasets())}")
    parser.add_argument("--root", help="data set folder")
    parser.add_argument(
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data set option, e.g. --option split_id=3",
    )
    _add_config_args(parser, required=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-reid",
        description="Distributed HPC training toolkit for person re-identification.",
    )
    # the deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK, which is what we read)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train and evaluate a model")
    _add_config_args(train)
    train.add_argument(
        "--resume", metavar="auto|PATH", help="continue from the run's newest or a given checkpoint"
    )
    train.add_argument(
        "--then",
        action="append",
        default=[],
        metavar="CONFIG",
        help="a next stage (repeatable: stage 3, ...), trained after --config in this launch, in "
        "its own run folder, from the previous stage's final checkpoint unless its "
        "model.init_from names one; --set applies to every stage, --max-steps to each stage's "
        "own steps; with --resume auto finished stages are skipped",
    )
    train.add_argument(
        "--max-steps",
        type=int,
        help="stop after this global step (checkpointed); with --then, of each stage, and a "
        "stage that stops ends the chain",
    )
    _add_launcher_args(train, "training", failures=True)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on its test split, or HDF5 feature files",
        description="A checkpoint is evaluated with the config it stores, or --config; --set "
        "overrides either, e.g. --set evaluation.flip_average=true.",
    )
    evaluate.add_argument("--checkpoint", help="a checkpoint written by train")
    evaluate.add_argument("--out", help="folder for results.json (and plots, for a checkpoint)")
    _add_config_args(evaluate, required=False)
    evaluate.add_argument(
        "--draws",
        type=int,
        metavar="N",
        help="evaluate test draws data.options.split_id 0..N-1 of a protocol that redraws only "
        "its gallery (VehicleID: 10), each into OUT/draw_S, and write their mean and std "
        "(default OUT: eval_draws/ beside the checkpoint's run folder)",
    )
    evaluate.add_argument("--query-features", help="query.h5 written by extract")
    evaluate.add_argument("--gallery-features", help="gallery.h5 written by extract")
    evaluate.add_argument(
        "--metric", choices=["cosine", "euclidean"], help="default: the files' metric attribute"
    )
    evaluate.add_argument(
        "--distance",
        help="feature files: their retrieval parts joined by '+' (global, local, global+local); "
        "default: the files' distance attribute, else global (a checkpoint: --set "
        "evaluation.distance=...)",
    )
    evaluate.add_argument(
        "--distance-weight",
        action="append",
        metavar="PART=W",
        help="weight of a part of --distance (repeatable; default 1 each)",
    )
    evaluate.add_argument("--max-rank", type=int, default=50, help="CMC length")
    evaluate.add_argument("--query-tile", type=int, default=1024, help="queries per tile")
    evaluate.add_argument(
        "--gallery-chunk", type=int, default=65536, help="gallery rows read at a time"
    )
    evaluate.set_defaults(func=cmd_eval)

    extract = commands.add_parser(
        "extract",
        help="write a checkpoint's query and gallery features to HDF5",
        description="Every retrieval part the model declares (AlignedReID: global and local), "
        "with their layout; for a video set one row per tracklet, the mean of its dense clips' "
        "(data.video). With the config the checkpoint stores, or --config; --set overrides "
        "either.",
    )
    extract.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
    extract.add_argument("--out-dir", required=True, help="folder for query.h5 and gallery.h5")
    _add_config_args(extract, required=False)
    extract.set_defaults(func=cmd_extract)

    textures = commands.add_parser(
        "textures",
        help="SAN-PG's pseudo textures for every image of a data set (SAN's targets)",
        description="Runs a checkpoint with a SAN head (SAN-PG, configs/synthetic/san_pg.yaml) "
        "on every train/query/gallery image of --config's data set, resized to the size it was "
        "trained at, and writes one texture per image into --out (a folder mirroring the image "
        "names, or an .h5 file; one file a rank when launched on several), which "
        "data.textures: {kind: pseudo, root: OUT} reads. Textures already written are skipped, "
        "so a rerun continues; then a preview figure beside --out.",
    )
    textures.add_argument("--checkpoint", required=True, help="SAN-PG: a run, folder or file")
    textures.add_argument("--out", required=True, help="a folder, or a .h5 file")
    textures.add_argument(
        "--preview", type=int, default=6, help="(image, texture) pairs drawn; 0: none"
    )
    _add_config_args(textures, required=True)
    textures.set_defaults(func=cmd_textures)

    export = commands.add_parser(
        "export-weights",
        help="consolidate a (DeepSpeed ZeRO or DDP) checkpoint into a model-only checkpoint",
    )
    export.add_argument("checkpoint", help="a checkpoint written by train")
    export.add_argument("--out", required=True, help="the model-only checkpoint to write")
    export.set_defaults(func=cmd_export_weights)
    _add_export_parser(commands)  # issue 22: hpc-reid export (ONNX, TorchScript)

    _add_bench_parser(commands)
    _add_tune_parser(commands)
    _add_visualize_parser(commands)
    from hpc_reid.deploy.commands import add_index_and_search  # issue 22: index and search

    add_index_and_search(commands)

    config = commands.add_parser("config", help="inspect experiment configs")
    config_cmds = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_cmds.add_parser("show", help="print the resolved config")
    show.add_argument("file", help="experiment YAML")
    add_overrides(show)
    show.set_defaults(func=cmd_config_show)

    data = commands.add_parser("data", help="data sets: synthesise, inspect, pack")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synth = data_cmds.add_parser(
        "synth", help="write a synthetic Market-1501-format (or MARS-format tracklet) data set"
    )
    synth.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    synth.add_argument(
        "--tracklets", action="store_true", help="MARS-layout tracklets of walking people"
    )
    synth.add_argument(
        "--ids", type=int, help="identities, half train, half test (200; tracklets 60)"
    )
    synth.add_argument("--cams", type=int, default=6, help="cameras, 2..6")
    synth.add_argument("--images-per-id", type=int, help="mean images per identity (16)")
    synth.add_argument("--tracklets-per-camera", type=int, help="per identity and camera (2)")
    synth.add_argument(
        "--transit",
        action="store_true",
        help="frame numbers from identities walking round a ring of cameras (st-ReID)",
    )
    synth.add_argument(
        "--frames-per-tracklet",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="frames of a tracklet, uniform (8 16)",
    )
    synth.add_argument("--distractors", type=int, help="pid 0 gallery images (100; tracklets 6)")
    synth.add_argument("--junk", type=int, help="pid -1 gallery images (30; tracklets 4)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=1, help="processes (same bytes as 1)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    synth.set_defaults(func=cmd_data_synth)

    stats = data_cmds.add_parser("stats", help="parse a data set and print its statistics")
    _add_dataset_args(stats)
    stats.set_defaults(func=cmd_data_stats)

    pack = data_cmds.add_parser(
        "pack", help="write a data set's records and images to an HDF5 pack (or N shards)"
    )
    _add_dataset_args(pack)
    pack.add_argument("--out", required=True, help="output FILE.h5 (shards: FILE-0000k-of-N.h5)")
    pack.add_argument("--shards", type=int, default=1, help="files, images split round-robin")
    pack.add_argument(
        "--skip-corrupt", action="store_true", help="leave out (and list) undecodable images"
    )
    pack.add_argument("--overwrite", action="store_true", help="replace existing pack files")
    pack.set_defaults(func=cmd_data_pack)

    info = data_cmds.add_parser("info", help="print what an HDF5 pack holds")
    info.add_argument("file", help="a pack FILE.h5, one of its shards, or the name given to pack")
    info.set_defaults(func=cmd_data_info)

    verify = data_cmds.add_parser("verify", help="re-check every image checksum of an HDF5 pack")
    verify.add_argument("file", help="a pack FILE.h5, one of its shards, or the name given to pack")
    verify.set_defaults(func=cmd_data_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, CheckpointError, TrainingError) as exc:
        print(f"hpc-reid: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
