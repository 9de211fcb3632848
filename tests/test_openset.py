"""Open-set (watchlist) figures on a hand-made similarity matrix."""

import numpy as np
import pytest

from training.openset import average_reports, choose_enrolled, open_set_report, watchlist_scores

# Gallery: g0 = person 1 on camera 2, g1 = 2@c2, g2 = 3@c1, g3 = 4@c1, g4 = distractor (0) @c3.
G_PIDS, G_CAMS = [1, 2, 3, 4, 0], [2, 2, 1, 1, 3]
# Queries: 1@c1, 2@c1, 3@c1, 4@c2 and 1@c2 (whose only own entry, g0, shares its camera).
Q_PIDS, Q_CAMS = [1, 2, 3, 4, 1], [1, 1, 1, 2, 2]
SIMILARITY = np.array([
    [0.90, 0.50, 0.95, 0.10, 0.99],  # right identity first among the enrolled (g2, g4 are not enrolled)
    [0.80, 0.60, 0.00, 0.00, 0.00],  # person 2 mistaken for person 1
    [0.70, 0.30, 0.99, 0.00, 0.00],  # never enrolled: best watchlist score 0.70 (g2 is itself, off the list)
    [0.40, 0.45, 0.00, 0.99, 0.00],  # never enrolled: 0.45
    [0.99, 0.85, 0.00, 0.00, 0.00],  # g0 removed (same person, same camera): no own entry left, skipped
])
ENROLLED = [1, 2]


def scores():
    return watchlist_scores(SIMILARITY, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, ENROLLED)


def test_best_watchlist_identity_per_query():
    s = scores()
    assert s.mated_score.tolist() == [0.90, 0.80] and s.mated_correct.tolist() == [True, False]
    assert s.nonmated_score.tolist() == [0.70, 0.45]


def test_dir_and_false_alarms_at_a_threshold():
    s = scores()
    assert s.dir_at(0.75) == 0.5 and s.false_alarm_rate(0.75) == 0.0
    assert s.dir_at(0.5) == 0.5 and s.false_alarm_rate(0.5) == 0.5
    assert s.dir_at(0.95) == 0.0 and s.rank1() == 0.5


def test_report_fits_dir_at_far_on_the_strangers():
    report = open_set_report(scores(), threshold=0.75, fars=(0.5, 0.1))
    # FAR 0.5 of two strangers: one may pass -> threshold just above 0.45 -> q0 (0.90, right) identified.
    assert report["dir_at_far"] == {"5e-1": 0.5, "1e-1": None}  # 0.1 x 2 strangers < 1: not measurable
    assert report["threshold_at_far"] == {"5e-1": np.nextafter(0.45, 1), "1e-1": None}
    assert report["dir_at_threshold"] == 0.5 and report["false_alarm_rate"] == 0.0
    assert report["mated_queries"] == 2 and report["nonmated_queries"] == 2
    assert "dir_at_threshold" not in open_set_report(scores(), threshold=None)
    averaged = average_reports([report, {**report, "rank1": 1.0, "dir_at_far": {"5e-1": 1.0, "1e-1": None}}])
    assert averaged["threshold_at_far"]["5e-1"] == pytest.approx(0.45)
    assert averaged["rank1"] == 0.75 and averaged["dir_at_far"] == {"5e-1": 0.75, "1e-1": None}


def test_enrolled_subset_is_seeded_and_leaves_someone_out():
    pids = [0, 0, 1, 1, 2, 3, 4, 5, -1]
    a = choose_enrolled(pids, 0.5, np.random.default_rng(3))
    assert a.tolist() == choose_enrolled(pids, 0.5, np.random.default_rng(3)).tolist()
    assert len(a) == 2 and set(a) <= {1, 2, 3, 4, 5}  # round(0.5 x 5); never the distractor or junk
    assert len(choose_enrolled(pids, 0.99, np.random.default_rng(0))) == 4
    with pytest.raises(ValueError, match="between 0 and 1"):
        choose_enrolled(pids, 1.0, np.random.default_rng(0))
