"""Calibration maths: the threshold at a FAR is exact, pairs follow the Market-1501 rule."""

import numpy as np
import pytest

from training.calibration import (
    accept_rate, calibrate_scores, far_key, pair_scores, score_histogram, tar_at_far, threshold_at_far,
)

# Ten impostor scores 0.1 .. 1.0 and five genuine ones: a distribution small enough to check by hand.
IMPOSTOR = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
GENUINE = np.array([0.75, 0.85, 0.95, 0.97, 0.99])


def test_threshold_at_far_is_the_lowest_that_keeps_the_far():
    # FAR 0.1 of 10 impostors: one may pass (1.0). Any threshold at or below 0.9 lets two through.
    t = threshold_at_far(IMPOSTOR, 0.1)
    assert t == np.nextafter(0.9, np.inf)
    assert accept_rate(IMPOSTOR, t) == 0.1
    assert accept_rate(IMPOSTOR, 0.9) == 0.2
    assert accept_rate(GENUINE, t) == 0.6  # 0.95, 0.97, 0.99
    # 0.3 -> three may pass; 0.25 -> floor(2.5) = 2; 0.05 -> none: above the highest impostor.
    assert threshold_at_far(IMPOSTOR, 0.3) == np.nextafter(0.7, np.inf)
    assert threshold_at_far(IMPOSTOR, 0.25) == np.nextafter(0.8, np.inf)
    assert threshold_at_far(IMPOSTOR, 0.05) == np.nextafter(1.0, np.inf)


def test_ties_at_the_boundary_lower_the_realised_far_rather_than_exceed_it():
    scores = np.array([0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    t = threshold_at_far(scores, 0.1)  # one may pass, but three share the top score: none does
    assert t == np.nextafter(0.5, np.inf) and accept_rate(scores, t) == 0.0


def test_float32_scores_never_exceed_the_far():
    """A float64 step above a float32 score is rounded back onto it when numpy compares the
    threshold with float32 scores: the threshold is stepped in the scores' own precision."""
    scores = np.random.default_rng(0).random(760_637).astype(np.float32)
    t = threshold_at_far(scores, 1e-3)
    assert np.count_nonzero(scores >= t) == 760 == np.count_nonzero(scores.astype(np.float64) >= t)
    below = np.nextafter(np.float32(t), np.float32(-np.inf))
    assert np.count_nonzero(scores >= below) == 761


@pytest.mark.parametrize("far", [0.0, 1.0, -0.1, 2.0])
def test_far_must_be_a_fraction(far):
    with pytest.raises(ValueError, match="far must be between 0 and 1"):
        threshold_at_far(IMPOSTOR, far)


def test_no_impostors_is_an_error():
    with pytest.raises(ValueError, match="no impostor pairs"):
        threshold_at_far(np.array([]), 0.1)


def test_pairs_follow_the_market1501_rule():
    # queries: person 1 on camera 1, person 2 on camera 2; gallery: 1@c1 (same camera: removed),
    # 1@c2 (genuine), 2@c1 (genuine for q2, impostor for q1), 0@c3 (distractor: impostor for both).
    similarity = np.array([[0.9, 0.8, 0.3, 0.1], [0.2, 0.4, 0.7, 0.0]])
    genuine, impostor = pair_scores(similarity, [1, 2], [1, 1, 2, 0], [1, 2], [1, 2, 1, 3])
    assert sorted(genuine.tolist()) == [0.7, 0.8]
    assert sorted(impostor.tolist()) == [0.0, 0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match="2 query and 3 gallery labels"):
        pair_scores(similarity, [1, 2], [1, 1, 2], [1, 2], [1, 2, 1])


def test_calibration_record_and_tar_table():
    c = calibrate_scores(GENUINE, IMPOSTOR, far=0.1)
    assert c["threshold"] == np.nextafter(0.9, np.inf) and c["tar"] == 0.6 and c["realised_far"] == 0.1
    assert c["genuine_pairs"] == 5 and c["impostor_pairs"] == 10
    # 10 impostors cannot measure a FAR of 1e-2 or less: reported as null, not as a fake figure.
    assert c["tar_at_far"] == {"1e-2": None, "1e-3": None, "1e-4": None}
    assert sum(c["histogram"]["genuine"]) == 5 and sum(c["histogram"]["impostor"]) == 10
    many = np.linspace(0, 0.7, 1000)  # 1000 impostors resolve 1e-2 and 1e-3; all genuine scores pass
    assert tar_at_far(GENUINE, many) == {"1e-2": 1.0, "1e-3": 1.0, "1e-4": None}
    with pytest.raises(ValueError, match="no genuine pairs"):
        calibrate_scores(np.array([]), IMPOSTOR)


def test_histogram_bins_and_far_keys():
    h = score_histogram(np.array([1.0, 0.99, -1.0]), np.array([0.0, 1.0000001]), bins=4)
    assert h["range"] == [-1.0, 1.0] and h["genuine"] == [1, 0, 0, 2] and h["impostor"] == [0, 0, 1, 1]
    assert [far_key(f) for f in (1e-2, 1e-3, 1e-4, 0.05)] == ["1e-2", "1e-3", "1e-4", "5e-2"]
