"""What several ``hpc-reid`` commands share: ``--config``/``--set``, a data set named on the
command line, the Ray Train launcher options, and the config a checkpoint is evaluated with."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import yaml

from hpc_reid.config import ConfigError, load_config
from hpc_reid.data.datasets import available_datasets
from hpc_reid.engine.errors import CheckpointError


def add_overrides(
    p: argparse.ArgumentParser,
    help: str = "override one config key (repeatable), e.g. --set optimizer.lr=1e-3",
) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, read as YAML and validated like a
    config file's keys (also the bench scripts' ``--set``)."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="experiment YAML under configs/")
    add_overrides(p)


def parse_options(pairs: Sequence[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--option {pair!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


RAY_OPTIONS = ("num_workers", "gpus_per_worker", "cpus_per_worker", "address", "max_failures")


def add_launcher_args(parser: argparse.ArgumentParser, ranks: str, failures: bool) -> None:
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


def uses_ray(args: argparse.Namespace, command: str) -> bool:
    """Whether ``command`` runs on Ray Train workers (``--launcher ray``, checked: this process
    drives the workers, it is not a rank); Ray options without it are an error."""
    if args.launcher != "ray":
        given = [
            f"--{o.replace('_', '-')}" for o in RAY_OPTIONS if getattr(args, o, None) is not None
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


def checkpoint_config(args: argparse.Namespace, always: bool = False):
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


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
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
    add_config_args(parser, required=False)
