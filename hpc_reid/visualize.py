"""``hpc-reid visualize``: pictures of a trained model, as PNG files written atomically.

- ``attention``: the images of a split with the model's spatial attention map over them (FGReID's
  ``attention`` output, Pathak, "Fine-Grained Re-Identification", arXiv 2011.13475, the map M that
  weighs the second trunk's features; the reference's paper figures show it the same way). The
  map (h x w) is upsampled bilinearly to the input size, min-max scaled over the image (over all
  frames of a tracklet, so its frames compare), coloured with ``jet`` and blended with alpha 1/2.
  FGReID's map lies in [1/2, 1) by construction, so an absolute colour scale would be flat.
  Images: a row of the inputs (as the model saw them: resized, denormalised) above a row of the
  overlays; tracklets: one row per tracklet, the overlays of its first clip's T frames (the first
  dense test clip, ``data.video.seq_len`` frames).
- ``tsne``: a 2-D t-SNE (van der Maaten and Hinton, JMLR 2008) of the features of up to
  ``max_ids`` identities, coloured by identity, with the center loss's centers of those identities
  (Wen et al., ECCV 2016; :mod:`hpc_reid.losses.center`) embedded in the same fit and drawn as
  crosses. The centers live in the space of the output the center loss reads (``global``), so
  with centers the features are that output (for FGReID the retrieval feature f = [F1, F2]
  itself); without them (``centers=False``), the retrieval rows evaluation ranks with. Centers are
  indexed by training label: only the train split has them. scikit-learn's t-SNE is used where
  installed (it comes with the ``ray`` extra, through ax-platform), else :func:`exact_tsne`, a
  small exact one in numpy; both seeded, so a figure is reproducible.
- ``textures``: images of a split beside the texture a SAN decoder (Jin et al., AAAI 2020;
  :mod:`hpc_reid.methods.san`) gives each, in eval mode with the decoder switched on, and the
  targets where they exist: the synthetic set's true texture of the identity, and the pseudo
  texture (SAN-PG's) a run with ``data.textures.kind: pseudo`` trained on. Textures are magnified
  by an integer factor to the input's height, pixels kept; a row per image.

All draw on one process: a launch of several ranks is refused rather than having N processes
write the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hpc_reid.atomic import write_atomic
from hpc_reid.config import Config, ConfigError
from hpc_reid.data.datasets.base import Record, are_tracklets
from hpc_reid.data.loaders import build_backend_test_loader
from hpc_reid.engine.checkpoint import load_checkpoint, resolve_checkpoint
from hpc_reid.engine.errors import CheckpointError
from hpc_reid.engine.saved import saved_model
from hpc_reid.evaluation.features import extract_features
from hpc_reid.launch.distributed import detect_env
from hpc_reid.models import inferring
from hpc_reid.models.heads import RetrievalPart

SPLITS = ("train", "query", "gallery")
ALPHA = 0.5  # the overlay's weight against the image
COLOUR_MAP = "jet"
PAD = 2  # white pixels between neighbouring cells
TSNE_SIZE = (7.0, 7.0)  # inches at 100 dpi: a 700 x 700 PNG
TSNE_DPI = 100


def refuse_several_ranks(command: str) -> None:
    """A ConfigError when launched on several ranks (torchrun, srun): a picture is drawn by one
    process, and N processes writing the same file would race."""
    env = detect_env()
    if env.world_size > 1:
        raise ConfigError(
            f"hpc-reid visualize {command} draws on one process; it was launched as rank "
            f"{env.rank} of {env.world_size} ({env.launcher}): run it without torchrun or srun"
        )


def split_records(dataset, split: str) -> list[Record]:
    """The records of ``split`` (train, query or gallery) of ``dataset``; an empty one refused."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    records = list(getattr(dataset, split))
    if not records:
        raise ConfigError(f"the {split} split of {dataset.name} is empty: nothing to draw")
    return records


# --------------------------------------------------------------------------------- attention


def spread(records: Sequence[Record], num: int) -> list[Record]:
    """``num`` records spread evenly over ``records`` (all of them when fewer), in order: a split
    is sorted by identity, so the first ``num`` would often be one person."""
    if num < 1:
        raise ConfigError(f"--num {num}: expected at least 1 image")
    n = len(records)
    if num >= n:
        return list(records)
    return [records[i * n // num] for i in range(num)]


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised inputs (N, 3, H, W) back to uint8 pixels (N, H, W, 3): the test transform's
    (x / 255 - mean) / std undone, so a picture shows what the model saw."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * s + m).mul(255.0).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def upsample(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Maps (N, h, w) to (N, height, width), bilinear with half-pixel centres
    (``align_corners=False``: a cell's value sits at its centre, the borders clamp)."""
    up = F.interpolate(maps.float()[:, None], size=(height, width), mode="bilinear")
    return up[:, 0]


def overlay(images: np.ndarray, maps: torch.Tensor, alpha: float = ALPHA) -> np.ndarray:
    """The attention ``maps`` (N, h, w) over ``images`` (N, H, W, 3) uint8: min-max scaled over
    all N together (one image, or one tracklet's frames; a constant map is 0),
    :func:`upsample`'d to H x W, coloured by :data:`COLOUR_MAP` and blended:
    round((1 - alpha) image + alpha 255 colour)."""
    from matplotlib import colormaps

    maps = maps.detach().float().cpu()
    low, span = maps.min(), maps.max() - maps.min()
    scaled = (maps - low) / span if span > 0 else torch.zeros_like(maps)
    up = upsample(scaled, *images.shape[1:3]).clamp(0, 1).numpy()
    colour = colormaps[COLOUR_MAP](up)[..., :3]
    blended = (1 - alpha) * images.astype(np.float64) + alpha * 255.0 * colour
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]]) -> Image.Image:
    """Rows of (H, W, 3) uint8 cells as one white image, every cell at the top left of its slot,
    :data:`PAD` apart: a column as wide as its widest cell, a row as tall as its tallest (a row
    may be an (n, H, W, 3) array of equal cells)."""
    cols = max(len(r) for r in rows)
    widths = [max(r[j].shape[1] for r in rows if j < len(r)) for j in range(cols)]
    heights = [max(c.shape[0] for c in r) for r in rows]
    lefts = np.concatenate([[0], np.cumsum(np.add(widths, PAD))])
    tops = np.concatenate([[0], np.cumsum(np.add(heights, PAD))])
    out = Image.new("RGB", (int(lefts[-1]) - PAD, int(tops[-1]) - PAD), "white")
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            out.paste(Image.fromarray(cell), (int(lefts[j]), int(tops[i])))
    return out


def attention_maps(
    model: nn.Module, records: Sequence[Record], config: Config, device
) -> tuple[np.ndarray, torch.Tensor]:
    """The inputs as uint8 (N, H, W, 3), or (N, T, H, W, 3) for tracklets (their first dense
    clip), and the model's eval-mode ``attention`` (N, h, w), or (N, T, h, w)."""
    if "attention" not in model.output_keys:
        raise ConfigError(
            f"the {config.model.head!r} head has no attention map: its outputs are "
            f"{', '.join(sorted(model.output_keys))}; expected a head with an 'attention' "
            "output (model.head: fgreid)"
        )
    video = config.data.video.model_copy(update={"max_clips": 1})  # a tracklet's first clip
    loader = build_backend_test_loader(
        records, config.loader, config.data.height, config.data.width, device, video
    )
    augment = config.loader.augment
    images, maps = [], []
    with inferring(model):
        for batch in loader:
            x = batch["images"].to(device)
            att = model(x).get("attention")
            if att is None or att.dim() != x.dim() - 1:
                shape = None if att is None else tuple(att.shape)
                raise ValueError(
                    f"the model's eval-mode attention for inputs {tuple(x.shape)} is {shape}; "
                    "expected (N, h, w) for images, (N, T, h, w) for tracklets"
                )
            pixels = denormalise(x.flatten(0, x.dim() - 4), augment.mean, augment.std)
            images.append(pixels.reshape(*x.shape[:-3], *pixels.shape[1:]))
            maps.append(att.float().cpu())
    return np.concatenate(images), torch.cat(maps)


def attention_rows(images: np.ndarray, maps: torch.Tensor) -> list[np.ndarray]:
    """The figure's rows: for images, the inputs then their overlays; for tracklets (5-D
    ``images``), one row of overlays per tracklet."""
    if images.ndim == 5:
        return [overlay(frames, m) for frames, m in zip(images, maps, strict=True)]
    overlays = np.stack([overlay(im[None], m[None])[0] for im, m in zip(images, maps, strict=True)])
    return [images, overlays]


def attention_figure(
    checkpoint: str | Path,
    out: str | Path,
    split: str = "query",
    num: int = 8,
    config: Config | None = None,
) -> Path:
    """``out/attention_<split>.png``: ``num`` images (tracklets) of ``split`` spread over it,
    with the attention map of the model saved at ``checkpoint`` over them (module docstring)."""
    refuse_several_ranks("attention")
    with saved_model(checkpoint, config) as (config, _, device, dataset, model):
        records = spread(split_records(dataset, split), num)
        images, maps = attention_maps(model, records, config, device)
    picture = grid(attention_rows(images, maps))
    path = Path(out) / f"attention_{split}.png"
    return write_atomic(path, lambda f: picture.save(f, format="PNG"))


# -------------------------------------------------------------------------------------- t-SNE


def checkpoint_centers(state: dict, path: str | Path) -> torch.Tensor:
    """The center loss's centers (num_classes, D) in a checkpoint's ``state``: the criterion's
    ``center.centers`` (member 0's, ``center.0.centers``, for a model of several members)."""
    criterion = state.get("criterion") or {}
    for key in ("center.centers", "center.0.centers"):
        if key in criterion:
            return criterion[key].detach().float().cpu()
    raise CheckpointError(
        f"checkpoint {path} holds no center loss state (its criterion has "
        f"{sorted(criterion) or 'nothing'}; expected center.centers, from a run with "
        "loss.center.weight > 0): pass --no-centers to draw the features alone"
    )


def tsne_identities(
    records: Sequence[Record], query: Sequence[Record], split: str, max_ids: int
) -> list[int]:
    """The identities drawn: the first ``max_ids`` in increasing id order of the train split's
    labels, or, for query and gallery, of the ids that have a query (distractors and junk have
    none, whatever pid a data set gives them)."""
    if max_ids < 1:
        raise ConfigError(f"--max-ids {max_ids}: expected at least 1 identity")
    pool = {r.pid for r in records} if split == "train" else {r.pid for r in query}
    if split == "gallery":
        pool &= {r.pid for r in records}
    return sorted(pool)[:max_ids]


@dataclass(frozen=True)
class TsnePoints:
    """What t-SNE embeds: ``rows`` (n, D) float64, the features then the centers; each row's
    identity ``pids`` (n,) and whether it is a center ``is_center`` (n,)."""

    rows: np.ndarray
    pids: np.ndarray
    is_center: np.ndarray


def tsne_points(
    features: np.ndarray,
    pids: Sequence[int],
    chosen: Sequence[int],
    centers: np.ndarray | None = None,
) -> TsnePoints:
    """The rows of ``features`` whose pid is in ``chosen`` (in their order), then, with
    ``centers`` (num_classes, D, indexed by train label), the centers of ``chosen`` in its
    order: fitted together, so features and centers share one embedding."""
    features, pids = np.asarray(features, np.float64), np.asarray(pids, np.int64)
    keep = np.isin(pids, np.asarray(chosen, np.int64))
    rows, labels = features[keep], pids[keep]
    flags = np.zeros(len(rows), bool)
    if centers is not None:
        centers = np.asarray(centers, np.float64)
        if centers.shape[1] != features.shape[1]:
            raise ValueError(
                f"the centers are {centers.shape[1]}-d, the features {features.shape[1]}-d: "
                "expected the center loss's input (the global output)"
            )
        if max(chosen) >= len(centers):
            raise ValueError(f"identity {max(chosen)} has no center of {len(centers)}")
        rows = np.concatenate([rows, centers[list(chosen)]])
        labels = np.concatenate([labels, np.asarray(chosen, np.int64)])
        flags = np.concatenate([flags, np.ones(len(chosen), bool)])
    return TsnePoints(rows, labels, flags)


def _squared_distances(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)


def conditional_probabilities(x: np.ndarray, perplexity: float, tol: float = 1e-5) -> np.ndarray:
    """t-SNE's p_j|i (van der Maaten and Hinton 2008, Eq. 1), row i: a Gaussian kernel on the
    squared distances from point i whose precision a bisection sets so that its entropy is
    log(perplexity) nats (within ``tol``); p_i|i = 0."""
    d2 = _squared_distances(np.asarray(x, np.float64))
    n = len(d2)
    target = np.log(perplexity)
    cond = np.zeros((n, n))
    for i in range(n):
        d = np.delete(d2[i], i)
        d = d - d.min()  # the shift cancels in the normalisation and keeps exp finite
        beta, low, high = 1.0, 0.0, np.inf
        for _ in range(200):
            e = np.exp(-beta * d)
            p = e / e.sum()
            entropy = -np.sum(p * np.log(np.maximum(p, 1e-300)))
            if abs(entropy - target) < tol:
                break
            if entropy > target:  # too flat: sharpen
                low = beta
                beta = beta * 2.0 if high == np.inf else (beta + high) / 2.0
            else:
                high = beta
                beta = (beta + low) / 2.0
        cond[i, np.arange(n) != i] = p
    return cond


def joint_probabilities(x: np.ndarray, perplexity: float) -> np.ndarray:
    """t-SNE's symmetric P = (p_j|i + p_i|j) / 2n (Sec. 3.1)."""
    cond = conditional_probabilities(x, perplexity)
    return (cond + cond.T) / (2.0 * len(cond))


def kl_gradient(p: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """KL(P || Q) of the Student-t similarities Q of the embedding ``y`` (n, 2), and its gradient
    4 sum_j (p_ij - q_ij) (y_i - y_j) / (1 + |y_i - y_j|^2) (van der Maaten and Hinton, Eq. 5)."""
    num = 1.0 / (1.0 + _squared_distances(y))
    np.fill_diagonal(num, 0.0)
    q = np.maximum(num / num.sum(), 1e-12)
    pq = (p - q) * num
    grad = 4.0 * (pq.sum(1)[:, None] * y - pq @ y)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask]))), grad


def exact_tsne(
    x: np.ndarray, perplexity: float = 30.0, seed: int = 0, iterations: int = 1000
) -> np.ndarray:
    """Exact t-SNE to 2-D, O(n^2) a step (a few thousand points at most): P by
    :func:`joint_probabilities`, a N(0, 1e-4) start from ``default_rng(seed)``, gradient descent
    with momentum 0.5 then 0.8, P exaggerated 12 x for the first 250 steps, per-coordinate gains
    (+0.2 / x0.8, at least 0.01) and learning rate max(n / 48, 50): the schedule of the paper and
    of scikit-learn's exact method."""
    p = np.maximum(joint_probabilities(x, perplexity), 1e-12)
    n = len(p)
    y = np.random.default_rng(seed).normal(0.0, 1e-4, (n, 2))
    update, gains = np.zeros_like(y), np.ones_like(y)
    lr = max(n / 12.0 / 4.0, 50.0)
    for step in range(iterations):
        early = step < 250
        _, grad = kl_gradient(p * 12.0 if early else p, y)
        same_sign = update * grad >= 0.0
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
        update = (0.5 if early else 0.8) * update - lr * gains * grad
        y = y + update
    return y


def embed_tsne(rows: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """A seeded 2-D t-SNE of ``rows`` (n, D): scikit-learn's where installed, else
    :func:`exact_tsne`; perplexity min(30, (n - 1) / 3). Returns (n, 2) and which ran."""
    n = len(rows)
    if n < 4:
        raise ConfigError(f"t-SNE of {n} point(s): expected at least 4 (more --max-ids)")
    perplexity = min(30.0, (n - 1) / 3.0)
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return exact_tsne(rows, perplexity, seed), "exact t-SNE (numpy)"
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(np.asarray(rows, np.float64)), "t-SNE (scikit-learn)"


def identity_colours(k: int) -> np.ndarray:
    """``k`` distinct RGBA colours: ``tab20`` up to 20 identities, ``turbo`` samples beyond."""
    from matplotlib import colormaps

    if k <= 20:
        return colormaps["tab20"](np.arange(k))
    return colormaps["turbo"](np.linspace(0.0, 1.0, k))


def plot_tsne(embedding: np.ndarray, points: TsnePoints, path: str | Path, title: str) -> Path:
    """The embedding as a PNG (700 x 700): features as dots, centers as black-edged crosses, in
    their identity's colour."""
    from matplotlib.lines import Line2D

    from hpc_reid.evaluation.plots import new_figure

    ids = np.unique(points.pids)
    colours = identity_colours(len(ids))[np.searchsorted(ids, points.pids)]
    fig = new_figure(figsize=TSNE_SIZE, dpi=TSNE_DPI)
    ax = fig.add_subplot()
    dots, crosses = ~points.is_center, points.is_center
    ax.scatter(*embedding[dots].T, c=colours[dots], s=14, alpha=0.8, linewidths=0)
    handles = [Line2D([], [], ls="", marker="o", color="grey", label="features")]
    if crosses.any():
        ax.scatter(*embedding[crosses].T, c=colours[crosses], s=160, marker="X", edgecolors="k")
        handles.append(
            Line2D([], [], ls="", marker="X", color="grey", mec="k", ms=10, label="centers")
        )
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))


class _CenterInput(nn.Module):
    """``model`` ranking with its ``global`` output (the center loss's input) instead of its
    retrieval parts, so :func:`extract_features` gives the features in the centers' space."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.retrieval_parts = {"global": RetrievalPart("global")}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)


def tsne_figure(
    checkpoint: str | Path,
    out: str | Path,
    split: str = "train",
    max_ids: int = 20,
    centers: bool = True,
    config: Config | None = None,
    seed: int = 0,
) -> Path:
    """``out/tsne_<split>.png``: the t-SNE of the features of up to ``max_ids`` identities of
    ``split`` (features flip-averaged as ``evaluation.flip_average`` says; a tracklet's the mean
    of its dense clips'), with their center-loss centers unless ``centers`` is False (module
    docstring)."""
    refuse_several_ranks("tsne")
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    table = None
    if centers:
        if split != "train":
            raise ConfigError(
                f"--split {split}: the center loss's centers are those of the training "
                "identities; draw them with --split train, or pass --no-centers"
            )
        table = checkpoint_centers(load_checkpoint(checkpoint), checkpoint).numpy()
    with saved_model(checkpoint, config) as (config, _, device, dataset, model):
        records = split_records(dataset, split)
        chosen = tsne_identities(records, dataset.query, split, max_ids)
        wanted = set(chosen)
        drawn = [r for r in records if r.pid in wanted]
        loader = build_backend_test_loader(
            drawn, config.loader, config.data.height, config.data.width, device, config.data.video
        )
        source = _CenterInput(model) if centers else model
        flip = config.evaluation.flip_average
        feats, pids, _ = extract_features(source, loader, device, flip=flip)
    points = tsne_points(feats.cpu().numpy(), pids, chosen, table)
    embedding, method = embed_tsne(points.rows, seed)
    kind = "tracklets" if are_tracklets(records) else "images"
    title = (
        f"{method} of {len(drawn)} {split} {kind} of {len(chosen)} identities"
        + (" and their center-loss centers" if centers else "")
        + f"\n{config.name}, {resolve_checkpoint(checkpoint).name}"
    )
    return plot_tsne(embedding, points, Path(out) / f"tsne_{split}.png", title)


# ----------------------------------------------------------------------------------- textures


def magnify(cells: np.ndarray, height: int) -> np.ndarray:
    """Cells (N, h, w, 3) repeated by the integer factor max(1, height // h) along both axes
    (nearest neighbour): a 64 x 32 texture beside a 128 x 64 input is drawn 128 x 64, its
    pixels kept."""
    k = max(1, height // cells.shape[1])
    return cells.repeat(k, axis=1).repeat(k, axis=2)


def texture_columns(config: Config, records: Sequence[Record]) -> list[tuple[str, np.ndarray]]:
    """The target textures of ``records`` to draw beside the decoded ones, each (title, (N, h,
    w, 3) uint8 at ``model.san.texture_size``): the true textures where the data set has them
    (the synthetic set's per-identity maps; an image of no identity, a distractor, gets black),
    then the pseudo textures the run trained on (``data.textures.kind: pseudo``)."""
    from hpc_reid.data.build import dataset_root
    from hpc_reid.methods.san.textures import PseudoTextures, texture_or_black, true_textures

    size = tuple(int(s) for s in config.model.san.texture_size)
    root = dataset_root(config.data, announce=lambda _: None)[1]
    stores = [("true texture", true_textures(root))]
    if config.data.textures.kind == "pseudo":
        stores.append(("pseudo texture", PseudoTextures(config.data.textures.root, root)))
    return [
        (title, np.stack([texture_or_black(store, r.path, size) for r in records]))
        for title, store in stores
        if store is not None
    ]


def decoded_textures(
    model: nn.Module, records: Sequence[Record], config: Config, device
) -> tuple[np.ndarray, np.ndarray]:
    """The inputs (N, H, W, 3) as the model saw them and its decoded textures (N, h, w, 3),
    uint8, in eval mode with the decoder on (:func:`~hpc_reid.methods.san.decoding`)."""
    from hpc_reid.methods.san.generate import to_uint8
    from hpc_reid.methods.san.model import decoding

    if "texture" not in model.output_keys:
        raise ConfigError(
            f"the {config.model.head!r} head decodes no texture: its outputs are "
            f"{', '.join(sorted(model.output_keys))}; expected a head with a 'texture' output "
            "(model.head: san)"
        )
    if are_tracklets(records):
        raise ConfigError("hpc-reid visualize textures draws images; this data set has tracklets")
    loader = build_backend_test_loader(
        records, config.loader, config.data.height, config.data.width, device
    )
    augment = config.loader.augment
    images, textures = [], []
    with decoding(model), inferring(model):
        for batch in loader:
            x = batch["images"].to(device)
            images.append(denormalise(x, augment.mean, augment.std))
            textures.append(to_uint8(model(x)["texture"]))
    return np.concatenate(images), np.concatenate(textures)


def texture_figure(
    checkpoint: str | Path,
    out: str | Path,
    split: str = "query",
    num: int = 6,
    config: Config | None = None,
) -> tuple[Path, list[str]]:
    """``out/textures_<split>.png``: ``num`` images of ``split`` spread over it, a row each: the
    input as the model saw it, the texture the checkpoint's decoder gives it, then the targets
    :func:`texture_columns` finds; textures magnified to the input's height
    (:func:`magnify`). Returns the path and the columns' titles."""
    refuse_several_ranks("textures")
    with saved_model(checkpoint, config) as (config, _, device, dataset, model):
        records = spread(split_records(dataset, split), num)
        images, predicted = decoded_textures(model, records, config, device)
        targets = texture_columns(config, records)
    height = images.shape[1]
    columns = [("image", images), ("decoded texture", magnify(predicted, height))]
    columns += [(title, magnify(cells, height)) for title, cells in targets]
    picture = grid([[cells[i] for _, cells in columns] for i in range(len(records))])
    path = Path(out) / f"textures_{split}.png"
    return write_atomic(path, lambda f: picture.save(f, format="PNG")), [t for t, _ in columns]
