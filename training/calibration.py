"""Score calibration: which cosine similarity means "same person", fitted on held-out identities.

Pairs follow the Market-1501 rule: every query against every gallery entry, except the
same person seen by the same camera. A *genuine* pair is the same person on another camera;
an *impostor* pair is two different people (gallery distractors, pid 0, included), on any
camera: exactly the entries a query is ranked against. A match is ``score >= threshold``.

FAR (false accept rate) = fraction of impostor pairs at or above the threshold;
TAR (true accept rate) = fraction of genuine pairs at or above it.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPORTED_FARS = (1e-2, 1e-3, 1e-4)
DEFAULT_FAR = 1e-3
HISTOGRAM_BINS = 80  # over [-1, 1]: 0.025 wide, fine enough to see both modes and the tail
HISTOGRAM_RANGE = (-1.0, 1.0)


def far_key(far: float) -> str:
    """0.001 -> "1e-3": the one spelling of a FAR level used as a JSON key."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """The lowest threshold whose FAR on ``impostor`` is at most ``far`` (exact, not interpolated).

    With n impostor scores, at most m = floor(far * n) of them may pass. Any threshold at or
    below the (m+1)-th highest score lets m+1 through, so the answer is the next float above
    that score; ties there only lower the realised FAR. With no impostors nothing can be
    fitted: ValueError.
    """
    if not 0 < far < 1:
        raise ValueError(f"far must be between 0 and 1 (exclusive), got {far}")
    scores = np.asarray(impostor).ravel()  # kept in its dtype: Market-1501 has 66M impostor pairs
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    n = scores.size
    if n == 0:
        raise ValueError("no impostor pairs: a threshold cannot be fitted")
    allowed = int(math.floor(far * n + 1e-9))  # 1e-9: 0.29 * 100 is 28.999999999999996 in floats
    if allowed >= n:
        return _next_float(scores.min(), down=True)  # everything may pass
    # (allowed+1)-th highest = element n-1-allowed in ascending order; partition is O(n).
    return _next_float(np.partition(scores, n - 1 - allowed)[n - 1 - allowed])


def _next_float(value: np.floating, down: bool = False) -> float:
    """The neighbouring float in the scores' own precision. One float64 step above a float32 score
    would be rounded back onto it when compared with float32 scores (numpy casts the threshold)."""
    return float(np.nextafter(value, value.dtype.type(-np.inf if down else np.inf)))


def accept_rate(scores: np.ndarray, threshold: float) -> float:
    """Fraction of ``scores`` at or above ``threshold`` (TAR on genuine scores, FAR on impostors)."""
    scores = np.asarray(scores).ravel()
    return float(np.count_nonzero(scores >= threshold) / scores.size) if scores.size else float("nan")


def pair_scores(
    similarity: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosine scores of a query x gallery similarity matrix, Market-1501 rule."""
    similarity = np.asarray(similarity)
    q_pids, g_pids = np.asarray(q_pids).ravel(), np.asarray(g_pids).ravel()
    q_camids, g_camids = np.asarray(q_camids).ravel(), np.asarray(g_camids).ravel()
    if similarity.shape != (len(q_pids), len(g_pids)) or len(q_camids) != len(q_pids) or len(g_camids) != len(g_pids):
        raise ValueError(
            f"similarity is {similarity.shape} but there are {len(q_pids)} query and {len(g_pids)} gallery labels"
        )
    same_pid = q_pids[:, None] == g_pids[None, :]
    same_cam = q_camids[:, None] == g_camids[None, :]
    return similarity[same_pid & ~same_cam], similarity[~same_pid]


def score_histogram(genuine: np.ndarray, impostor: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict:
    """Counts of both distributions over fixed bins of [-1, 1], small enough for checkpoint metadata."""
    edges = np.linspace(*HISTOGRAM_RANGE, bins + 1)
    return {
        "range": list(HISTOGRAM_RANGE),
        "bins": bins,
        "genuine": _counts(genuine, edges).tolist(),
        "impostor": _counts(impostor, edges).tolist(),
    }


def _counts(scores: np.ndarray, edges: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """np.histogram in chunks (no full-size copy), rounding noise past +-1 clipped into the end bins."""
    scores = np.asarray(scores).ravel()
    total = np.zeros(len(edges) - 1, dtype=np.int64)
    for start in range(0, scores.size, chunk):
        total += np.histogram(np.clip(scores[start:start + chunk], edges[0], edges[-1]), edges)[0]
    return total


@dataclass(frozen=True)
class OperatingPoint:
    far: float
    threshold: float
    tar: float
    realised_far: float
    resolvable: bool  # far * impostor pairs >= 1: at least one false accept can be counted


def operating_point(genuine: np.ndarray, impostor: np.ndarray, far: float) -> OperatingPoint:
    threshold = threshold_at_far(impostor, far)
    return OperatingPoint(
        far=far, threshold=threshold, tar=accept_rate(genuine, threshold),
        realised_far=accept_rate(impostor, threshold), resolvable=far * np.size(impostor) >= 1,
    )


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, fars=REPORTED_FARS) -> dict[str, float | None]:
    """{"1e-2": TAR, ...}; None where there are too few impostor pairs to measure that FAR."""
    return _tar_table([operating_point(genuine, impostor, far) for far in fars])


def _tar_table(points: list[OperatingPoint]) -> dict[str, float | None]:
    return {far_key(p.far): (round(p.tar, 6) if p.resolvable else None) for p in points}


def calibrate_scores(genuine: np.ndarray, impostor: np.ndarray, far: float = DEFAULT_FAR) -> dict:
    """Everything the checkpoint records: the threshold at ``far`` and the figures behind it."""
    if np.size(genuine) == 0:
        raise ValueError("no genuine pairs (same person on another camera): a threshold cannot be checked")
    chosen = operating_point(genuine, impostor, far)
    points = [operating_point(genuine, impostor, f) for f in REPORTED_FARS]
    return {
        "threshold": chosen.threshold,
        "far": far,
        "tar": round(chosen.tar, 6),
        "realised_far": chosen.realised_far,
        "tar_at_far": _tar_table(points),
        "threshold_at_far": {far_key(p.far): p.threshold for p in points},
        "genuine_pairs": int(np.size(genuine)),
        "impostor_pairs": int(np.size(impostor)),
        "rule": "market1501: genuine = same person on another camera; impostor = different person, any camera",
        "histogram": score_histogram(genuine, impostor),
    }


def calibrate_checkpoint(
    checkpoint: str | Path,
    data,
    *,
    far: float = DEFAULT_FAR,
    out: str | Path | None = None,
    device="cpu",
    batch_size: int = 64,
    workers: int = 0,
    progress=None,
) -> dict:
    """Embed ``data``'s query and gallery with the checkpoint, fit the threshold at ``far`` and write
    it into the checkpoint's metadata (in place, or into ``out``). Returns the calibration."""
    from models import load_checkpoint
    from models.checkpoint import write_calibration
    from training.embeddings import query_gallery_similarity, query_gallery_labels

    if not 0 < far < 1:
        raise ValueError(f"--far must be between 0 and 1 (exclusive), got {far}")
    model, info = load_checkpoint(checkpoint, device)
    similarity = query_gallery_similarity(model, data, info.mean, info.std, device, batch_size, workers, progress)
    genuine, impostor = pair_scores(similarity, *query_gallery_labels(data))
    calibration = calibrate_scores(genuine, impostor, far)
    calibration["data"] = str(Path(data.root).resolve())
    calibration["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_calibration(checkpoint, calibration, out)
    return calibration


def summary(calibration: dict) -> dict:
    """The calibration without its histogram: what a command prints."""
    return {k: v for k, v in calibration.items() if k != "histogram"}
