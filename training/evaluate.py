"""Re-identification metrics: CMC, mAP and mINP under the Market-1501 protocol.

Protocol, per query: gallery entries with the query's person id AND camera are removed
(the same person seen by the same camera is not a re-identification); a query left with
no true match is skipped. Distractors (pid 0) are ordinary non-matches; junk (pid -1) is
expected to be dropped by the caller before this point.

Everything is vectorised over a block of queries at a time (one argsort per block), so
memory stays bounded on Market-1501-sized problems (3,368 x 19,732).
"""

from __future__ import annotations

import numpy as np

# Queries per block: the block's argsort and masks hold about this many x gallery entries.
_BLOCK_ELEMENTS = 4_000_000


def cmc_map(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> dict:
    """CMC curve, mean average precision and mean inverse negative penalty.

    distmat: Q x G distances (smaller = more similar). Ties keep gallery order.
    Returns {"cmc": float array of length max_rank, "mAP": float, "mINP": float}; all are
    fractions in [0, 1] averaged over the queries that have a true match. cmc[k-1] is the
    fraction of those queries whose first true match is within the top k. It is a
    cumulative curve, so when max_rank exceeds the gallery size the ranks past the end
    carry the last value (1.0: every counted query has a match somewhere).
    mINP (Ye et al., 2021): the mean of (number of true matches) / (rank of the hardest one).
    Raises ValueError on mismatched shapes or when no query has a true match.
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids).ravel(), np.asarray(g_pids).ravel()
    q_camids, g_camids = np.asarray(q_camids).ravel(), np.asarray(g_camids).ravel()
    _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)

    num_q, num_g = distmat.shape
    first_ranks, average_precisions, inverse_penalties = [], [], []
    block = max(1, _BLOCK_ELEMENTS // max(num_g, 1))
    for start in range(0, num_q, block):
        stop = min(start + block, num_q)
        first, ap, inp = _score_block(
            distmat[start:stop], q_pids[start:stop], q_camids[start:stop], g_pids, g_camids
        )
        first_ranks.append(first)
        average_precisions.append(ap)
        inverse_penalties.append(inp)

    first_rank = np.concatenate(first_ranks)
    if first_rank.size == 0:
        raise ValueError(
            "no query has a true match in the gallery on another camera; "
            "check that query and gallery share person ids and that camera ids differ"
        )
    # Histogram of first-match ranks, clipped so that ranks past max_rank are never counted.
    hits = np.bincount(np.minimum(first_rank, max_rank + 1) - 1, minlength=max_rank + 1)
    cmc = np.cumsum(hits[:max_rank]) / first_rank.size
    return {
        "cmc": cmc.astype(np.float64),
        "mAP": float(np.concatenate(average_precisions).mean()),
        "mINP": float(np.concatenate(inverse_penalties).mean()),
    }


def _score_block(distmat, q_pids, q_camids, g_pids, g_camids):
    """Per-query first-match rank (1-based), AP and INP for the valid queries of one block."""
    order = np.argsort(distmat, axis=1, kind="stable")
    # Masks are built in gallery order, then permuted: gathering bytes is cheaper than ids.
    same_pid = g_pids[None, :] == q_pids[:, None]
    removed = same_pid & (g_camids[None, :] == q_camids[:, None])
    same_pid = np.take_along_axis(same_pid, order, axis=1)
    keep = ~np.take_along_axis(removed, order, axis=1)
    match = same_pid & keep

    num_match = match.sum(axis=1)
    valid = num_match > 0
    keep, match, num_match = keep[valid], match[valid], num_match[valid]
    rows = np.arange(len(match))

    # Rank of each entry among the kept ones (1-based): removed entries do not push others down.
    rank = np.cumsum(keep, axis=1, dtype=np.int32)
    first_rank = rank[rows, match.argmax(axis=1)]
    last_rank = rank[rows, match.shape[1] - 1 - match[:, ::-1].argmax(axis=1)]
    # Precision at each true match, summed per query; true matches are few, so index them.
    hit_rows, hit_cols = np.nonzero(match)
    hits_so_far = np.cumsum(match, axis=1, dtype=np.int32)[hit_rows, hit_cols]
    precision = hits_so_far / rank[hit_rows, hit_cols]
    average_precision = np.bincount(hit_rows, weights=precision, minlength=len(match)) / num_match
    inverse_penalty = num_match / last_rank
    return first_rank.astype(np.int64), average_precision, inverse_penalty


def _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (queries x gallery), got shape {distmat.shape}")
    num_q, num_g = distmat.shape
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(
            f"distmat has {num_q} query rows but q_pids has {len(q_pids)} and q_camids {len(q_camids)}"
        )
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(
            f"distmat has {num_g} gallery columns but g_pids has {len(g_pids)} and g_camids {len(g_camids)}"
        )
    if int(max_rank) < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    if np.issubdtype(distmat.dtype, np.floating) and np.isnan(distmat).any():
        raise ValueError("distmat contains NaN distances")
