"""``hpc-reid visualize`` (issue 21): the attention overlay against a bilinear upsampling and blend
written out in numpy, the t-SNE's input rows against a direct selection, the exact t-SNE's
conditional probabilities, KL gradient and clusters against their definitions, and, on a tiny
FGReID run (images and T = 3 tracklets), both PNGs through the command line with their layout and
contents checked against the model run directly; the refusals."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from hpc_reid import visualize
from hpc_reid.cli import main
from hpc_reid.config import ConfigError, ModelConfig
from hpc_reid.data.datasets.base import ImageRecord
from hpc_reid.data.loaders import build_backend_test_loader, load_rgb
from hpc_reid.engine.checkpoint import load_checkpoint, save_atomic
from hpc_reid.engine.errors import CheckpointError
from hpc_reid.engine.saved import saved_model
from hpc_reid.engine.trainer import train
from hpc_reid.models import build_model
from tests.tiny import TINY_TRACKLETS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

H, W, PAD = 64, 32, visualize.PAD  # the tiny set's input size


# ------------------------------------------------------------------------------- the overlay


def bilinear_half_pixel(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling written out: output pixel (y, x) samples the map at ((y + 0.5) h /
    height - 0.5, (x + 0.5) w / width - 0.5), clamped to the cell centres at the borders."""
    h, w = m.shape
    out = np.zeros((height, width))
    for y in range(height):
        sy = min(max((y + 0.5) * h / height - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(width):
            sx = min(max((x + 0.5) * w / width - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = (1 - fx) * m[y0, x0] + fx * m[y0, x1]
            bottom = (1 - fx) * m[y1, x0] + fx * m[y1, x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


def test_upsampled_map_of_a_single_peak_has_its_maximum_at_the_centre_of_that_cell():
    def central(i, cells):  # the 2 pixels a side nearest the cell's centre; at a border the
        return (
            {4 * i, 4 * i + 1}
            if i == 0
            else {4 * i + 2, 4 * i + 3}
            if i == cells - 1
            else {
                4 * i + 1,
                4 * i + 2,
            }
        )  # clamp holds the peak over the outer half of the cell

    for i, j in [(0, 0), (2, 1), (5, 3), (7, 0), (3, 2)]:
        m = torch.zeros(1, 8, 4)
        m[0, i, j] = 1.0
        up = visualize.upsample(m, 32, 16)[0].numpy()  # 4 x 4 pixels a cell
        top = {tuple(t) for t in np.argwhere(up == up.max()).tolist()}
        assert top == {(y, x) for y in central(i, 8) for x in central(j, 4)}, (i, j, top)
        np.testing.assert_allclose(up, bilinear_half_pixel(m[0].numpy(), 32, 16), atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_overlay_equals_the_min_max_scaled_upsampled_map_coloured_and_blended(alpha):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, H, W, 3), dtype=np.uint8)
    maps = torch.from_numpy(rng.uniform(0.5, 1.0, (3, 8, 4))).float()  # FGReID's range
    got = visualize.overlay(images, maps, alpha)
    m = maps.numpy().astype(np.float64)
    scaled = (m - m.min()) / (m.max() - m.min())  # one scale for the three (one tracklet)
    for k in range(3):
        colour = colormaps["jet"](bilinear_half_pixel(scaled[k], H, W))[..., :3]
        expected = (1 - alpha) * images[k] + alpha * 255 * colour
        assert np.abs(got[k].astype(float) - expected).max() <= 0.5 + 1e-3  # rounding only
    # a constant map has no scale: coloured as 0 everywhere
    flat = visualize.overlay(images[:1], torch.full((1, 8, 4), 0.7), alpha)
    expected = (1 - alpha) * images[0] + alpha * 255 * np.asarray(colormaps["jet"](0.0)[:3])
    assert np.abs(flat[0] - expected).max() <= 0.5 + 1e-3


def test_grid_pastes_rows_of_cells_with_white_gaps():
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 256, (n, 6, 4, 3), dtype=np.uint8) for n in (3, 2)]
    out = np.asarray(visualize.grid(rows))
    assert out.shape == (2 * (6 + PAD) - PAD, 3 * (4 + PAD) - PAD, 3)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            y, x = i * (6 + PAD), j * (4 + PAD)
            np.testing.assert_array_equal(out[y : y + 6, x : x + 4], cell)
    assert (out[6:8] == 255).all() and (out[6 + PAD :, 2 * (4 + PAD) :] == 255).all()


def test_spread_takes_num_records_evenly_in_order():
    records = list(range(10))
    assert visualize.spread(records, 4) == [0, 2, 5, 7]
    assert visualize.spread(records, 10) == records and visualize.spread(records, 50) == records
    with pytest.raises(ConfigError, match="--num 0"):
        visualize.spread(records, 0)


def test_a_head_without_attention_is_refused_naming_its_outputs():
    cfg = ModelConfig.model_validate({"backbone": "osnet_x0_25", "pretrained": None})
    model = build_model(cfg, 4)
    config = SimpleNamespace(model=cfg)
    with pytest.raises(ConfigError, match=r"'bnneck' head has no attention map: .*bn, .*global"):
        visualize.attention_maps(model, [], config, "cpu")


def test_a_head_without_a_decoder_is_refused_naming_its_outputs():
    cfg = ModelConfig.model_validate({"backbone": "osnet_x0_25", "pretrained": None})
    config = SimpleNamespace(model=cfg)
    with pytest.raises(ConfigError, match=r"'bnneck' head decodes no texture: .*bn, .*global"):
        visualize.decoded_textures(build_model(cfg, 4), [], config, "cpu")


def test_magnify_repeats_each_pixel_by_the_integer_factor_to_the_height():
    cells = np.arange(2 * 3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 3)
    big = visualize.magnify(cells, 7)  # 7 // 3 = 2
    assert big.shape == (2, 6, 4, 3)
    for y in range(6):
        for x in range(4):
            np.testing.assert_array_equal(big[:, y, x], cells[:, y // 2, x // 2])
    assert visualize.magnify(cells, 2).shape == cells.shape  # never shrunk


def test_grid_puts_cells_of_several_sizes_top_left_in_their_slots():
    a = np.full((4, 3, 3), 10, np.uint8)
    b = np.full((2, 5, 3), 20, np.uint8)
    c = np.full((3, 3, 3), 30, np.uint8)
    png = np.asarray(visualize.grid([[a, b], [c, b]]))
    # columns 3 and 5 wide, rows 4 and 3 high, PAD apart; the rest white
    assert png.shape == (4 + PAD + 3, 3 + PAD + 5, 3)
    expected = np.full(png.shape, 255, np.uint8)
    expected[0:4, 0:3] = 10
    expected[0:2, 3 + PAD : 8 + PAD] = 20
    expected[4 + PAD : 7 + PAD, 0:3] = 30
    expected[4 + PAD : 6 + PAD, 3 + PAD : 8 + PAD] = 20
    np.testing.assert_array_equal(png, expected)


# -------------------------------------------------------------------------- the t-SNE's input


def test_tsne_points_are_the_chosen_ids_features_in_order_then_their_centers():
    rng = np.random.default_rng(2)
    pids = rng.integers(0, 6, 40)
    features = rng.normal(size=(40, 5))
    centers = rng.normal(size=(6, 5))
    chosen = [1, 4, 5]
    points = visualize.tsne_points(features, pids, chosen, centers)
    rows = [features[i] for i in range(40) if pids[i] in chosen]
    labels = [int(pids[i]) for i in range(40) if pids[i] in chosen]
    expected = np.array(rows + [centers[c] for c in chosen])
    np.testing.assert_array_equal(points.rows, expected)
    np.testing.assert_array_equal(points.pids, labels + chosen)
    np.testing.assert_array_equal(points.is_center, [False] * len(rows) + [True] * 3)
    alone = visualize.tsne_points(features, pids, chosen)
    np.testing.assert_array_equal(alone.rows, np.array(rows))
    assert not alone.is_center.any()
    with pytest.raises(ValueError, match="centers are 4-d, the features 5-d"):
        visualize.tsne_points(features, pids, chosen, centers[:, :4])


def test_tsne_identities_first_max_ids_and_only_ids_with_a_query_on_test_splits():
    def recs(*pids):
        return [SimpleNamespace(pid=p) for p in pids]

    train = recs(3, 0, 2, 2, 5, 1)
    assert visualize.tsne_identities(train, [], "train", 3) == [0, 1, 2]
    query = recs(7, 9, 4)
    gallery = recs(0, -1, 9, 4, 4, 12, 7)  # 0 distractors, -1 junk, 12 without a query
    assert visualize.tsne_identities(query, query, "query", 5) == [4, 7, 9]
    assert visualize.tsne_identities(gallery, query, "gallery", 2) == [4, 7]
    with pytest.raises(ConfigError, match="--max-ids 0"):
        visualize.tsne_identities(train, [], "train", 0)


def test_checkpoint_centers_reads_the_center_term_or_refuses_naming_the_keys():
    c = torch.randn(4, 3)
    assert torch.equal(visualize.checkpoint_centers({"criterion": {"center.centers": c}}, "x"), c)
    assert torch.equal(visualize.checkpoint_centers({"criterion": {"center.0.centers": c}}, "x"), c)
    with pytest.raises(CheckpointError, match=r"ck\.pt holds no center .*'osm\.w'.*--no-centers"):
        visualize.checkpoint_centers({"criterion": {"osm.w": c}}, "ck.pt")


# ------------------------------------------------------------------------------ the exact t-SNE


def test_conditional_probabilities_have_the_asked_perplexity_and_a_gaussian_kernel():
    x = np.random.default_rng(3).normal(size=(25, 6)) * 3.0
    cond = visualize.conditional_probabilities(x, perplexity=7.0)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    assert np.allclose(np.diag(cond), 0.0) and np.allclose(cond.sum(1), 1.0)
    for i in range(25):
        p = np.delete(cond[i], i)
        assert -np.sum(p * np.log(p)) == pytest.approx(np.log(7.0), abs=1e-4)
        # log p_j|i = -beta_i d_ij + const: a straight line of negative slope in d_ij
        slope, intercept = np.polyfit(np.delete(d2[i], i), np.log(p), 1)
        assert slope < 0
        np.testing.assert_allclose(np.log(p), slope * np.delete(d2[i], i) + intercept, atol=1e-6)
    p = visualize.joint_probabilities(x, 7.0)
    np.testing.assert_allclose(p, (cond + cond.T) / 50.0)


def direct_kl(p, y):
    n = len(y)
    num = np.array([[1.0 / (1.0 + np.sum((y[i] - y[j]) ** 2)) for j in range(n)] for i in range(n)])
    np.fill_diagonal(num, 0.0)
    q = num / num.sum()
    return sum(p[i, j] * np.log(p[i, j] / q[i, j]) for i in range(n) for j in range(n) if i != j)


def test_kl_gradient_is_the_finite_difference_gradient_of_the_kl_divergence():
    rng = np.random.default_rng(4)
    p = visualize.joint_probabilities(rng.normal(size=(9, 4)), 2.5)
    y = rng.normal(size=(9, 2))
    kl, grad = visualize.kl_gradient(p, y)
    assert kl == pytest.approx(direct_kl(p, y), rel=1e-9)
    eps, numeric = 1e-6, np.zeros_like(y)
    for i in range(9):
        for k in range(2):
            up, down = y.copy(), y.copy()
            up[i, k] += eps
            down[i, k] -= eps
            numeric[i, k] = (direct_kl(p, up) - direct_kl(p, down)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_exact_tsne_is_seeded_and_keeps_separated_clusters_apart():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(3), 10)
    x = rng.normal(size=(30, 8)) + 15.0 * labels[:, None] * np.eye(8)[0]  # apart in 8-D too
    y = visualize.exact_tsne(x, perplexity=5.0, seed=1, iterations=400)
    np.testing.assert_array_equal(y, visualize.exact_tsne(x, 5.0, seed=1, iterations=400))
    d = ((y[:, None] - y[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).all()  # each point's 2-D neighbour is of its cluster
    same = labels[:, None] == labels[None]
    assert d[~same].min() > d[same & np.isfinite(d)].max()  # clusters further apart than wide


def test_embed_tsne_is_deterministic_and_refuses_too_few_points():
    x = np.random.default_rng(6).normal(size=(12, 5))
    a, method = visualize.embed_tsne(x, seed=3)
    b, _ = visualize.embed_tsne(x, seed=3)
    assert a.shape == (12, 2) and "t-SNE" in method
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="3 point"):
        visualize.embed_tsne(x[:3])


def test_embed_tsne_without_scikit_learn_is_the_exact_numpy_one(monkeypatch):
    x = np.random.default_rng(7).normal(size=(12, 5))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # the import fails
    y, method = visualize.embed_tsne(x, seed=2)
    assert method == "exact t-SNE (numpy)"
    np.testing.assert_array_equal(y, visualize.exact_tsne(x, perplexity=11 / 3, seed=2))


# --------------------------------------------------------------- tiny FGReID runs, the commands


#: the tiny head widths of tests/methods/test_fgreid.py, one optimizer step, no evaluation
TINY_FGREID = [
    "model.fgreid.mid_dim=12",
    "model.fgreid.nonlocal_dim=5",
    "evaluation.at_start=false",
]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """configs/synthetic/fgreid.yaml on the tiny set (8 training ids), one step."""
    tmp = tmp_path_factory.mktemp("visualize")
    config = tiny_config(tmp, "configs/synthetic/fgreid.yaml", *TINY_FGREID)
    train(config, max_steps=1)
    return SimpleNamespace(tmp=tmp, run=tmp / "runs" / config.name)


def inputs_of(records, config) -> torch.Tensor:
    """The records' images (N, 3, H, W) as the configured test loader gives them (DALI's resize
    where DALI is installed, the torch loader's otherwise)."""
    loader = build_backend_test_loader(
        records, config.loader, config.data.height, config.data.width, "cpu"
    )
    return torch.cat([batch["images"].cpu() for batch in loader])


def test_attention_png_is_the_inputs_above_their_overlays(image_run, tmp_path):
    assert main(["visualize", "attention", "--checkpoint", str(image_run.run),
                 "--num", "5", "--out", str(tmp_path)]) == 0  # fmt: skip
    png = np.asarray(Image.open(tmp_path / "attention_query.png").convert("RGB"))
    assert png.shape == (2 * (H + PAD) - PAD, 5 * (W + PAD) - PAD, 3)
    with saved_model(image_run.run) as (config, _, _, dataset, model):
        records = visualize.spread(dataset.query, 5)
        x = inputs_of(records, config)
        model.eval()
        with torch.no_grad():
            maps = model(x)["attention"]
    aug = config.loader.augment
    pixels = visualize.denormalise(x, aug.mean, aug.std)
    # the input row is the images as the model saw them: resized, normalisation undone
    for j, record in enumerate(records):
        resized = np.asarray(load_rgb(record.path).resize((W, H), Image.BILINEAR), dtype=float)
        assert np.abs(pixels[j] - resized).mean() < 2.0
        cells = [png[i * (H + PAD) : i * (H + PAD) + H, j * (W + PAD) : j * (W + PAD) + W]
                 for i in range(2)]  # fmt: skip
        np.testing.assert_array_equal(cells[0], pixels[j])
        np.testing.assert_array_equal(
            cells[1], visualize.overlay(pixels[j : j + 1], maps[j : j + 1])[0]
        )


def test_tsne_png_embeds_the_chosen_ids_global_features_and_their_centers(
    image_run, tmp_path, monkeypatch
):
    seen = {}
    embed = visualize.embed_tsne

    def spy(rows, seed=0):
        seen["rows"] = rows
        return embed(rows, seed)

    monkeypatch.setattr(visualize, "embed_tsne", spy)
    assert main(["visualize", "tsne", "--checkpoint", str(image_run.run),
                 "--max-ids", "3", "--out", str(tmp_path)]) == 0  # fmt: skip
    assert Image.open(tmp_path / "tsne_train.png").size == (700, 700)
    centers = load_checkpoint(image_run.run)["criterion"]["center.centers"]
    with saved_model(image_run.run) as (config, _, _, dataset, model):
        records = [r for r in dataset.train if r.pid in (0, 1, 2)]  # the first 3 train labels
        model.eval()
        with torch.no_grad():
            feats = model(inputs_of(records, config))["global"]
    expected = torch.cat([feats, centers[:3]]).double().numpy()
    np.testing.assert_allclose(seen["rows"], expected, rtol=1e-5, atol=1e-5)


def test_tsne_refuses_a_test_split_with_centers_and_a_checkpoint_without_them(
    image_run, tmp_path, capsys
):
    ck = str(image_run.run)
    assert main(["visualize", "tsne", "--checkpoint", ck, "--split", "query",
                 "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "--split query: the center loss's centers" in capsys.readouterr().err
    state = load_checkpoint(ck)
    del state["criterion"]["center.centers"]
    bare = save_atomic(state, tmp_path / "bare.pt")
    assert main(["visualize", "tsne", "--checkpoint", str(bare), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{bare} holds no center loss state" in err and "--no-centers" in err
    assert not list(tmp_path.glob("*.png"))


def test_visualize_refuses_a_launch_of_several_ranks(image_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for picture in ("attention", "tsne"):
        args = ["visualize", picture, "--checkpoint", str(image_run.run), "--out", str(tmp_path)]
        assert main(args) == 2
        assert "rank 1 of 2 (torchrun): run it without torchrun" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


#: the tiny tracklet set (tests/tiny.py): 4 training ids, clips of T = 3
TINY_VIDEO = TINY_TRACKLETS


def test_tracklets_give_a_row_of_t_frames_each_and_a_tsne_of_tracklet_rows(tmp_path):
    config = tiny_config(tmp_path, "configs/synthetic/fgreid_video.yaml", *TINY_VIDEO, *TINY_FGREID)
    train(config, max_steps=1)
    run = tmp_path / "runs" / config.name
    out = tmp_path / "out"
    assert main(["visualize", "attention", "--checkpoint", str(run), "--split", "gallery",
                 "--num", "4", "--out", str(out)]) == 0  # fmt: skip
    png = np.asarray(Image.open(out / "attention_gallery.png").convert("RGB"))
    assert png.shape == (4 * (H + PAD) - PAD, 3 * (W + PAD) - PAD, 3)
    with saved_model(run) as (config, _, _, dataset, model):
        tracklet = visualize.spread(dataset.gallery, 4)[1]
        frames = [ImageRecord(tracklet.frames[f % tracklet.num_frames], 0, 0) for f in range(3)]
        x = inputs_of(frames, config)
        model.eval()
        with torch.no_grad():
            maps = model(x[None])["attention"][0]  # (T, h, w): one clip, its frames together
    aug = config.loader.augment
    row = visualize.overlay(visualize.denormalise(x, aug.mean, aug.std), maps)
    y = H + PAD  # the second tracklet's row
    for t in range(3):
        np.testing.assert_array_equal(png[y : y + H, t * (W + PAD) : t * (W + PAD) + W], row[t])
    assert main(["visualize", "tsne", "--checkpoint", str(run), "--split", "query",
                 "--no-centers", "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out / "tsne_query.png").size == (700, 700)
