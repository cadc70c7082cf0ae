"""``hpc-reid textures``: SAN-PG's pseudo ground-truth textures for every image of a data set.

SAN (Jin et al., AAAI 2020, Sec. 3.3) has no texture for real images; it trains the same
encoder-decoder with the reconstruction loss only (SAN-PG) on synthetic (person image, texture)
pairs and runs it on the real set's images, whose outputs become the targets of SAN's texture
loss. Here SAN-PG is any checkpoint with a SAN head (``configs/synthetic/san_pg.yaml``), and the
data set is any registered one (``--config``'s ``data`` section).

Every image of the data set's train, query and gallery splits (each path once) gets one texture,
written by :class:`~hpc_reid.methods.san.textures.TextureWriter` into a folder mirroring the
images or an HDF5 file, keyed by :func:`~hpc_reid.methods.san.textures.image_key`, which
``data.textures: {kind: pseudo, root: OUT}`` reads. The images are resized to the size SAN-PG was
trained at (its checkpoint's ``data.height`` x ``data.width``: the released generator resizes to
128 x 64 likewise) with the test transform. On several ranks each takes its contiguous shard of
the sorted keys (an HDF5 output then has one file a rank, read back as one). A texture already
written is skipped, so an interrupted run continues; every file is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpc_reid.config import Config
from hpc_reid.data.build import dataset_root
from hpc_reid.data.datasets import ImageRecord
from hpc_reid.data.loaders import build_backend_test_loader
from hpc_reid.evaluation.sharded import shard_range
from hpc_reid.methods.san.model import decoding
from hpc_reid.methods.san.textures import (
    PseudoTextures,
    TextureWriter,
    decode_texture,
    image_key,
    texture_or_black,
    true_textures,
)
from hpc_reid.models import inferring

TITLES = ("image", "SAN-PG texture", "true texture")


def to_uint8(texture: torch.Tensor) -> np.ndarray:
    """Decoded textures (B, 3, H, W) in the targets' [-1, 1] units -> (B, H, W, 3) uint8, the
    inverse of the targets' normalisation (x / 255 - 0.5) / 0.5, clipped (the decoder has no
    tanh)."""
    pixels = (texture.float() * 0.5 + 0.5).mul(255.0).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generator_config(checkpoint_config: dict[str, Any], data_config: Config) -> Config:
    """The SAN-PG checkpoint's config with ``data_config``'s data set and loader: the images are
    read as ``data_config`` says, resized to the size SAN-PG was trained at, with no targets."""
    stored = Config.model_validate(checkpoint_config)
    data = data_config.data.model_copy(
        update={
            "height": stored.data.height,
            "width": stored.data.width,
            "textures": data_config.data.textures.model_copy(update={"kind": "none"}),
        }
    )
    return stored.model_copy(update={"data": data, "loader": data_config.loader})


def all_images(dataset) -> list[ImageRecord]:
    """Every image of the train, query and gallery splits, each path once, in split order."""
    seen: set[str] = set()
    out = []
    for record in [*dataset.train, *dataset.query, *dataset.gallery]:
        if record.path not in seen:
            seen.add(record.path)
            out.append(record)
    return out


def write_textures(
    model: torch.nn.Module,
    records: Sequence[ImageRecord],
    keys: Sequence[str],
    config: Config,
    device: torch.device,
    writer: TextureWriter,
) -> int:
    """Decode and write the texture of every record whose key the writer lacks; returns how
    many were written. The model decodes in eval mode (:func:`decoding`)."""
    todo = [(r, k) for r, k in zip(records, keys, strict=True) if not writer.exists(k)]
    if not todo:
        return 0
    loader = build_backend_test_loader(
        [r for r, _ in todo], config.loader, config.data.height, config.data.width, device
    )
    done = 0
    with decoding(model), inferring(model):
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True)
            for texture in to_uint8(model(images)["texture"]):
                writer.write(todo[done][1], texture)
                done += 1
    if done != len(todo):
        raise RuntimeError(f"the loader yielded {done} images of {len(todo)}")
    return done


def generate_textures(
    checkpoint: str | Path, data_config: Config, out: str | Path, preview: int = 6
) -> dict[str, Any]:
    """Write SAN-PG's texture of every image of ``data_config``'s data set into ``out`` (a folder,
    or an ``.h5`` file), on every launched rank; the main process then draws ``preview`` (image,
    texture) pairs beside it. Returns counts and paths (the same on every rank)."""
    from hpc_reid.engine.checkpoint import load_checkpoint
    from hpc_reid.engine.saved import saved_model

    out = Path(out)
    config = generator_config(load_checkpoint(checkpoint)["config"], data_config)
    with saved_model(checkpoint, config) as (config, env, device, dataset, model):
        root = dataset_root(config.data, announce=lambda _: None)[1]
        records = sorted(all_images(dataset), key=lambda r: image_key(r.path, root))
        keys = [image_key(r.path, root) for r in records]
        part = shard_range(len(records), env.rank, env.world_size)
        attrs = {"checkpoint": str(Path(checkpoint).resolve()), "dataset": config.data.dataset}
        attrs["size"] = list(config.model.san.texture_size)
        with TextureWriter(out, env.rank, env.world_size, attrs=attrs) as writer:
            shard = slice(part.start, part.stop)
            written = write_textures(model, records[shard], keys[shard], config, device, writer)
        counts = torch.tensor([written, len(part)], dtype=torch.long)
        if dist.is_initialized():
            dist.all_reduce(counts)  # also: every shard is closed before the preview reads them
        summary = {
            "images": len(records),
            "written": int(counts[0]),
            "skipped": int(counts[1] - counts[0]),
            "out": str(out),
        }
        if env.rank == 0:
            if preview:
                every = records[:: max(1, len(records) // preview)][:preview]
                summary["preview"] = str(draw_preview(every, root, out, config))
            print(json.dumps(summary))
        return summary


def preview_path(out: Path) -> Path:
    """Beside the textures: ``OUT/preview.png`` for a folder, ``STEM_preview.png`` for a file."""
    if out.suffix.lower() in (".h5", ".hdf5"):
        return out.with_name(out.stem + "_preview.png")
    return out / "preview.png"


def draw_preview(records: Sequence[ImageRecord], root: Path, out: Path, config: Config) -> Path:
    """A figure of (image, generated texture[, the true texture]) for ``records``: the true one
    where the data set is the synthetic set, whose identities have their texture maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    size = tuple(config.model.san.texture_size)
    generated = PseudoTextures(out, root)
    truth = true_textures(root)
    cols = 3 if truth is not None else 2
    fig, axes = plt.subplots(len(records), cols, figsize=(2.2 * cols, 2.2 * len(records)))
    axes = np.atleast_2d(axes)
    for row, record in zip(axes, records, strict=True):
        key = image_key(record.path, root)
        panels = [np.asarray(Image.open(record.path).convert("RGB"))]
        panels.append(decode_texture(generated.read(generated.key(record.path)), key, size))
        if truth is not None:
            panels.append(texture_or_black(truth, record.path, size))
        for ax, panel, title in zip(row, panels, TITLES[: len(panels)], strict=True):
            ax.imshow(panel)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path = preview_path(out)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
