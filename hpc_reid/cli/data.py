"""``hpc-reid config show`` and ``hpc-reid data synth|stats|pack|info|verify``."""

from __future__ import annotations

import argparse
import sys

import yaml

from hpc_reid.cli.common import add_dataset_args, add_overrides, parse_options
from hpc_reid.config import ConfigError, load_config
from hpc_reid.data.datasets import build_dataset


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
    options = parse_options(args.options)
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
    from hpc_reid.data.packed import pack_info

    print(pack_info(args.file))
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from hpc_reid.data.packed import verify_pack

    checked, bad = verify_pack(args.file, progress=sys.stderr.isatty())
    for image in bad:
        print(f"bad image: {image}")
    if bad:
        print(f"{len(bad)} of {checked} images fail their checksum", file=sys.stderr)
        return 1
    print(f"{checked} images: all checksums match")
    return 0


def add_parsers(commands) -> None:
    """``config`` and ``data``."""
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
    add_dataset_args(stats)
    stats.set_defaults(func=cmd_data_stats)

    pack = data_cmds.add_parser(
        "pack", help="write a data set's records and images to an HDF5 pack (or N shards)"
    )
    add_dataset_args(pack)
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
