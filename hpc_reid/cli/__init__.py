"""The ``hpc-reid`` command line: ``hpc-reid config|data|train|eval|bench|tune ...``.

Run as ``hpc-reid ...`` or ``python -m hpc_reid.cli ...`` (the form torchrun and srun launch).
Errors in user input (config keys, data set folders) end with exit code 2 and one clear message,
not a traceback. Each module here holds a group of commands and adds their parsers
(``add_parsers``); :mod:`hpc_reid.cli.common` what they share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hpc_reid.cli import bench, data, export, run, tune, visualize
from hpc_reid.cli.common import add_overrides, checkpoint_config
from hpc_reid.config import ConfigError
from hpc_reid.data.datasets import DatasetError
from hpc_reid.engine.errors import CheckpointError, TrainingError

__all__ = ["add_overrides", "build_parser", "checkpoint_config", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-reid",
        description="Distributed HPC training toolkit for person re-identification.",
    )
    # the deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK, which is what we read)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parsers(commands)  # train, eval, extract, textures
    export.add_parsers(commands)  # export-weights, export (issue 22)
    bench.add_parsers(commands)
    tune.add_parsers(commands)
    visualize.add_parsers(commands)
    from hpc_reid.deploy.commands import add_index_and_search  # issue 22: index and search

    add_index_and_search(commands)
    data.add_parsers(commands)  # config, data
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, CheckpointError, TrainingError) as exc:
        print(f"hpc-reid: error: {exc}", file=sys.stderr)
        return 2
