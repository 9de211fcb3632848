"""Open-set decisions and tracklet aggregation in the service, as pure functions and on a Gallery."""

from __future__ import annotations

import numpy as np
import pytest

from service.decision import Threshold, configured_threshold, decide, passes, threshold_for_query
from service.gallery import Gallery
from service.index import IndexPlanSettings, SearchSettings
from service.sqlite_store import SQLiteStore
from service.tracklet import DegenerateTracklet, aggregate


def test_threshold_precedence_query_then_setting_then_checkpoint():
    assert configured_threshold(None, None) is None
    assert configured_threshold(None, 0.7) == Threshold(0.7, "checkpoint")
    assert configured_threshold(0.6, 0.7) == Threshold(0.6, "setting")
    assert configured_threshold(0.6, None) == Threshold(0.6, "setting")
    assert threshold_for_query(0.9, Threshold(0.6, "setting")) == Threshold(0.9, "query")
    assert threshold_for_query(0.9, None) == Threshold(0.9, "query")  # works without calibration too
    assert threshold_for_query(None, Threshold(0.7, "checkpoint")) == Threshold(0.7, "checkpoint")
    assert threshold_for_query(None, None) is None


def test_decision_is_known_at_or_above_the_threshold():
    t = Threshold(0.8, "checkpoint")
    assert decide(0.8, t) == "known" and passes(0.8, t) is True
    assert decide(0.79, t) == "unknown" and passes(0.79, t) is False
    assert decide(None, t) == "unknown"  # empty gallery: nobody known
    assert decide(0.99, None) is None and passes(0.99, None) is None  # uncalibrated: a plain ranking


def test_tracklet_aggregate_is_the_renormalised_mean_of_unit_embeddings():
    crops = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]], dtype=np.float32)
    # mean = (1.6/3, 1.8/3, 0); its norm = sqrt(1.6^2 + 1.8^2) / 3
    norm = np.hypot(1.6, 1.8)
    assert aggregate(crops) == pytest.approx([1.6 / norm, 1.8 / norm, 0.0])
    assert np.linalg.norm(aggregate(crops)) == pytest.approx(1.0)
    assert np.array_equal(aggregate(crops[2:]), crops[2])  # one crop: itself
    with pytest.raises(DegenerateTracklet, match="cancel out"):
        aggregate(np.array([[1.0, 0.0], [-1.0, 0.0]]))
    with pytest.raises(ValueError, match="N >= 1"):
        aggregate(np.zeros((0, 3)))


def test_likely_duplicates_name_other_identities_above_the_threshold(tmp_path):
    store = SQLiteStore(tmp_path / "g.sqlite3")
    g = Gallery.open(store, fingerprint="fp", dim=3, plan=IndexPlanSettings(setting="flat"), search=SearchSettings(),
                     snapshot_dir=tmp_path / "index")
    g.enroll("alice", np.array([[1.0, 0.0, 0.0]], dtype=np.float32), [None], camera=None)
    g.enroll("bob", np.array([[0.0, 1.0, 0.0]], dtype=np.float32), [None], camera=None)
    new = np.array([[0.96, 0.28, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)  # like alice; like nobody
    found = g.likely_duplicates("carol", new, threshold=0.9)
    assert [(m.identity, round(m.score, 4)) for m in found] == [("alice", 0.96)]
    assert g.likely_duplicates("alice", new, threshold=0.9) == []  # more crops of alice herself
    assert g.likely_duplicates("carol", new, threshold=0.97) == []
    store.close()
