"""k-reciprocal re-ranking (service.rerank) on a hand-made example, and inside Gallery.search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.gallery import Gallery
from service.index import IndexPlanSettings, SearchSettings
from service.rerank import k_reciprocal_distances, rerank_order
from service.sqlite_store import SQLiteStore

# Probe P; its true matches T1, T2 (a tight pair); a decoy D closer to P than T1, whose own nearest
# neighbours are its cluster E1, E2. Distances by hand (symmetric):
NAMES = ["P", "T1", "T2", "D", "E1", "E2"]
PAIRS = {
    ("P", "T1"): 0.30, ("P", "T2"): 0.35, ("P", "D"): 0.25, ("P", "E1"): 0.60, ("P", "E2"): 0.62,
    ("T1", "T2"): 0.05, ("T1", "D"): 0.55, ("T1", "E1"): 0.80, ("T1", "E2"): 0.82,
    ("T2", "D"): 0.60, ("T2", "E1"): 0.85, ("T2", "E2"): 0.87,
    ("D", "E1"): 0.10, ("D", "E2"): 0.12, ("E1", "E2"): 0.04,
}


def hand_made() -> np.ndarray:
    dist = np.zeros((6, 6))
    for (a, b), d in PAIRS.items():
        dist[NAMES.index(a), NAMES.index(b)] = dist[NAMES.index(b), NAMES.index(a)] = d
    return dist


def test_k_reciprocal_rule_on_a_hand_made_example():
    """k1=2, k2=1 (no query expansion), lambda=0.3, worked by hand:
    N(P,2) = {P, D, T1}. D's two nearest are E1, E2, so P is not in N(D,2): D is not a reciprocal
    neighbour of P. T1's are T2, P: T1 is. R(P,2) = {P, T1}; expanding by R(j,1) keeps R*(P) = {P, T1}
    (R(T1,1) = {T1, T2} shares 1 < 2/3 x 2 members with it). R*(T1) = {T1, T2, P}; R*(D) = {D, E1, E2}.
    With V_i[j] = exp(-d(i,j)) on R*(i):
      d_J(P, T1) = 1 - (e^-.3 + e^-.3) / (1 + 1 + e^-.05)            -> final 0.7 d_J + 0.3 x 0.30
      d_J(P, T2) = 1 - e^-.3 / (1 + e^-.05 + 1)   (R*(T2) = {T2, T1}) -> final 0.7 d_J + 0.3 x 0.35
      d_J(P, D) = 1 (nothing shared)                                  -> final 0.7 + 0.3 x 0.25
    so the decoy D drops from first to third, behind both true matches."""
    final = k_reciprocal_distances(hand_made(), k1=2, k2=1, lambda_=0.3)
    e = math.exp
    expected = {
        "P": 0.0,
        "T1": 0.7 * (1 - 2 * e(-0.3) / (2 + e(-0.05))) + 0.3 * 0.30,
        "T2": 0.7 * (1 - e(-0.3) / (2 + e(-0.05))) + 0.3 * 0.35,
        "D": 0.7 + 0.3 * 0.25,
        "E1": 0.7 + 0.3 * 0.60,
        "E2": 0.7 + 0.3 * 0.62,
    }
    assert final == pytest.approx([expected[n] for n in NAMES])
    before = [NAMES[i] for i in np.argsort(hand_made()[0], kind="stable")]
    after = [NAMES[i] for i in np.argsort(final, kind="stable")]
    assert before == ["P", "D", "T1", "T2", "E1", "E2"]
    assert after == ["P", "T1", "T2", "D", "E1", "E2"]


def test_lambda_one_keeps_the_original_distances():
    assert k_reciprocal_distances(hand_made(), k1=2, k2=1, lambda_=1.0) == pytest.approx(hand_made()[0])


def test_query_expansion_averages_the_k2_nearest_encodings():
    # k2=2: V_P becomes the mean of V_P and V_D (D is P's nearest), so P now shares D's cluster.
    with_expansion = k_reciprocal_distances(hand_made(), k1=2, k2=2, lambda_=0.3)
    without = k_reciprocal_distances(hand_made(), k1=2, k2=1, lambda_=0.3)
    assert with_expansion[NAMES.index("D")] < without[NAMES.index("D")]


def unit_angles(*degrees: float) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_rerank_order_on_unit_vectors():
    """The same picture on the unit circle: decoy at 25 degrees with its cluster at 33 and 35,
    true matches at -28 and -31; cosine distances between unit vectors."""
    shortlist = unit_angles(25, -28, -31, 33, 35)
    order, final = rerank_order(unit_angles(0)[0], shortlist, k1=2, k2=1)
    assert order.tolist() == [1, 2, 0, 3, 4]  # the true matches first, the decoy after them
    assert len(final) == 5


@pytest.fixture
def gallery(tmp_path):
    """40 entries of 10 identities (4 each, tight clusters) in an 8-d space."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(10, 8))
    vectors = np.repeat(centres, 4, axis=0) + 0.35 * rng.normal(size=(40, 8))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    store = SQLiteStore(tmp_path / "g.sqlite3")
    g = Gallery.open(store, fingerprint="fp", dim=8, plan=IndexPlanSettings(setting="flat"), search=SearchSettings(),
                     snapshot_dir=tmp_path / "index")
    for i in range(10):
        g.enroll(f"id{i}", vectors[4 * i: 4 * i + 4], [None] * 4, camera=i % 3)
    yield g, vectors
    store.close()


def test_gallery_reranks_its_shortlist_with_the_stored_vectors(gallery):
    g, vectors = gallery
    query = vectors[5] + 0.3 * np.random.default_rng(1).normal(size=8).astype(np.float32)
    query /= np.linalg.norm(query)
    plain = g.search(query, 20, by="entry")
    reranked = g.search(query, 20, by="entry", rerank_shortlist=20)
    order, _ = rerank_order(query, vectors[[m.entry_id - 1 for m in plain]])  # entry ids start at 1
    assert [m.entry_id for m in reranked] == [plain[i].entry_id for i in order]
    assert {m.entry_id: m.score for m in reranked} == {m.entry_id: m.score for m in plain}  # still cosines
    by_identity = g.search(query, 5, rerank_shortlist=20)
    firsts = []
    for m in reranked:
        if m.identity not in firsts:
            firsts.append(m.identity)
    assert [m.identity for m in by_identity] == firsts[:5]


def test_a_short_shortlist_is_filled_from_the_plain_ranking(gallery):
    g, vectors = gallery
    # 8 entries re-ranked hold at most a few identities; the other 7 asked for come from the plain ranking.
    result = g.search(vectors[0], 10, rerank_shortlist=8)
    assert len(result) == 10 and len({m.identity for m in result}) == 10
    shortlisted = {m.identity for m in g.search(vectors[0], 8, by="entry")}
    assert {m.identity for m in result[: len(shortlisted)]} == shortlisted
    # Camera filters apply to the shortlist too.
    assert all(m.camera == 1 for m in g.search(vectors[0], 10, camera=1, rerank_shortlist=8))


def test_a_shortlist_entry_deleted_during_the_search_is_left_out(gallery):
    g, vectors = gallery
    real_vectors = g.store.vectors

    def deleted_meanwhile(entry_ids):  # id1's entries vanish between the search and the re-rank
        found = real_vectors(entry_ids)
        found[np.isin(entry_ids, [5, 6, 7, 8])] = np.nan
        return found

    g.store.vectors = deleted_meanwhile
    after = g.search(vectors[4], 10, by="entry", rerank_shortlist=40)  # the shortlist holds id1's entries
    assert len(after) == 10 and not {5, 6, 7, 8} & {m.entry_id for m in after}
