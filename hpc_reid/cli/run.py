"""``hpc-reid train|eval|extract|textures``: training (one process, torchrun, srun or Ray) and
what runs a checkpoint."""

from __future__ import annotations

import argparse
import sys

from hpc_reid.cli.common import add_config_args, add_launcher_args, checkpoint_config, uses_ray
from hpc_reid.config import ConfigError, load_config


def cmd_train(args: argparse.Namespace) -> int:
    from hpc_reid.engine.trainer import train
    from hpc_reid.launch.slurm import requeue_if_preempted

    if uses_ray(args, "train"):
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
    from hpc_reid.engine.saved import evaluate_checkpoint

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

        config = _with_run_histogram(args.checkpoint, checkpoint_config(args, always=True))
        run_dir = resolve_checkpoint(args.checkpoint).resolve().parent.parent
        evaluate_draws(args.checkpoint, config, args.draws, args.out or run_dir / "eval_draws")
        return 0
    config = _with_run_histogram(args.checkpoint, checkpoint_config(args))
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


def _eval_feature_files(args: argparse.Namespace) -> int:
    """``eval --query-features q.h5 --gallery-features g.h5``: streamed, bounded memory."""
    import json
    from pathlib import Path

    from hpc_reid.atomic import write_atomic
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

    extract_checkpoint(args.checkpoint, args.out_dir, checkpoint_config(args))
    return 0


def cmd_textures(args: argparse.Namespace) -> int:
    from hpc_reid.methods.san.generate import generate_textures

    data_config = load_config(args.config, args.overrides)
    generate_textures(args.checkpoint, data_config, args.out, preview=args.preview)
    return 0


def add_parsers(commands) -> None:
    """``train``, ``eval``, ``extract`` and ``textures``."""
    train = commands.add_parser("train", help="train and evaluate a model")
    add_config_args(train)
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
    add_launcher_args(train, "training", failures=True)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on its test split, or HDF5 feature files",
        description="A checkpoint is evaluated with the config it stores, or --config; --set "
        "overrides either, e.g. --set evaluation.flip_average=true.",
    )
    evaluate.add_argument("--checkpoint", help="a checkpoint written by train")
    evaluate.add_argument("--out", help="folder for results.json (and plots, for a checkpoint)")
    add_config_args(evaluate, required=False)
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
    add_config_args(extract, required=False)
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
    add_config_args(textures, required=True)
    textures.set_defaults(func=cmd_textures)
