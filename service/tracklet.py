"""Tracklet queries: several crops of one person searched as one.

The aggregate is the mean of the crops' unit embeddings, re-normalised. On synthetic
tracklets it ranks better than max-score fusion (search with each crop, keep each entry's
best score: 8 crops, mAP 0.632 vs 0.611) at one search instead of one per crop, and as well
as a quality-weighted mean (docs/service.md, bench/bench_tracklets.py). Re-normalising keeps
the score a cosine, on the scale the threshold was calibrated on.
"""

from __future__ import annotations

import numpy as np

MIN_NORM = 1e-6


class DegenerateTracklet(ValueError):
    """The crops' embeddings cancel out: there is no direction to search along."""


def aggregate(vectors: np.ndarray) -> np.ndarray:
    """N x D unit vectors -> one D unit vector (a single crop comes back unchanged)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"need an N x D array of embeddings with N >= 1, got shape {vectors.shape}")
    if len(vectors) == 1:
        return vectors[0]
    mean = vectors.mean(axis=0, dtype=np.float64)
    norm = float(np.linalg.norm(mean))
    if norm < MIN_NORM:
        raise DegenerateTracklet("the crops' embeddings cancel out (their mean is zero)")
    return (mean / norm).astype(np.float32)
