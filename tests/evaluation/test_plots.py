import numpy as np
import pytest
from PIL import Image

from hpc_reid.evaluation.plots import (
    BORDER,
    CELL_HEIGHT,
    CELL_WIDTH,
    GAP,
    MATCH_COLOUR,
    MISMATCH_COLOUR,
    PAD,
    QUERY_COLOUR,
    plot_cmc,
    plot_ranked_lists,
)
from tests.evaluation.reference import make_case


def test_plot_cmc_writes_a_png_and_leaves_no_temporary(tmp_path):
    cmc = np.minimum(1.0, 0.6 + 0.02 * np.arange(50))
    path = plot_cmc(cmc, tmp_path / "out" / "cmc.png", label="baseline")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (500, 400)
    assert 10_000 < path.stat().st_size < 500_000
    assert [p.name for p in path.parent.iterdir()] == ["cmc.png"]


def write_images(folder, n, seed):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        path = folder / f"{i}.jpg"
        Image.new("RGB", (48 + i % 5, 100 + i % 7), colour).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("topk", [10, 4])
def test_ranked_lists_frame_the_top_kept_gallery_by_identity(tmp_path, topk):
    distmat, q_pids, g_pids, q_cams, g_cams = make_case(5, num_q=8, num_g=40, ties=True)
    (tmp_path / "g").mkdir()
    q_paths, g_paths = write_images(tmp_path, 8, 0), write_images(tmp_path / "g", 40, 1)
    out = plot_ranked_lists(
        distmat, q_paths, g_paths, q_pids, g_pids, q_cams, g_cams, tmp_path / "ranked.png", 6, topk
    )
    with Image.open(out) as im:
        assert im.format == "PNG"
        width = CELL_WIDTH + GAP + topk * (CELL_WIDTH + PAD) - PAD
        assert im.size == (width, 6 * (CELL_HEIGHT + PAD) - PAD)
        grid = np.asarray(im.convert("RGB"))
    for q in range(6):
        y = q * (CELL_HEIGHT + PAD) + 1
        assert tuple(grid[y, 1]) == QUERY_COLOUR
        order = np.argsort(distmat[q], kind="stable")
        kept = [g for g in order if not (g_pids[g] == q_pids[q] and g_cams[g] == q_cams[q])]
        for i, g in enumerate(kept[:topk]):
            x = CELL_WIDTH + GAP + i * (CELL_WIDTH + PAD)
            colour = MATCH_COLOUR if g_pids[g] == q_pids[q] else MISMATCH_COLOUR
            assert tuple(grid[y, x + 1]) == colour
            inner = grid[y + CELL_HEIGHT // 2, x + CELL_WIDTH // 2]
            with Image.open(g_paths[g]) as src:
                np.testing.assert_allclose(inner, src.convert("RGB").getpixel((5, 5)), atol=8)
        # Each query keeps at least topk images, so the last cell of every row is filled.
        assert tuple(grid[y + BORDER, width - 1]) != (255, 255, 255)
