"""Plain full-sort reference of the Market-1501 and CUHK03-old ranking metrics, and test cases.

Written independently of the counting implementation: every query stably sorts its whole row.
"""

from __future__ import annotations

import numpy as np


def reference_query(d, q_pid, q_cam, g_pids, g_cams):
    """(cmc matches in rank order, ap, inp) of one query, or None if it has no kept positive."""
    order = np.argsort(d, kind="stable")
    junk = (g_pids[order] == q_pid) & (g_cams[order] == q_cam)
    matches = (g_pids[order] == q_pid)[~junk]
    if not matches.any():
        return None
    precision = np.cumsum(matches) / np.arange(1, matches.size + 1)
    ap = precision[matches].mean()
    inp = matches.sum() / (np.flatnonzero(matches)[-1] + 1)
    return matches, ap, inp


def cumulative_cmc(matches, max_rank):
    """CMC of one ranked list, extended beyond its length (once found, stays found)."""
    cmc = (np.cumsum(matches) > 0).astype(np.float64)
    if cmc.size < max_rank:
        cmc = np.concatenate([cmc, np.full(max_rank - cmc.size, cmc[-1] if cmc.size else 0.0)])
    return cmc[:max_rank]


def reference_metrics(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
    """(cmc, mAP, mINP, ap, inp, valid) with NaN ap/inp for queries without a kept positive."""
    num_q = distmat.shape[0]
    cmcs, ap, inp = [], np.full(num_q, np.nan), np.full(num_q, np.nan)
    valid = np.zeros(num_q, dtype=bool)
    for q in range(num_q):
        res = reference_query(distmat[q], q_pids[q], q_cams[q], g_pids, g_cams)
        if res is None:
            continue
        matches, ap[q], inp[q] = res
        valid[q] = True
        cmcs.append(cumulative_cmc(matches, max_rank))
    return np.mean(cmcs, axis=0), ap[valid].mean(), inp[valid].mean(), ap, inp, valid


def reference_cuhk03_cmc(distmat, q_pids, g_pids, q_cams, g_cams, max_rank, repeats, seed):
    """CMC of the CUHK03 old protocol, drawing as documented in hpc_reid.evaluation.ranking."""
    identities = sorted(set(g_pids.tolist()))
    cmcs = []
    for q in range(distmat.shape[0]):
        members = []
        for pid in identities:
            idx = [
                g
                for g in range(g_pids.size)
                if g_pids[g] == pid and not (pid == q_pids[q] and g_cams[g] == q_cams[q])
            ]
            members.append(idx)
        if q_pids[q] not in identities or not members[identities.index(q_pids[q])]:
            continue
        rng = np.random.default_rng([seed, q])
        picks = rng.integers(0, [len(m) for m in members], size=(repeats, len(identities)))
        cmc = np.zeros(max_rank)
        for r in range(repeats):
            sampled = sorted(m[picks[r, i]] for i, m in enumerate(members))
            order = np.argsort(distmat[q, sampled], kind="stable")
            matches = g_pids[np.array(sampled)[order]] == q_pids[q]
            cmc += cumulative_cmc(matches, max_rank)
        cmcs.append(cmc / repeats)
    return np.mean(cmcs, axis=0)


def make_case(seed, num_q=24, num_g=120, num_pids=12, num_cams=3, ties=False):
    """A random evaluation problem with every awkward case the protocol has.

    Gallery pids 0..num_pids-1 (0: distractors, never a query pid); some identities appear under
    one camera only, so a query of theirs from that camera has no positive; some query pids are
    absent from the gallery. ``ties``: integer distances from {0, 1, 2, 3}, so most are tied.
    """
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(0, num_pids, size=num_g)
    g_cams = rng.integers(0, num_cams, size=num_g)
    single_cam = g_pids % 4 == 1  # these identities are seen by camera 0 only
    g_cams[single_cam] = 0
    q_pids = rng.integers(1, num_pids + 2, size=num_q)  # num_pids, num_pids + 1: not in gallery
    q_cams = rng.integers(0, num_cams, size=num_q)
    q_pids[0], q_cams[0] = g_pids[np.flatnonzero(g_pids != 0)[0]], num_cams  # one surely valid
    if ties:
        distmat = rng.integers(0, 4, size=(num_q, num_g)).astype(np.float32)
    else:
        distmat = rng.random((num_q, num_g)).astype(np.float32)
    return distmat, q_pids, g_pids, q_cams, g_cams


# --- float64 distances, and the ranks a float32 ranker may legitimately give -------------------


def float64_distances(qf, gf, metric):
    """(Q, G) float64 distances of float32 (or any) features, computed independently of every
    implementation under test: features upcast exactly to float64, cosine as 1 - the dot product
    of numpy-normalised rows, euclidean as the norm of the difference (no expansion)."""
    q, g = np.asarray(qf, dtype=np.float64), np.asarray(gf, dtype=np.float64)
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        return 1.0 - qn @ gn.T
    return np.sqrt(np.stack([((g - row) ** 2).sum(axis=1) for row in q]))


def float32_tolerance(qf, gf, metric, ulps):
    """``ulps`` float32 ulps of the distances' scale: of 1 for cosine (distances in [0, 2] from
    unit vectors), of the largest ``sqrt(|q|^2 + |g|^2)`` for euclidean (the expansion
    ``|q|^2 + |g|^2 - 2 q.g`` loses digits at that scale before its square root)."""
    if metric == "cosine":
        return ulps * float(np.spacing(np.float32(1.0)))
    q, g = np.asarray(qf, dtype=np.float64), np.asarray(gf, dtype=np.float64)
    scale = np.sqrt((q**2).sum(axis=1).max() + (g**2).sum(axis=1).max())
    return ulps * float(np.spacing(np.float32(scale)))


def rank_bounds(d64, delta, q_pids, g_pids, q_cams, g_cams):
    """What a ranker whose every distance is within ``delta`` of ``d64`` can report, per query:
    (first rank low/high, AP low/high, INP low/high, valid).

    A positive's rank is 1 + the kept items before it. Item j surely precedes positive p when
    d64[j] < d64[p] - 2 delta and may when d64[j] <= d64[p] + 2 delta, so its rank lies in
    [lo_p, hi_p]; the k-th smallest rank lies between the k-th smallest lo and hi, which bounds
    first rank, AP = mean(k / r_(k)) and INP = n / r_(n). Tight (lo == hi) where no kept item is
    within 2 delta of a positive."""
    num_q = d64.shape[0]
    out = {k: np.full(num_q, np.nan) for k in ("first_lo", "first_hi", "ap_lo", "ap_hi")}
    out.update(inp_lo=np.full(num_q, np.nan), inp_hi=np.full(num_q, np.nan))
    valid = np.zeros(num_q, dtype=bool)
    for q in range(num_q):
        kept = ~((g_pids == q_pids[q]) & (g_cams == q_cams[q]))
        pos = np.flatnonzero(kept & (g_pids == q_pids[q]))
        if pos.size == 0:
            continue
        valid[q] = True
        d_kept = np.sort(d64[q, kept])
        d_pos = d64[q, pos]
        lo = np.sort(1 + np.searchsorted(d_kept, d_pos - 2 * delta, side="left"))
        hi = np.sort(np.searchsorted(d_kept, d_pos + 2 * delta, side="right"))  # itself included
        k = np.arange(1, pos.size + 1)
        out["first_lo"][q], out["first_hi"][q] = lo[0], hi[0]
        out["ap_lo"][q], out["ap_hi"][q] = np.mean(k / hi), np.mean(k / lo)
        out["inp_lo"][q], out["inp_hi"][q] = pos.size / hi[-1], pos.size / lo[-1]
    out["valid"] = valid
    return out


def assert_within_rank_bounds(result, bounds, rel=1e-12):
    """A RankResult (or QueryRanks with ``first_rank``) lies within :func:`rank_bounds`; returns
    the fraction of valid queries whose bounds are tight, so that a caller can check the
    comparison is not vacuous."""
    valid = bounds["valid"]
    np.testing.assert_array_equal(result.valid, valid)
    slack = 1 + rel
    for name in ("ap", "inp"):
        got = getattr(result, name)[valid]
        lo, hi = bounds[f"{name}_lo"][valid], bounds[f"{name}_hi"][valid]
        bad = np.flatnonzero((got < lo / slack) | (got > hi * slack))
        assert bad.size == 0, f"{name} outside the float64 bounds for queries {bad[:10]}"
    if hasattr(result, "first_rank"):
        first = result.first_rank[valid, 0]
        bad = np.flatnonzero(
            (first < bounds["first_lo"][valid]) | (first > bounds["first_hi"][valid])
        )
        assert bad.size == 0, f"first rank outside the float64 bounds for queries {bad[:10]}"
    if hasattr(result, "cmc"):  # a RankResult: CMC@k between the fractions surely / maybe found
        for k, c in enumerate(result.cmc, start=1):
            surely = np.mean(bounds["first_hi"][valid] <= k)
            maybe = np.mean(bounds["first_lo"][valid] <= k)
            assert surely - 1e-12 <= c <= maybe + 1e-12, f"CMC@{k} = {c} not in [{surely}, {maybe}]"
        for name in ("mAP", "mINP"):
            key = name[1:].lower()
            lo = np.mean(bounds[f"{key}_lo"][valid]) / slack
            hi = np.mean(bounds[f"{key}_hi"][valid]) * slack
            assert lo <= getattr(result, name) <= hi, f"{name} not in [{lo}, {hi}]"
    tight = (bounds["first_lo"] == bounds["first_hi"]) & (bounds["ap_lo"] == bounds["ap_hi"])
    return float(tight[valid].mean())
