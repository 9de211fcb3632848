"""Open-set (watchlist) evaluation: some people are enrolled, everyone is queried.

Protocol. A random ``enroll_fraction`` of the test identities is enrolled: their gallery
images form the watchlist (distractors and everyone else are left out). Every query is
then searched against it, as the service does with ``by=identity``: the answer is the best
identity and its score (the best entry's). Same person on the same camera is removed per
query (Market-1501 rule); a mated query left with no entry of its own identity is skipped.

* mated query: its person is enrolled. A *detection and identification* is the right
  identity ranked first with a score at or above the threshold.
* non-mated query: its person was never enrolled. A *false alarm* is any identity scored at
  or above the threshold.

DIR(t) = identified mated queries / mated queries; FAR(t) = false alarms / non-mated
queries. DIR@FAR fits t on the non-mated best scores (``calibration.threshold_at_far``).
Note that this FAR is per query and over the whole watchlist, so it is larger than the
pair-level FAR of the calibrated threshold: a stranger has as many chances as there are
enrolled identities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.calibration import accept_rate, far_key, threshold_at_far

OPEN_SET_FARS = (1e-1, 1e-2)


@dataclass(frozen=True)
class WatchlistScores:
    mated_score: np.ndarray  # best score of each mated query
    mated_correct: np.ndarray  # its best identity is its own
    nonmated_score: np.ndarray  # best score of each non-mated query

    def dir_at(self, threshold: float) -> float:
        hits = self.mated_correct & (self.mated_score >= threshold)
        return float(hits.mean()) if hits.size else float("nan")

    def false_alarm_rate(self, threshold: float) -> float:
        return accept_rate(self.nonmated_score, threshold)

    def rank1(self) -> float:
        """Closed-set rank-1 on the mated queries (no threshold)."""
        return float(self.mated_correct.mean()) if self.mated_correct.size else float("nan")


def choose_enrolled(test_pids, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random ``fraction`` of the distinct identities (distractor 0 and junk -1 never), at least one,
    and at least one left out."""
    if not 0 < fraction < 1:
        raise ValueError(f"--enroll-fraction must be between 0 and 1 (exclusive), got {fraction}")
    ids = np.unique(np.asarray(test_pids))
    ids = ids[ids > 0]
    if ids.size < 2:
        raise ValueError("open-set evaluation needs at least 2 test identities (one enrolled, one not)")
    count = min(max(1, int(round(fraction * ids.size))), ids.size - 1)
    return np.sort(rng.choice(ids, size=count, replace=False))


def watchlist_scores(similarity, q_pids, g_pids, q_camids, g_camids, enrolled) -> WatchlistScores:
    """Best watchlist identity and score for every query of a query x gallery similarity matrix.

    The best identity is the identity of the best entry (an identity scores at its best entry).
    """
    similarity = np.asarray(similarity)
    q_pids, g_pids = np.asarray(q_pids).ravel(), np.asarray(g_pids).ravel()
    q_camids, g_camids = np.asarray(q_camids).ravel(), np.asarray(g_camids).ravel()
    on_list = np.isin(g_pids, enrolled)
    removed = (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] == g_camids[None, :])
    usable = on_list[None, :] & ~removed
    scores = np.where(usable, similarity, -np.inf)
    best = scores.argmax(axis=1)
    best_score = scores[np.arange(len(q_pids)), best]
    best_pid = g_pids[best]

    mated = np.isin(q_pids, enrolled)
    has_own = (usable & (q_pids[:, None] == g_pids[None, :])).any(axis=1)
    mated_rows = mated & has_own
    nonmated_rows = ~mated & (q_pids > 0) & np.isfinite(best_score)
    return WatchlistScores(
        mated_score=best_score[mated_rows],
        mated_correct=best_pid[mated_rows] == q_pids[mated_rows],
        nonmated_score=best_score[nonmated_rows],
    )


def open_set_report(scores: WatchlistScores, threshold: float | None, fars=OPEN_SET_FARS) -> dict:
    """DIR and false-alarm rate at ``threshold`` (None: skipped) and DIR at each per-query FAR."""
    report = {
        "mated_queries": int(scores.mated_score.size),
        "nonmated_queries": int(scores.nonmated_score.size),
        "rank1": scores.rank1(),
        "dir_at_far": {},
        "threshold_at_far": {},  # what to set REID_MATCH_THRESHOLD to for that false-alarm rate
    }
    for far in fars:
        resolvable = far * scores.nonmated_score.size >= 1
        t = threshold_at_far(scores.nonmated_score, far) if resolvable else None
        report["dir_at_far"][far_key(far)] = scores.dir_at(t) if t is not None else None
        report["threshold_at_far"][far_key(far)] = t
    if threshold is not None:
        report["dir_at_threshold"] = scores.dir_at(threshold)
        report["false_alarm_rate"] = scores.false_alarm_rate(threshold)
    return report


def average_reports(reports: list[dict]) -> dict:
    """Mean of each figure over repeated random watchlists (None where any repeat could not measure it)."""
    def mean(values):
        return None if any(v is None for v in values) else round(float(np.mean(values)), 6)

    tables = ("dir_at_far", "threshold_at_far")
    out = {k: mean([r[k] for r in reports]) for k in reports[0] if k not in tables}
    for table in tables:
        out[table] = {k: mean([r[table][k] for r in reports]) for k in reports[0][table]}
    return out
