"""``hpc-reid search``: query images embedded by a model, searched in a gallery index, and per query
a ranked list (JSON) and its picture (PNG).

The model is a checkpoint (a run folder or file), run as extract runs it: ``saved_model`` with the
config it stores (or ``--config``/``--set``), ``evaluation.flip_average``, and extract's own test
loader (``loader.backend``: DALI's resize where DALI is installed, else the torch loader's test
transform), so that a query's row is the one ``hpc-reid extract`` would have written for it (a
video model's query is a tracklet of its one frame); or an ONNX file from ``hpc-reid export``
(:mod:`hpc_reid.export`), run by onnxruntime on the CPU, whose metadata gives the input size,
mean/std and feature names (images prepared by the test transform: PIL bilinear resize). Either
gives the row of the part the index holds (:mod:`~hpc_reid.deploy.index`, "global" by default).

Per query ``OUT/<stem>.json``: the query, the model, the index and per rank the gallery ``path``,
``pid`` (null where the gallery's is negative: junk, no identity), ``camid``, the index ``row`` and
the ``distance`` in the evaluation's convention (cosine: 1 - cos; euclidean: ||q - g||; ivf-pq's
are approximate), nearest first; ``OUT/<stem>.png``: the query (blue frame) and its top-k gallery
images in :mod:`hpc_reid.evaluation.plots`' cells (grey frames: a query's identity is unknown),
each captioned with its rank, distance, pid and camera.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from hpc_reid.atomic import write_atomic
from hpc_reid.config import Config
from hpc_reid.data.datasets.base import IMAGE_SUFFIXES, image_folder
from hpc_reid.data.packed import image_file
from hpc_reid.data.transforms import resize_to_tensor
from hpc_reid.deploy.index import GalleryIndex, GalleryIndexError, open_index
from hpc_reid.evaluation.plots import BORDER, CELL_HEIGHT, CELL_WIDTH, GAP, PAD, QUERY_COLOUR

__all__ = [
    "IMAGE_SUFFIXES",
    "QueryEncoder",
    "SearchError",
    "checkpoint_encoder",
    "model_encoder",
    "query_paths",
    "ranked_picture",
    "search_images",
]

GALLERY_COLOUR = (150, 150, 150)
CAPTION = 26  # pixels of text under each cell: rank and distance, then pid and camera


class SearchError(ValueError):
    """A query, model or index that cannot be searched as asked."""


@dataclass
class QueryEncoder:
    """Query images to index rows: ``embed(paths)`` gives (len(paths), dim) float32 rows of the
    indexed part; ``description`` names the model in the outputs."""

    dim: int
    embed: Callable[[Sequence[Path]], np.ndarray]
    description: str


def resized_images(
    paths: Sequence[Path],
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """(N, 3, height, width) float32 images as the test transform
    (:class:`~hpc_reid.data.transforms.TestTransform`) gives them: bilinear resize, [0, 1],
    ``(x - mean) / std``; a file that is not an image is an error naming it."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                pixels = resize_to_tensor(im.convert("RGB"), height, width)
        except (UnidentifiedImageError, OSError) as exc:
            raise SearchError(f"query {path} is not an image PIL can read: {exc}") from None
        out.append(pixels.float().div_(255.0).sub_(mean_t).div_(std_t))
    return torch.stack(out)


def query_paths(
    images: Sequence[str | Path] = (), query_dir: str | Path | None = None
) -> list[Path]:
    """The query files: ``images`` as given, or the image files (by suffix, ``IMAGE_SUFFIXES``)
    directly in ``query_dir``, sorted by name; each must exist and open as an image (a header
    check), and there must be one."""
    if bool(images) == (query_dir is not None):
        raise SearchError("search: give query images with --image, or a folder with --query-dir")
    if query_dir is not None:
        paths = image_folder(Path(query_dir), "--query-dir", SearchError)
    else:
        paths = [Path(p) for p in images]
    for p in paths:  # before any model is loaded: a file that is not an image fails fast
        if not p.is_file():
            raise SearchError(f"query image {p} does not exist")
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise SearchError(f"query {p} is not an image PIL can read: {exc}") from None
    return paths


@contextlib.contextmanager
def checkpoint_encoder(
    path: str | Path, part: str = "global", config: Config | None = None
) -> Iterator[QueryEncoder]:
    """The checkpoint's model as a :class:`QueryEncoder` of retrieval part ``part``, as
    evaluation extracts it (module docstring); one process (a launch of several is refused)."""
    from hpc_reid.data.datasets.base import ImageRecord, TrackletRecord
    from hpc_reid.data.loaders import build_backend_test_loader
    from hpc_reid.engine.saved import saved_model
    from hpc_reid.evaluation.features import extract_features
    from hpc_reid.evaluation.parts import probe_layout, takes_clips

    with saved_model(path, config) as (config, env, device, _, model):
        if env.world_size > 1:
            raise SearchError(f"search runs in one process, launched as {env.world_size} ranks")
        height, width = config.data.height, config.data.width
        layout = probe_layout(model, height, width, device)
        if part not in layout.names:
            raise SearchError(
                f"checkpoint {path} has no retrieval part {part!r} (it declares "
                f"{', '.join(layout.names)}), which the index holds"
            )
        columns = slice(layout.part(part).start, layout.part(part).stop)
        clips = takes_clips(model)

        def embed(paths: Sequence[Path]) -> np.ndarray:
            # extract's own loader (loader.backend: DALI's resize where installed, else the
            # torch loader's TestTransform), so a query's row is the one extract would write; a
            # video model's query is a tracklet of that one frame
            records = [
                TrackletRecord((str(p),), 0, 0) if clips else ImageRecord(str(p), 0, 0)
                for p in paths
            ]
            loader = build_backend_test_loader(
                records, config.loader, height, width, device, config.data.video
            )
            rows, _, _ = extract_features(
                model, loader, device, flip=config.evaluation.flip_average
            )
            return rows[:, columns].cpu().numpy()

        flip = " (flip-averaged)" if config.evaluation.flip_average else ""
        yield QueryEncoder(
            columns.stop - columns.start, embed, f"checkpoint {Path(path).resolve()}{flip}"
        )


@contextlib.contextmanager
def model_encoder(
    path: str | Path, part: str = "global", config: Config | None = None
) -> Iterator[QueryEncoder]:
    """An ONNX file (``.onnx``) or a checkpoint as a :class:`QueryEncoder` of part ``part``."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if config is not None:
            raise SearchError("--config and --set apply to a checkpoint, not an ONNX model")
        yield onnx_encoder(path, part)
        return
    with checkpoint_encoder(path, part, config) as encoder:
        yield encoder


def onnx_encoder(path: Path, part: str = "global") -> QueryEncoder:
    """An ONNX model from ``hpc-reid export`` as a :class:`QueryEncoder`: its metadata's input
    size (images resized bilinearly, RGB in [0, 1]; normalisation and flip-averaging are inside
    the graph), its output named ``part``; a clip model's query is its one frame repeated T
    times, the dense clip of a one-frame tracklet. Run by onnxruntime on the CPU."""
    from hpc_reid.export import exported_runner, read_metadata

    meta = read_metadata(path)
    outputs = {o["name"]: o for o in meta.get("outputs", [])}
    if part not in outputs:
        raise SearchError(
            f"ONNX model {path} has no output {part!r} (its outputs: {', '.join(outputs)}), the "
            "retrieval part the index holds"
        )
    names = list(outputs)
    dim = math.prod(outputs[part]["shape"][1:])
    height, width, frames = meta["height"], meta["width"], meta.get("clip_length")
    run = exported_runner(path, "onnx")
    step = 64 if meta.get("dynamic_batch") else 1  # a static graph takes one image (N = 1)

    def embed(paths: Sequence[Path]) -> np.ndarray:
        rows = []
        for start in range(0, len(paths), step):
            images = resized_images(
                paths[start : start + step], height, width, (0.0,) * 3, (1.0,) * 3
            )
            if frames:
                images = images.unsqueeze(1).expand(-1, frames, -1, -1, -1).contiguous()
            rows.append(run(images)[names.index(part)].reshape(len(images), dim))
        return np.concatenate(rows).astype(np.float32)

    source = meta.get("checkpoint")
    return QueryEncoder(dim, embed, f"ONNX model {path.resolve()} (from {source})")


def search_images(
    encoder: QueryEncoder,
    index: GalleryIndex,
    queries: Sequence[Path],
    top: int,
    out_dir: str | Path,
    picture: bool = True,
) -> list[Path]:
    """Search ``index`` for each query and write its JSON (and PNG); returns the JSON paths."""
    if encoder.dim != index.dim:
        part = index.settings["part"]["name"]
        raise SearchError(
            f"the model gives {encoder.dim}-d features of part {part!r} ({encoder.description}); "
            f"the index {index.path} holds {index.dim}-d rows (from {index.settings['features']}):"
            " use the model whose gallery features were indexed"
        )
    if top < 1:
        raise SearchError(f"--top {top}: expected >= 1")
    out = Path(out_dir)
    names = _output_names(queries)
    rows = encoder.embed(queries)  # one loader over every query (a DALI pipeline is built once)
    distances, found = index.search(rows, top)
    written = []
    for q, path in enumerate(queries):
        keep = found[q] >= 0  # IVF visits nprobe cells, which may hold fewer than top rows
        record = _ranked_list(encoder, index, path, found[q][keep], distances[q][keep])
        written.append(write_atomic(out / f"{names[q]}.json", json.dumps(record, indent=2) + "\n"))
        if picture:
            ranked_picture(record, out / f"{names[q]}.png")
    return written


def _output_names(queries: Sequence[Path]) -> list[str]:
    """Each query's output name: its file stem, with its position where two stems are equal."""
    stems = [p.stem for p in queries]
    counts = collections.Counter(stems)
    return [s if counts[s] == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


def _ranked_list(
    encoder: QueryEncoder, index: GalleryIndex, query: Path, rows: np.ndarray, dist: np.ndarray
) -> dict[str, Any]:
    paths, pids, camids = index.labels(rows)
    metric = index.metric
    return {
        "query": str(query.resolve()),
        "model": encoder.description,
        "index": str(index.path.resolve()),
        "gallery_features": index.settings.get("features"),
        "gallery_checkpoint": index.settings.get("features_attrs", {}).get("checkpoint"),
        "kind": index.settings["kind"],
        "metric": metric,
        "distance": "1 - cosine similarity" if metric == "cosine" else "euclidean ||q - g||",
        "results": [
            {
                "rank": r + 1,
                "path": paths[r],
                "pid": int(pids[r]) if pids[r] >= 0 else None,
                "camid": int(camids[r]),
                "row": int(rows[r]),
                "distance": float(dist[r]),
            }
            for r in range(len(rows))
        ],
    }


def _cell(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    image = image.convert("RGB").resize((CELL_WIDTH - 2 * BORDER, CELL_HEIGHT - 2 * BORDER))
    return ImageOps.expand(image, border=BORDER, fill=colour)


def ranked_picture(record: dict[str, Any], path: str | Path) -> Path:
    """A PNG of one query's ranked list (module docstring); a gallery image that cannot be
    opened is an error naming it."""
    results = record["results"]
    width = CELL_WIDTH + GAP + max(1, len(results)) * (CELL_WIDTH + PAD) - PAD
    canvas = Image.new("RGB", (width, CELL_HEIGHT + CAPTION), (255, 255, 255))
    with Image.open(record["query"]) as im:
        canvas.paste(_cell(im, QUERY_COLOUR), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, CELL_HEIGHT + 1), "query", fill=QUERY_COLOUR)
    for i, r in enumerate(results):
        x = CELL_WIDTH + GAP + i * (CELL_WIDTH + PAD)
        try:
            with Image.open(image_file(r["path"])) as im:
                canvas.paste(_cell(im, GALLERY_COLOUR), (x, 0))
        except (UnidentifiedImageError, OSError) as exc:
            raise SearchError(
                f"gallery image {r['path']} (index row {r['row']}) cannot be drawn: {exc}; "
                "search with --no-picture where the gallery images are elsewhere"
            ) from None
        pid = "-" if r["pid"] is None else r["pid"]
        caption = f"{r['rank']}: {r['distance']:.3f}\nid {pid} c{r['camid']}"
        draw.multiline_text((x + 2, CELL_HEIGHT + 1), caption, fill=(0, 0, 0), spacing=1)
    return write_atomic(path, lambda f: canvas.save(f, format="PNG"))


def run_search(
    model: str | Path,
    index_path: str | Path,
    queries: Sequence[Path],
    top: int,
    out_dir: str | Path,
    config: Config | None = None,
    nprobe: int | None = None,
    picture: bool = True,
) -> list[Path]:
    """``hpc-reid search``: open the index (checked before the model is loaded), then search."""
    try:
        index = open_index(index_path, nprobe)
    except GalleryIndexError as exc:
        raise SearchError(str(exc)) from None
    part = index.settings["part"]["name"]
    with model_encoder(model, part, config) as encoder:
        return search_images(encoder, index, queries, top, out_dir, picture)
