"""``hpc-reid tune``: an Ax search over training runs on Ray Tune."""

from __future__ import annotations

import argparse

from hpc_reid.cli.common import add_config_args
from hpc_reid.config import ConfigError, load_config


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


def add_parsers(commands) -> None:
    tune = commands.add_parser(
        "tune",
        help="Bayesian hyperparameter search (Ax) over training runs, on Ray Tune",
        description="Each trial trains the config with values Ax suggests from the search space; "
        "ASHA stops weak trials early. Outputs go to <logging.output_dir>/tune/<name>.",
    )
    add_config_args(tune, required=False)
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
