"""AlignedReID's DMLI distance: the training (dmli_matrix, dmli_paired) and evaluation
(dmli_distance) implementations against a plain-Python float64 DP written here from the paper's
definition, their symmetry, gradients, tiling and the benchmark's smoke run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_reid.methods.alignedreid.dmli import dmli_distance, dmli_matrix, dmli_paired

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_table(f: list[list[float]], g: list[list[float]]) -> list[list[float]]:
    """The table S_ij of Zhang et al. (arXiv 1711.08184) for stripes f_1..f_S and g_1..g_S:
    d_ij = (exp(e_ij) - 1) / (exp(e_ij) + 1) of the euclidean e_ij, then S_11 = d_11,
    S_1j = S_1,j-1 + d_1j, S_i1 = S_i-1,1 + d_i1, S_ij = min(S_i-1,j, S_i,j-1) + d_ij."""
    s = len(f)
    table = [[0.0] * s for _ in range(s)]
    for i in range(s):
        for j in range(s):
            e = math.sqrt(sum((a - b) ** 2 for a, b in zip(f[i], g[j], strict=True)))
            d = (math.exp(e) - 1.0) / (math.exp(e) + 1.0)
            if i == 0 and j == 0:
                table[i][j] = d
            elif i == 0:
                table[i][j] = table[i][j - 1] + d
            elif j == 0:
                table[i][j] = table[i - 1][j] + d
            else:
                table[i][j] = min(table[i - 1][j], table[i][j - 1]) + d
    return table


def reference_dmli(f: list[list[float]], g: list[list[float]]) -> float:
    """DMLI distance of two images' stripe lists: S_SS."""
    return _reference_table(f, g)[-1][-1]


def reference_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xs, ys = x.double().tolist(), y.double().tolist()
    return torch.tensor([[reference_dmli(a, b) for b in ys] for a in xs], dtype=torch.float64)


def _smallest_min_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """The smallest |S_i-1,j - S_i,j-1| over every min the DP takes, over all pairs: how far the
    inputs are from a tie, where the distance is not differentiable."""
    gaps = [math.inf]
    for a in x.double().tolist():
        for b in y.double().tolist():
            t = _reference_table(a, b)
            s = len(t)
            gaps += [abs(t[i - 1][j] - t[i][j - 1]) for i in range(1, s) for j in range(1, s)]
    return min(gaps)


def _stripes(n: int, s: int, c: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, s, c, generator=g, dtype=dtype)


def test_reference_dp_by_hand_on_a_two_stripe_example():
    # e = [[0, 3], [4, 0]]: d = tanh(e / 2); the two paths are d11 + d12 + d22 and d11 + d21 + d22.
    f = [[0.0, 0.0], [0.0, 4.0]]
    g = [[0.0, 0.0], [3.0, 0.0]]
    t = math.tanh
    e = [[0.0, 3.0], [4.0, 5.0]]
    d = [[t(v / 2) for v in row] for row in e]
    assert reference_dmli(f, g) == pytest.approx(d[0][0] + min(d[0][1], d[1][0]) + d[1][1])


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("n", "m", "s", "c"), [(5, 7, 4, 6), (3, 4, 1, 5), (4, 3, 8, 3), (1, 1, 2, 4)]
)
def test_dmli_matrix_equals_plain_python_dp_in_float64(n, m, s, c):
    x, y = _stripes(n, s, c, seed=n + s), _stripes(m, s, c, seed=100 + m)
    torch.testing.assert_close(dmli_matrix(x, y), reference_matrix(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n", "s", "c"), [(6, 4, 6), (3, 1, 5), (4, 8, 3)])
def test_dmli_paired_equals_plain_python_dp_row_by_row(n, s, c):
    x, y = _stripes(n, s, c, seed=s), _stripes(n, s, c, seed=50 + s)
    pairs = zip(x.tolist(), y.tolist(), strict=True)
    want = torch.tensor([reference_dmli(a, b) for a, b in pairs], dtype=torch.float64)
    torch.testing.assert_close(dmli_paired(x, y), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dmli_matrix_of_half_inputs_is_the_float32_distance_of_the_upcast_inputs(dtype):
    x, y = _stripes(5, 4, 8, seed=1, dtype=dtype), _stripes(6, 4, 8, seed=2, dtype=dtype)
    got = dmli_matrix(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_matrix(x, y), rtol=0, atol=2e-5)
    torch.testing.assert_close(
        dmli_paired(x, y[:5]), got.diagonal(), rtol=0, atol=1e-5
    )  # the paired form is the matrix's diagonal


def test_dmli_is_symmetric_in_its_two_images():
    """Holds for this DP: swapping the images transposes (d_ij), and a right/down path through the
    transpose is the transpose of one through (d_ij) with the same cells."""
    x, y = _stripes(5, 6, 4, seed=3), _stripes(4, 6, 4, seed=4)
    torch.testing.assert_close(dmli_matrix(x, y), dmli_matrix(y, x).t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        dmli_distance(x.float(), y.float(), tile=(2, 3)),
        dmli_distance(y.float(), x.float(), tile=(3, 2)).t(),
        rtol=0,
        atol=2e-6,
    )


def test_dmli_depends_on_stripe_order_so_the_alignment_is_real():
    """Reversing one image's stripes changes the distance (the path is monotone): the tests above
    would pass for an order-blind sum of stripe distances only by accident."""
    x, y = _stripes(4, 6, 4, seed=5), _stripes(4, 6, 4, seed=6)
    assert (dmli_matrix(x, y) - dmli_matrix(x, y.flip(1))).abs().max() > 1e-2


def test_dmli_of_a_sample_with_itself_is_its_diagonal_path_and_grad_is_finite():
    """e_ii = 0 on the diagonal: the distance is the cheapest path, at most 2(S - 1) off-diagonal
    cells; the clamp of the squared distance keeps the gradient finite."""
    x = _stripes(3, 5, 4, seed=7, dtype=torch.float32).requires_grad_()
    d = dmli_matrix(x, x)
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(
        d.diagonal().double(), reference_matrix(x, x).diagonal(), atol=1e-5, rtol=0
    )


def test_gradcheck_dmli_paired_and_matrix_in_float64_away_from_ties():
    """The DP's min is not differentiable at a tie S_i-1,j = S_i,j-1; the inputs are checked to be
    well away from one (>= 1e-3, against gradcheck's step of 1e-6) so the check is meaningful."""
    x, y = _stripes(3, 3, 4, seed=8), _stripes(2, 3, 4, seed=9)
    assert _smallest_min_gap(x, y) > 1e-3
    assert _smallest_min_gap(x[:2], y) > 1e-3
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(dmli_matrix, (x, y), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda a, b: dmli_paired(a[:2], b), (x, y), eps=1e-6, atol=1e-7)


def test_wrong_shapes_are_errors_naming_them():
    with pytest.raises(ValueError, match=r"\(N, S, C\)"):
        dmli_matrix(torch.zeros(2, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="same number of stripes"):
        dmli_matrix(torch.zeros(2, 3, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="as many rows"):
        dmli_paired(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    ("q", "g", "s", "tile"),
    [
        (7, 11, 4, (3, 4)),  # tiles dividing neither Q nor G
        (7, 11, 1, (2, 5)),  # one stripe: the distance is tanh(e / 2)
        (5, 9, 8, (1, 1)),
        (6, 5, 3, (64, 64)),  # one tile larger than Q and G
        (1, 1, 2, (1, 1)),
        (9, 13, 8, None),  # the default tile
    ],
)
def test_dmli_distance_equals_plain_python_dp_for_any_tiling(q, g, s, tile):
    qf, gf = _stripes(q, s, 5, seed=q * s), _stripes(g, s, 5, seed=200 + g)
    got = dmli_distance(qf.float(), gf.float(), tile=tile)
    assert got.shape == (q, g) and got.dtype == torch.float32
    # float32 over 2S - 1 terms in [0, 1), with the GEMM's cancellation in |a|^2 + |b|^2 - 2ab
    torch.testing.assert_close(got.double(), reference_matrix(qf, gf), rtol=0, atol=2e-5)


def test_dmli_distance_equals_dmli_matrix_on_larger_random_features():
    qf, gf = _stripes(40, 8, 32, seed=11, dtype=torch.float32), _stripes(70, 8, 32, seed=12)
    want = dmli_matrix(qf.double(), gf)
    torch.testing.assert_close(
        dmli_distance(qf, gf.float(), tile=(16, 24)).double(), want, rtol=0, atol=2e-5
    )


def test_dmli_distance_of_a_permuted_gallery_is_the_permuted_columns():
    qf, gf = (
        _stripes(9, 6, 16, seed=13, dtype=torch.float32),
        _stripes(23, 6, 16, seed=14, dtype=torch.float32),
    )
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    want = dmli_distance(qf, gf, tile=(4, 5))[:, perm]
    # Equal up to float rounding: a column's GEMM may use another kernel path in another tile.
    torch.testing.assert_close(dmli_distance(qf, gf[perm], tile=(4, 5)), want, rtol=0, atol=1e-6)


def test_dmli_distance_writes_into_out_and_takes_half_features():
    qf, gf = _stripes(5, 4, 8, seed=15, dtype=torch.float16), _stripes(6, 4, 8, seed=16)
    big = torch.full((7, 6), -1.0)
    got = dmli_distance(qf, gf.half(), tile=(2, 4), out=big[1:6])
    assert got.data_ptr() == big[1:6].data_ptr()
    assert (big[0] == -1).all() and (big[6] == -1).all()
    torch.testing.assert_close(
        big[1:6].double(), reference_matrix(qf, gf.half()), rtol=0, atol=2e-5
    )


def test_dmli_distance_rejects_bad_out_and_tile():
    qf, gf = torch.zeros(3, 2, 4), torch.zeros(4, 2, 4)
    with pytest.raises(ValueError, match=r"out: expected a \(3, 4\) float32"):
        dmli_distance(qf, gf, out=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="tile"):
        dmli_distance(qf, gf, tile=(0, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dmli_distance_on_cuda_equals_cpu():
    qf, gf = (
        _stripes(37, 8, 128, seed=17, dtype=torch.float32),
        _stripes(301, 8, 128, seed=18, dtype=torch.float32),
    )
    cpu = dmli_distance(qf, gf, tile=(16, 100))
    for tile in [(16, 100), None]:
        got = dmli_distance(qf.cuda(), gf.cuda(), tile=tile)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), cpu, rtol=0, atol=1e-4)
    x = qf[:6].cuda().requires_grad_()
    d = dmli_matrix(x, gf[:5].cuda())
    d.sum().backward()
    torch.testing.assert_close(d.cpu(), cpu[:6, :5], rtol=0, atol=1e-4)
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- the benchmark


@pytest.fixture
def dmli_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import dmli_bench

    yield dmli_bench
    sys.modules.pop("dmli_bench", None)


TINY = ["--queries", "12", "--gallery", "60", "--stripes", "3", "--dim", "8", "--threads", "1"]
TINY_EVALUATION = ["--global-dim", "16", "--ids", "4", "--distractors", "10"]


def test_dmli_bench_runs_at_tiny_size_prints_both_tables_and_records_atomically(
    dmli_bench, monkeypatch, capsys, tmp_path
):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    monkeypatch.setattr(dmli_bench, "RESULTS", results)
    argv = [*TINY, *TINY_EVALUATION, "--numpy-tiles", "2", "--query-tile", "4", "--record"]
    assert dmli_bench.main(argv) == 0  # 0: our CMC/mAP agree with the reference's
    out = capsys.readouterr().out
    assert "| numpy DP" in out and "| dmli_distance" in out
    assert "max |ours - numpy|" in out
    assert "| reference: numpy" in out and "| evaluate_features" in out
    assert "1-minute load average: start" in out
    recorded = results.read_text()
    assert recorded.startswith("# earlier results\n\n## dmli_bench, ")
    assert (
        "`python bench/dmli_bench.py --queries 12" in recorded and "| evaluate_features" in recorded
    )
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temporary file left


def test_dmli_bench_evaluation_equals_the_numpy_argsort_reference_on_a_nontrivial_ranking(
    dmli_bench,
):
    args = dmli_bench.parse_args([*TINY, *TINY_EVALUATION, "--queries", "20", "--ids", "6"])
    res = dmli_bench.run_evaluation(args)
    ours, ref = res["ours"], res["reference"]
    # A ranking neither perfect nor empty, so that equal CMC/mAP is a real check.
    assert 0 < ours.cmc[0] < 1 and 0 < ours.mAP < 1
    assert ours.num_valid == ref["num_valid"] == 20
    np.testing.assert_allclose(ours.cmc, ref["cmc"], rtol=0, atol=1e-6)
    assert ours.mAP == pytest.approx(ref["mAP"], abs=1e-6)
    assert res["dist_diff"] < 1e-5 and res["protocol_diff"] < 1e-12 and res["agree"]


def test_market_like_labels_have_one_query_per_camera_junk_positives_and_distractors(
    dmli_bench,
):
    rng = np.random.default_rng(0)
    q_pids, q_camids, g_pids, g_camids = dmli_bench.market_like_labels(
        rng, queries=3368, gallery=15913, ids=750, cameras=6, distractors=2793
    )
    assert q_pids.shape == q_camids.shape == (3368,) and g_pids.shape == g_camids.shape == (15913,)
    assert set(q_pids.tolist()) == set(range(1, 751)) and (g_pids == 0).sum() == 2793
    assert len(set(zip(q_pids.tolist(), q_camids.tolist(), strict=True))) == 3368
    per_id = np.bincount(q_pids)[1:]
    assert per_id.min() >= 2 and per_id.max() <= 6 and set(q_camids.tolist()) == set(range(6))
    gallery = set(zip(g_pids.tolist(), g_camids.tolist(), strict=True))
    for pid, cam in zip(q_pids.tolist(), q_camids.tolist(), strict=True):
        assert (pid, cam) in gallery  # same-camera junk
        assert any((pid, c) in gallery for c in range(6) if c != cam)  # a valid query
    assert not (g_pids[:-1] <= g_pids[1:]).all()  # shuffled
    with pytest.raises(ValueError, match="2 to `cameras` queries an identity"):
        dmli_bench.market_like_labels(rng, queries=40, gallery=99, ids=6, cameras=6, distractors=0)
    with pytest.raises(ValueError, match="distractors"):
        dmli_bench.market_like_labels(rng, queries=12, gallery=20, ids=6, cameras=6, distractors=9)
