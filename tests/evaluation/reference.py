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
