"""bench/search_speed.py on a tiny gallery: its row source reads the same rows however it is
chunked, and the table's rows (exact, IVF-PQ, the extrapolated exact row) hold what they say."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest


def test_synthetic_rows_are_the_same_whatever_the_reads(bench_script):
    ss = bench_script("search_speed")
    source = ss.SyntheticRows(10_000, 16, seed=3)
    whole = source.read(0, 10_000)
    assert whole.shape == (10_000, 16) and whole.dtype == np.float32
    bounds = [0, 1, 4095, 4097, 8200, 9999, 10_000]
    parts = [source.read(a, b) for a, b in itertools.pairwise(bounds)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    # identities: rows i and i + ids share a centre, so they are nearer than neighbouring rows
    ids = source.ids
    same = np.linalg.norm(whole[:ids] - whole[ids : 2 * ids], axis=1).mean()
    other = np.linalg.norm(whole[:ids] - whole[1 : ids + 1], axis=1).mean()
    assert same < 0.7 * other
    assert not np.array_equal(source.queries(4), whole[:4])


def test_the_tiny_run_measures_exact_ivf_pq_and_extrapolates_exact(bench_script, tmp_path, capsys):
    ss = bench_script("search_speed")
    argv = ["--rows", "3000", "--exact-rows", "1000", "--dim", "32", "--nlist", "8", "--m", "8"]
    argv += ["--nbits", "4", "--nprobe", "2", "--queries", "5", "--top", "10"]
    argv += ["--recall-queries", "40", "--json", str(tmp_path / "rows.json")]
    assert ss.main(argv) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    out = capsys.readouterr().out
    assert "| exact (extrapolated) | 3,000 x 32 |" in out
    assert [(r["kind"], r["rows"], r["extrapolated"]) for r in rows] == [
        ("exact", 1000, False),
        ("ivf-pq", 1000, False),
        ("ivf-pq", 3000, False),
        ("exact", 3000, True),
    ]
    exact, small_ivf, ivf, extrapolated = rows
    # the flat index holds N x D float32 and a header; the extrapolation is that formula
    assert 1000 * 32 * 4 <= exact["index_bytes"] < 1000 * 32 * 4 + 1024
    assert extrapolated["index_bytes"] == 3000 * 32 * 4
    for key in ("ms_per_query_single", "ms_per_query_batched"):
        assert extrapolated[key] == pytest.approx(3 * exact[key])
        assert all(r[key] > 0 for r in rows)
    # codes of m x nbits / 8 = 4 bytes and an 8-byte id a row, far below 128 bytes of floats
    assert ivf["index_bytes"] < 3000 * 32 * 4 / 4
    assert exact["recall"] is None
    for r in (small_ivf, ivf):
        assert set(r["recall"]) == {"1", "10", "100"}
        assert all(0.0 <= v <= 1.0 for v in r["recall"].values())
        assert r["settings"]["nprobe"] == 2 and r["settings"]["recall_queries"] == 40
