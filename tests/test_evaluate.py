"""CMC / mAP / mINP under the Market-1501 protocol, checked against rankings worked out by hand."""

import numpy as np
import pytest

import training.evaluate as evaluate
from training.evaluate import cmc_map


def _one_query(distances, g_pids, g_cams, q_pid=1, q_cam=1, max_rank=5):
    return cmc_map(np.array([distances], dtype=float), np.array([q_pid]), np.array(g_pids),
                   np.array([q_cam]), np.array(g_cams), max_rank=max_rank)


def test_same_person_same_camera_is_removed_but_other_people_on_that_camera_count():
    # Ranked: pid1/cam1 (removed), pid2/cam1 (a real miss), pid1/cam2 (first true match).
    result = _one_query([0.0, 0.1, 0.2], g_pids=[1, 2, 1], g_cams=[1, 1, 2], max_rank=3)
    np.testing.assert_allclose(result["cmc"], [0.0, 1.0, 1.0])
    assert result["mAP"] == pytest.approx(0.5)


def test_distractors_are_ordinary_misses_and_ap_inp_by_hand():
    # After removing pid1/cam1: pid2, pid1/c2 (rank 2), pid0 distractor, pid1/c3 (rank 4).
    result = _one_query([0.0, 0.1, 0.2, 0.3, 0.4], g_pids=[1, 2, 1, 0, 1], g_cams=[1, 2, 2, 3, 3])
    np.testing.assert_allclose(result["cmc"], [0, 1, 1, 1, 1])
    assert result["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert result["mINP"] == pytest.approx(2 / 4)


def test_two_queries_averaged_and_query_without_cross_camera_match_is_skipped():
    g_pids = np.array([1, 2, 1, 3, 2])
    g_cams = np.array([2, 2, 3, 1, 3])
    distmat = np.array([
        [0.1, 0.2, 0.3, 0.4, 0.5],  # pid1/c1: matches at ranks 1 and 3 -> AP 5/6, INP 2/3
        [0.1, 0.5, 0.9, 0.9, 0.2],  # pid2/c1: ranking 1, 2(c3), 2(c2), ... matches at 2, 3 -> AP (1/2+2/3)/2
        [0.9, 0.9, 0.9, 0.0, 0.9],  # pid3/c1: its only gallery image is on camera 1 -> skipped
    ])
    result = cmc_map(distmat, np.array([1, 2, 3]), g_pids, np.array([1, 1, 1]), g_cams, max_rank=4)
    np.testing.assert_allclose(result["cmc"], [0.5, 1.0, 1.0, 1.0])
    assert result["mAP"] == pytest.approx((5 / 6 + (1 / 2 + 2 / 3) / 2) / 2)
    assert result["mINP"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_cmc_longer_than_gallery_keeps_its_last_value():
    result = _one_query([0.3, 0.1], g_pids=[1, 5], g_cams=[2, 2], max_rank=6)
    assert result["cmc"].shape == (6,)
    np.testing.assert_allclose(result["cmc"], [0, 1, 1, 1, 1, 1])


def test_outputs_are_fractions_of_the_right_shape():
    rng = np.random.default_rng(0)
    result = cmc_map(rng.random((7, 30)), rng.integers(1, 4, 7), rng.integers(0, 4, 30),
                     rng.integers(1, 3, 7), rng.integers(1, 4, 30), max_rank=50)
    assert result["cmc"].shape == (50,)
    assert np.all(np.diff(result["cmc"]) >= 0)
    assert 0.0 <= result["cmc"][0] <= result["cmc"][-1] <= 1.0
    assert 0.0 < result["mINP"] <= result["mAP"] <= 1.0
    assert isinstance(result["mAP"], float) and isinstance(result["mINP"], float)


def test_no_query_with_a_match_is_an_error_that_says_so():
    with pytest.raises(ValueError, match="no query has a true match"):
        _one_query([0.1, 0.2], g_pids=[1, 2], g_cams=[1, 3])


@pytest.mark.parametrize(
    "distmat, q_pids, g_pids, message",
    [
        (np.zeros((2, 3)), [1], [1, 2, 3], "2 query rows"),
        (np.zeros((1, 3)), [1], [1, 2], "3 gallery columns"),
        (np.zeros(3), [1], [1, 2, 3], "2-D"),
        (np.full((1, 3), np.nan), [1], [1, 2, 3], "NaN"),
    ],
)
def test_mismatched_inputs_are_rejected(distmat, q_pids, g_pids, message):
    with pytest.raises(ValueError, match=message):
        cmc_map(distmat, np.array(q_pids), np.array(g_pids), np.ones(len(q_pids)), np.arange(len(g_pids)))


def _reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
    """Slow, obvious version: one query at a time, a python list of kept gallery entries."""
    cmcs, aps, inps = [], [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        hits = [g_pids[j] == q_pids[i] for j in order if not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        positions = [rank for rank, hit in enumerate(hits, start=1) if hit]
        if not positions:
            continue
        cmcs.append([1.0 if positions[0] <= k else 0.0 for k in range(1, max_rank + 1)])
        aps.append(np.mean([n / rank for n, rank in enumerate(positions, start=1)]))
        inps.append(len(positions) / positions[-1])
    return np.mean(cmcs, axis=0), np.mean(aps), np.mean(inps)


@pytest.mark.parametrize("block_elements", [4_000_000, 37])
def test_agrees_with_a_slow_reference_on_random_data(monkeypatch, block_elements):
    # A tiny block size forces many query blocks, so block boundaries are exercised too.
    monkeypatch.setattr(evaluate, "_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(7)
    for _ in range(10):
        nq, ng = int(rng.integers(5, 40)), int(rng.integers(20, 120))
        distmat = rng.random((nq, ng)).round(2)  # rounding makes ties; both sides break them by gallery order
        q_pids, g_pids = rng.integers(1, 8, nq), rng.integers(0, 8, ng)
        q_cams, g_cams = rng.integers(1, 4, nq), rng.integers(1, 4, ng)
        result = cmc_map(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
        cmc, mean_ap, mean_inp = _reference(distmat, q_pids, g_pids, q_cams, g_cams, 20)
        np.testing.assert_allclose(result["cmc"], cmc)
        assert result["mAP"] == pytest.approx(mean_ap)
        assert result["mINP"] == pytest.approx(mean_inp)
