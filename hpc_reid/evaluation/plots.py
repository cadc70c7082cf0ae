"""Evaluation figures: the CMC curve and a grid of ranked lists, written as PNG files atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from hpc_reid.atomic import write_atomic
from hpc_reid.data.packed import image_file

CELL_HEIGHT, CELL_WIDTH = 128, 64  # the usual person crop aspect ratio (2:1)
BORDER = 4
GAP = 12  # between the query and its ranked list
PAD = 2  # between neighbouring cells, so that their borders do not merge
QUERY_COLOUR = (40, 90, 220)
MATCH_COLOUR = (30, 170, 60)
MISMATCH_COLOUR = (210, 40, 40)


def new_figure(**kwargs) -> Figure:
    """A matplotlib figure drawn by the Agg canvas, outside pyplot: no process-wide backend
    switch, nothing to close; ``kwargs`` go to :class:`~matplotlib.figure.Figure`."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_cmc(cmc: np.ndarray, path: str | Path, label: str = "CMC") -> Path:
    """CMC curve, matching rate in % against rank 1..len(cmc), as a PNG at ``path``."""
    cmc = np.asarray(cmc, dtype=np.float64)
    ranks = np.arange(1, cmc.size + 1)
    fig = new_figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(
        ranks, 100 * cmc, marker="o", markersize=3, label=f"{label} (rank-1 {100 * cmc[0]:.1f}%)"
    )
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, max(2, cmc.size))
    ax.set_ylim(max(0.0, 100 * cmc[0] // 10 * 10 - 10), 101)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))


def _cell(image_path: str | Path, colour: tuple[int, int, int]) -> Image.Image:
    with Image.open(image_file(image_path)) as im:
        im = im.convert("RGB").resize((CELL_WIDTH - 2 * BORDER, CELL_HEIGHT - 2 * BORDER))
    return ImageOps.expand(im, border=BORDER, fill=colour)


def plot_ranked_lists(
    distmat: np.ndarray,
    query_paths: Sequence[str | Path],
    gallery_paths: Sequence[str | Path],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    path: str | Path,
    num_queries: int = 8,
    topk: int = 10,
) -> Path:
    """A PNG grid: per row a query (blue border) then its top-``topk`` kept gallery images.

    ``distmat`` holds at least the first ``num_queries`` query rows against the whole gallery.
    Same-pid-same-camera gallery images are removed as in the evaluation protocol; the others are
    ranked by (distance, index) and framed green when they share the query's pid, red otherwise.
    """
    distmat = np.asarray(distmat)
    n = min(num_queries, distmat.shape[0], len(query_paths))
    if n < 1 or topk < 1:
        raise ValueError(f"nothing to plot: {n} queries, topk={topk}")
    width = CELL_WIDTH + GAP + topk * (CELL_WIDTH + PAD) - PAD
    grid = Image.new("RGB", (width, n * (CELL_HEIGHT + PAD) - PAD), (255, 255, 255))
    for q in range(n):
        keep = np.flatnonzero(~((g_pids == q_pids[q]) & (g_camids == q_camids[q])))
        # Only a few rows are plotted, so a stable sort (ties by index, as the metrics) is fine.
        top = keep[np.argsort(distmat[q, keep], kind="stable")[:topk]]
        y = q * (CELL_HEIGHT + PAD)
        grid.paste(_cell(query_paths[q], QUERY_COLOUR), (0, y))
        for i, g in enumerate(top):
            colour = MATCH_COLOUR if g_pids[g] == q_pids[q] else MISMATCH_COLOUR
            grid.paste(
                _cell(gallery_paths[g], colour), (CELL_WIDTH + GAP + i * (CELL_WIDTH + PAD), y)
            )
    return write_atomic(path, lambda f: grid.save(f, format="PNG"))
