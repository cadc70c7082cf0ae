"""``hpc-reid bench``, ``bench summarize`` and ``bench model``."""

from __future__ import annotations

import argparse

from hpc_reid.cli.common import add_config_args, add_launcher_args, uses_ray
from hpc_reid.config import ConfigError, load_config


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
    if uses_ray(args, "bench"):
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


def add_parsers(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure training/loader/evaluation throughput and communication on every rank",
        description="`hpc-reid bench --config C` under any launcher writes OUT/bench.json; "
        "`bench summarize RUN...` writes the scaling table and plot; `bench model` predicts "
        "all-reduce time per step (bench/COMM_MODEL.md).",
    )
    add_config_args(bench, required=False)
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
    add_launcher_args(bench, "benchmark", failures=False)
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
