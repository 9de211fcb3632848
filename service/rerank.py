"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), computed inside a query's shortlist only.

All items (the probe and its shortlist) are compared with one distance d (the service uses the
cosine distance 1 - cos). With N(i, k) = i and its k nearest items:

1. k-reciprocal neighbours: R(i, k) = {j in N(i, k) : i in N(j, k)}.
2. Expansion: R*(i) = R(i, k1) joined with R(j, k1/2) for every j in R(i, k1) whose
   R(j, k1/2) shares at least two thirds of its members with R(i, k1).
3. Encoding: V_i[j] = exp(-d(i, j)) for j in R*(i), else 0.
4. Local query expansion: V_i = mean of V_j over the k2 nearest j of i (i itself included).
5. Jaccard distance: d_J(i, j) = 1 - sum(min(V_i, V_j)) / sum(max(V_i, V_j)).
6. Final distance: (1 - lambda) d_J + lambda d.

An item close to the probe whose own neighbourhood does not hold the probe (someone else's
cluster) shares no encoding with it, so d_J = 1 pushes it down; a true match reached through
the probe's reciprocal neighbours moves up. Everything is dense numpy over the M = 1 + shortlist
items: O(M^2) memory and two M^3 matrix products, independent of the gallery size.
"""

from __future__ import annotations

import numpy as np

# The paper's Market-1501 setting.
K1, K2, LAMBDA = 20, 6, 0.3


def _neighbours(order: np.ndarray, k: int) -> np.ndarray:
    """Boolean M x M: row i marks N(i, k) (i itself and its k nearest)."""
    m = len(order)
    out = np.zeros((m, m), dtype=bool)
    np.put_along_axis(out, order[:, : min(k, m - 1) + 1], True, axis=1)
    return out


def _reciprocal(order: np.ndarray, k: int) -> np.ndarray:
    near = _neighbours(order, k)
    return near & near.T


def k_reciprocal_distances(
    dist: np.ndarray, k1: int = K1, k2: int = K2, lambda_: float = LAMBDA, probe: int = 0
) -> np.ndarray:
    """Final distances from item ``probe`` to every item of the symmetric M x M distance matrix ``dist``
    (re-ranked order: ``np.argsort(result, kind="stable")``)."""
    dist = np.asarray(dist, dtype=np.float64)
    m = dist.shape[0]
    if dist.shape != (m, m):
        raise ValueError(f"dist must be square, got shape {dist.shape}")
    if m == 0:
        return np.zeros(0)
    # Ties broken towards the item itself, then by index: each row starts with its own item.
    order = np.argsort(dist + np.diag(np.full(m, -np.inf)), axis=1, kind="stable")
    r_full = _reciprocal(order, k1)
    r_half = _reciprocal(order, int(round(k1 / 2)))
    r_full_f, r_half_f = r_full.astype(np.float32), r_half.astype(np.float32)
    shared = r_full_f @ r_half_f.T  # shared[i, j] = |R(i, k1) & R(j, k1/2)|
    expand = r_full & (3 * shared >= 2 * r_half.sum(axis=1)[None, :])
    r_star = r_full | ((expand.astype(np.float32) @ r_half_f) > 0)
    v = np.where(r_star, np.exp(-dist), 0.0)
    if k2 > 1:
        v = (_neighbours(order, k2 - 1).astype(np.float64) @ v) / min(k2, m)
    vp = v[probe]
    jaccard = 1.0 - np.minimum(vp, v).sum(axis=1) / np.maximum(vp, v).sum(axis=1)
    return (1.0 - lambda_) * jaccard + lambda_ * dist[probe]


def rerank_order(query: np.ndarray, shortlist: np.ndarray, k1: int = K1, k2: int = K2, lambda_: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """(order, final distances) of the shortlist's rows for a unit query vector and unit shortlist
    vectors; the order lists shortlist row indices, best first."""
    items = np.vstack([np.asarray(query, dtype=np.float32).reshape(1, -1), np.asarray(shortlist, dtype=np.float32)])
    cosine_distance = np.clip(1.0 - items.astype(np.float64) @ items.T.astype(np.float64), 0.0, 2.0)
    np.fill_diagonal(cosine_distance, 0.0)
    final = k_reciprocal_distances(cosine_distance, k1, k2, lambda_)[1:]
    return np.argsort(final, kind="stable"), final
