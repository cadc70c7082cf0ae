"""The ``hpc-reid`` command line: ``hpc-reid config|data ...``.

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


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="experiment YAML under configs/")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set optimizer.lr=1e-3",
    )


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
    from hpc_reid.data.synthetic import SynthSpec, generate

    spec = SynthSpec(
        ids=args.ids,
        cams=args.cams,
        images_per_id=args.images_per_id,
        distractors=args.distractors,
        junk=args.junk,
        seed=args.seed,
    )
    summary = generate(args.out, spec, workers=args.workers, overwrite=args.overwrite)
    print(f"wrote synthetic Market-1501-format data set to {args.out}")
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


def cmd_train(args: argparse.Namespace) -> int:
    from hpc_reid.engine.trainer import train
    from hpc_reid.launch.slurm import requeue_if_preempted

    result = train(
        load_config(args.config, args.overrides), resume=args.resume, max_steps=args.max_steps
    )
    # stopped by SIGUSR1/SIGTERM with a checkpoint: under SLURM, rank 0 requeues the job
    requeue_if_preempted(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hpc_reid.engine.trainer import evaluate_checkpoint

    if args.query_features or args.gallery_features:
        return _eval_feature_files(args)
    if not args.checkpoint:
        raise ConfigError("eval: give --checkpoint, or --query-features and --gallery-features")
    config = load_config(args.config, args.overrides) if args.config else None
    if args.overrides and config is None:
        raise ConfigError("eval: --set needs --config (the checkpoint's own config is used as is)")
    evaluate_checkpoint(args.checkpoint, config, args.out)
    return 0


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


def cmd_extract(args: argparse.Namespace) -> int:
    from hpc_reid.engine.extract import extract_checkpoint

    config = load_config(args.config, args.overrides) if args.config else None
    if args.overrides and config is None:
        raise ConfigError("extract: --set needs --config")
    extract_checkpoint(args.checkpoint, args.out_dir, config)
    return 0


def cmd_export_weights(args: argparse.Namespace) -> int:
    from hpc_reid.engine.deepspeed_strategy import export_weights

    print(f"wrote {export_weights(args.checkpoint, args.out)}")
    return 0


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
    train.add_argument("--max-steps", type=int, help="stop after this global step (checkpointed)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint on its test split, or HDF5 feature files"
    )
    evaluate.add_argument("--checkpoint", help="a checkpoint written by train")
    evaluate.add_argument("--out", help="folder for results.json (and plots, for a checkpoint)")
    _add_config_args(evaluate, required=False)
    evaluate.add_argument("--query-features", help="query.h5 written by extract")
    evaluate.add_argument("--gallery-features", help="gallery.h5 written by extract")
    evaluate.add_argument(
        "--metric", choices=["cosine", "euclidean"], help="default: the files' metric attribute"
    )
    evaluate.add_argument("--max-rank", type=int, default=50, help="CMC length")
    evaluate.add_argument("--query-tile", type=int, default=1024, help="queries per tile")
    evaluate.add_argument(
        "--gallery-chunk", type=int, default=65536, help="gallery rows read at a time"
    )
    evaluate.set_defaults(func=cmd_eval)

    extract = commands.add_parser(
        "extract", help="write a checkpoint's query and gallery features to HDF5"
    )
    extract.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
    extract.add_argument("--out-dir", required=True, help="folder for query.h5 and gallery.h5")
    _add_config_args(extract, required=False)
    extract.set_defaults(func=cmd_extract)

    export = commands.add_parser(
        "export-weights",
        help="consolidate a (DeepSpeed ZeRO or DDP) checkpoint into a model-only checkpoint",
    )
    export.add_argument("checkpoint", help="a checkpoint written by train")
    export.add_argument("--out", required=True, help="the model-only checkpoint to write")
    export.set_defaults(func=cmd_export_weights)

    config = commands.add_parser("config", help="inspect experiment configs")
    config_cmds = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_cmds.add_parser("show", help="print the resolved config")
    show.add_argument("file", help="experiment YAML")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=cmd_config_show)

    data = commands.add_parser("data", help="data sets: synthesise, inspect, pack")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synth = data_cmds.add_parser("synth", help="write a synthetic Market-1501-format data set")
    synth.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    synth.add_argument("--ids", type=int, default=200, help="identities, half train, half test")
    synth.add_argument("--cams", type=int, default=6, help="cameras, 2..6")
    synth.add_argument("--images-per-id", type=int, default=16, help="mean images per identity")
    synth.add_argument("--distractors", type=int, default=100, help="pid 0 gallery images")
    synth.add_argument("--junk", type=int, default=30, help="pid -1 gallery images")
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
    try:
        return args.func(args)
    except (ConfigError, DatasetError, CheckpointError, TrainingError) as exc:
        print(f"hpc-reid: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
