"""``hpc-reid visualize attention|tsne|textures``: pictures of a checkpoint."""

from __future__ import annotations

import argparse

from hpc_reid.cli.common import add_config_args, checkpoint_config


def cmd_visualize_attention(args: argparse.Namespace) -> int:
    from hpc_reid.visualize import attention_figure

    path = attention_figure(
        args.checkpoint, args.out, args.split, args.num, checkpoint_config(args)
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
        config=checkpoint_config(args),
        seed=args.seed,
    )
    print(f"wrote {path}")
    return 0


def cmd_visualize_textures(args: argparse.Namespace) -> int:
    from hpc_reid.visualize import texture_figure

    path, titles = texture_figure(
        args.checkpoint, args.out, args.split, args.num, checkpoint_config(args)
    )
    print(f"wrote {path} (columns: {', '.join(titles)})")
    return 0


def add_parsers(commands) -> None:
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
        add_config_args(p, required=False)
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
