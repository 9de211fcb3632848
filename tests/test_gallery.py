"""The gallery in-process: the index kinds, the store's change log, following it, snapshots,
rebuilds, and the checks of import-vectors. Real SQLite, PostgreSQL and FAISS throughout: the
store and gallery tests run against both backends (the `backend` fixture)."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from service.gallery import Gallery
from service.index import IndexPlanSettings, IndexSpec, SearchSettings, VectorIndex, ivf_lists_for, plan_index
from service.postgres_store import PostgresStore
from service.sqlite_store import SQLiteStore
from service.store import GalleryStore, NewEntry
from service.vector_import import VectorFileError, import_vectors, read_vector_file

DIM = 16
FLAT = IndexPlanSettings(setting="flat")
HNSW = IndexPlanSettings(setting="hnsw", hnsw_m=8)


def unit(rng, n, d=DIM):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(index: VectorIndex, vectors, identities, cameras=None) -> None:
    names = sorted(set(identities))
    ids = np.array([names.index(i) for i in identities])
    index.upsert(np.arange(len(vectors)), ids, list(identities), cameras or [None] * len(vectors), vectors)


KINDS = {
    "flat": IndexSpec("flat", "Flat"),
    "hnsw": IndexSpec("hnsw", "HNSW16,Flat", 40),
    "ivf": IndexSpec("ivf", "IVF4,Flat"),
    "ivf-sq8": IndexSpec("ivf", "IVF4,SQ8"),
}


def make_index(kind: str, vectors, identities, cameras=None, **search) -> VectorIndex:
    spec = KINDS[kind]
    # nprobe 1 of 4 cells: filtered searches must widen the probe, not just the shortlist
    index = VectorIndex(vectors.shape[1], spec, SearchSettings(ivf_nprobe=1, hnsw_ef_search=16, **search))
    if spec.needs_training():
        index.train(vectors)
    fill(index, vectors, identities, cameras)
    if spec.compressed:  # the exact vectors, as the gallery gives them from the store
        index.exact_vectors = lambda entry_ids: vectors[entry_ids]
    return index


# -- the index ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_index_ranks_by_cosine_and_groups_by_identity(kind):
    rng = np.random.default_rng(0)
    vectors = unit(rng, 400)
    index = make_index(kind, vectors, [f"p{i % 100}" for i in range(400)])
    query = vectors[10]
    by_entry = index.search(query, 5, by="entry")
    assert by_entry[0].entry_id == 10 and by_entry[0].score == pytest.approx(1.0, abs=1e-4)
    by_identity = index.search(query, 50, by="identity")
    assert len({m.identity for m in by_identity}) == 50 == len(by_identity)
    assert by_identity[0].identity == "p10"
    scores = [m.score for m in by_identity]
    assert scores == sorted(scores, reverse=True)
    if kind in ("flat", "ivf-sq8"):  # exact, or re-scored exactly
        np.testing.assert_allclose([m.score for m in by_entry], np.sort(vectors @ query)[::-1][:5], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_filtered_and_grouped_searches_still_return_k(kind):
    """A rare camera and many entries per identity: the approximate shortlist is mostly filtered
    out, so the search must widen until k survive."""
    rng = np.random.default_rng(1)
    vectors = unit(rng, 600)
    cameras = [2 if i % 60 == 0 else 1 for i in range(600)]  # 10 entries on camera 2
    index = make_index(kind, vectors, [f"p{i // 20}" for i in range(600)], cameras)  # 20 entries per identity
    only2 = index.search(vectors[5], 10, by="entry", camera=2)
    assert sorted(m.entry_id for m in only2) == list(range(0, 600, 60))
    not1 = index.search(vectors[5], 10, by="entry", exclude_camera=1)
    assert len(not1) == 10 and all(m.camera == 2 for m in not1)
    identities = index.search(vectors[5], 25, by="identity")
    assert len({m.identity for m in identities}) == 25


@pytest.mark.parametrize("kind", KINDS)
def test_removed_and_replaced_entries_never_come_back(kind):
    rng = np.random.default_rng(2)
    vectors = unit(rng, 100)
    index = make_index(kind, vectors, [f"p{i // 10}" for i in range(100)])
    assert index.remove(range(0, 30)) == 30 and index.remove([0, 5, 999]) == 0
    assert len(index) == 70 and index.identity_count == 7
    results = index.search(vectors[3], 100, by="entry")
    assert len(results) == 70 and all(m.entry_id >= 30 for m in results)
    # A re-embedded entry: the old vector is gone, the new one found.
    new, old = unit(rng, 1), vectors[40].copy()
    vectors[40] = new[0]  # what the store now holds
    index.upsert(np.array([40]), np.array([4]), ["p4"], [None], new)
    assert len(index) == 70
    assert index.search(new[0], 1, by="entry")[0].entry_id == 40
    assert all(m.entry_id != 40 for m in index.search(old, 3, by="entry"))


def test_plan_index_auto_is_exact_when_small_and_ivf_when_large():
    plan = IndexPlanSettings(setting="auto", exact_max_entries=100_000)
    assert plan_index(plan, 0).kind == "flat"
    assert plan_index(plan, 100_000).kind == "flat"
    big = plan_index(plan, 1_000_000)
    assert big.kind == "ivf" and big.factory == f"IVF{ivf_lists_for(1_000_000)},Flat"
    # Forced IVF on a gallery too small to learn its cells from: exact until it grows.
    assert plan_index(IndexPlanSettings(setting="ivf"), 1_000).kind == "flat"
    assert plan_index(IndexPlanSettings(setting="hnsw", storage="sq8"), 10).kind == "flat"  # nothing to learn from yet
    assert plan_index(IndexPlanSettings(setting="hnsw", storage="sq8"), 5_000).factory == "HNSW32,SQ8"


# -- the store's log ----------------------------------------------------------------------


class Backend:
    """Opens stores onto one gallery: a SQLite file under tmp_path, or a fresh PostgreSQL
    database. Each ``open()`` is a new connection, as another process would have."""

    def __init__(self, name: str, tmp_path, cluster=None):
        self.name, self.tmp_path, self.cluster = name, tmp_path, cluster
        self.url = cluster.create_database() if cluster else None
        self.opened: list[GalleryStore] = []

    def open(self) -> GalleryStore:
        store = PostgresStore(self.url) if self.cluster else SQLiteStore(self.tmp_path / "g.sqlite3")
        self.opened.append(store)
        return store

    def another(self, tmp_path) -> "Backend":
        """Another gallery of the same kind."""
        other = Backend(self.name, tmp_path, self.cluster)
        other.opened = self.opened  # closed with this one
        return other

    def restore_older(self, work) -> None:
        """Copy the gallery (a backup), run ``work()`` on the original, then put the copy back."""
        if self.cluster is None:
            shutil.copy(self.tmp_path / "g.sqlite3", self.tmp_path / "older.sqlite3")
            work()
            (self.tmp_path / "g.sqlite3-wal").unlink(missing_ok=True)
            shutil.copy(self.tmp_path / "older.sqlite3", self.tmp_path / "g.sqlite3")
        else:
            import psycopg

            older = f"{self.url.rsplit('/', 1)[1]}_older"
            with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {older} TEMPLATE {self.url.rsplit('/', 1)[1]}")
            work()
            self.url = self.cluster.url(older)

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    cluster = request.getfixturevalue("postgres") if request.param == "postgres" else None
    b = Backend(request.param, tmp_path, cluster)
    yield b
    b.close()


def test_every_write_gets_growing_positions_in_one_transaction(backend):
    store = backend.open()
    v = unit(np.random.default_rng(3), 4)
    a = store.add_entries("a", [NewEntry(v[0]), NewEntry(v[1])], "fp")
    b = store.add_groups([("b", [NewEntry(v[2])]), ("c", [NewEntry(v[3])])], "fp")
    d = store.delete_identity("a")
    u = store.update_vectors([(b.entry_ids[0], v[0]), (12345, v[1])], "fp2")  # a missing entry is skipped
    assert (a.position, b.position, d.position, u.position) == (2, 4, 6, 7) and store.head() == 7
    assert d.entry_ids == a.entry_ids and u.entry_ids == b.entry_ids[:1]
    assert store.counts_by_fingerprint() == {"fp": 1, "fp2": 1}
    with pytest.raises(Exception):  # a failure mid-transaction writes nothing, log included
        store.add_entries("e", [NewEntry(v[0]), NewEntry(vector="not a vector")], "fp")
    assert store.head() == 7 and store.identity_entries("e") is None

    everything = store.changes_after(0, 100)
    assert everything.last_position == 7
    assert sorted(everything.gone) == a.entry_ids  # deleted: gone, whatever the change said then
    states = {s.entry_id: s for s in everything.present}
    assert states[b.entry_ids[0]].fingerprint == "fp2"  # the state now, not at position 3
    np.testing.assert_array_equal(states[b.entry_ids[0]].vector, v[0])
    assert store.changes_after(4, 100).last_position == 7 and store.changes_after(7, 100).last_position == 7
    assert store.changes_after(0, 3).last_position == 3


def test_store_is_durable_and_ids_never_reused(backend):
    store = backend.open()
    first = store.add_entries("a", [NewEntry(np.ones(4, np.float32), 1, b"jpg")], "fp")
    store.delete_identity("a")
    second = store.add_entries("a", [NewEntry(np.ones(4, np.float32), 1, b"jpg")], "fp")
    assert second.entry_ids[0] > first.entry_ids[0]
    store.close()
    reopened = backend.open()
    (row,) = reopened.identity_entries("a")
    assert row.camera == 1 and row.has_crop and reopened.crop(row.entry_id) == b"jpg"
    if isinstance(reopened, SQLiteStore):
        assert reopened._query("PRAGMA journal_mode")[0][0] == "wal"
        assert reopened._query("PRAGMA synchronous")[0][0] == 2  # FULL
    else:  # even where the database's default says otherwise
        import psycopg

        with psycopg.connect(backend.url, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {backend.url.rsplit('/', 1)[1]} SET synchronous_commit = off")
        with psycopg.connect(backend.url) as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
        assert backend.open()._query("SHOW synchronous_commit")[0][0] == "on"
    assert reopened.store_id == store.store_id and reopened.head() == 3


OLD_SCHEMA = """
CREATE TABLE identities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, identity_id INTEGER NOT NULL REFERENCES identities(id)
    ON DELETE CASCADE, camera INTEGER, created_at REAL NOT NULL, model_fingerprint TEXT NOT NULL, dim INTEGER NOT NULL,
    vector BLOB NOT NULL, crop BLOB);
"""


def test_a_store_from_before_the_log_is_migrated(tmp_path):
    path = tmp_path / "g.sqlite3"
    vectors = unit(np.random.default_rng(4), 3)
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO identities VALUES (1, 'old', 0)")
        for i, v in enumerate(vectors):
            conn.execute("INSERT INTO entries(identity_id, camera, created_at, model_fingerprint, dim, vector)"
                         " VALUES (1, ?, 0, ?, ?, ?)", (i, "fp" if i else "other", DIM, v.tobytes()))
    store = SQLiteStore(path)
    assert store.head() == 3 and store.counts_by_fingerprint() == {"fp": 2, "other": 1}
    gallery = Gallery.open(store, fingerprint="fp", dim=DIM, plan=FLAT, search=SearchSettings(),
                           snapshot_dir=tmp_path / "index")
    assert (gallery.stats.entries, gallery.stats.stale_entries) == (2, 1)
    assert gallery.search(vectors[1], 1)[0].identity == "old"


# -- the gallery following the log ---------------------------------------------------------


def open_gallery(tmp_path, plan=FLAT, fingerprint="fp", store=None, backend: Backend | None = None) -> Gallery:
    store = store or (backend.open() if backend else SQLiteStore(tmp_path / "g.sqlite3"))
    return Gallery.open(store, fingerprint=fingerprint, dim=DIM, plan=plan, search=SearchSettings(),
                        snapshot_dir=tmp_path / "index")


def enroll_people(gallery: Gallery, rng, people: int, per_person: int = 3) -> dict[str, np.ndarray]:
    vectors = {}
    for p in range(people):
        v = unit(rng, per_person)
        gallery.enroll(f"p{p}", v, [None] * per_person, p % 3)
        vectors[f"p{p}"] = v
    return vectors


def test_enrollment_is_searchable_when_it_returns_and_a_second_writer_is_followed(tmp_path, backend):
    gallery = open_gallery(tmp_path, backend=backend)
    rng = np.random.default_rng(5)
    vectors = enroll_people(gallery, rng, 4)
    assert gallery.search(vectors["p2"][1], 1)[0].identity == "p2"  # read-your-writes
    other = backend.open()  # another process's connection (an import, another replica)
    outside = unit(rng, 2)
    other.add_entries("outside", [NewEntry(v) for v in outside], "fp")
    other.delete_identity("p0")
    assert gallery.search(outside[0], 1)[0].identity != "outside"  # not applied yet
    assert gallery.catch_up() == 5
    assert gallery.search(outside[0], 1)[0].identity == "outside"
    assert all(m.identity != "p0" for m in gallery.search(vectors["p0"][0], 10))
    assert (gallery.stats.entries, gallery.stats.identities, gallery.position) == (11, 4, other.head())


class PausingStore(SQLiteStore):
    """The real SQLite store whose stale-entry count can be held open, to look inside a catch-up."""

    def __init__(self, path):
        super().__init__(path)
        self.hold, self.inside, self.release = False, threading.Event(), threading.Event()

    def counts_by_fingerprint(self):
        if self.hold:
            self.inside.set()
            self.release.wait(10)
        return super().counts_by_fingerprint()


def test_stats_never_report_an_older_position_than_searches_see(tmp_path):
    store = PausingStore(tmp_path / "g.sqlite3")
    gallery = open_gallery(tmp_path, store=store)
    rng = np.random.default_rng(7)
    outside = unit(rng, 2)
    other = SQLiteStore(tmp_path / "g.sqlite3")  # another writer: the gallery learns of it by catching up
    other.add_entries("outside", [NewEntry(v) for v in outside], "fp")
    store.hold = True
    follower = threading.Thread(target=gallery.catch_up)
    follower.start()
    try:
        assert store.inside.wait(10)  # the changes are applied; the store query after them is pending
        assert gallery.search(outside[0], 1)[0].identity == "outside"
        assert (gallery.stats.position, gallery.stats.entries) == (other.head(), 2)  # /readyz and metrics
    finally:
        store.release.set()
        follower.join(10)
    other.close()


def test_concurrent_writers_and_followers_end_in_the_store_state(tmp_path, backend):
    gallery = open_gallery(tmp_path, backend=backend)
    rng = np.random.default_rng(6)
    vectors = unit(rng, 200)

    def writer(w: int) -> None:
        store = backend.open()
        for i in range(w, 200, 4):
            store.add_entries(f"w{w}-{i % 5}", [NewEntry(vectors[i])], "fp")
            if i % 7 == 0:
                store.delete_identity(f"w{w}-{(i + 1) % 5}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    followers = [threading.Thread(target=lambda: [gallery.catch_up() for _ in range(50)]) for _ in range(2)]
    for t in threads + followers:
        t.start()
    for t in threads + followers:
        t.join()
    gallery.catch_up()
    store = gallery.store
    expected = {name: n for name, n in store.list_identities(0, 1000) if n}
    assert gallery.stats.entries == sum(expected.values())
    found = {}
    for m in gallery.search(vectors[0], 200, by="entry"):
        found[m.identity] = found.get(m.identity, 0) + 1
    assert found == expected


def test_positions_are_in_commit_order_when_writers_race(tmp_path, backend):
    """The race a sequence loses: writer A takes the next position and keeps its transaction
    open; writer B writes meanwhile; a follower reads in between. If B could commit a later
    position first, the follower would move past A's position and never apply A."""
    follower = open_gallery(tmp_path, backend=backend)
    a_store, b_store = backend.open(), backend.open()
    v = unit(np.random.default_rng(20), 2)
    a_holds, release_a, b_done = threading.Event(), threading.Event(), threading.Event()
    taking_positions = a_store._transaction

    @contextmanager
    def held_open():
        with taking_positions() as tx:
            yield tx
            a_holds.set()  # A's entry and change are written, its position taken, not committed
            assert release_a.wait(30)

    a_store._transaction = held_open
    a = threading.Thread(target=lambda: a_store.add_entries("a", [NewEntry(v[0])], "fp"))
    # B shares no row with A (another identity, another model's count: an import or a reembed
    # job), so nothing but the log itself can put the two in order.
    b = threading.Thread(target=lambda: (b_store.add_entries("b", [NewEntry(v[1])], "fp-other"), b_done.set()))
    a.start()
    assert a_holds.wait(30)
    b.start()
    time.sleep(0.5)  # long enough for B to commit, if it could take a position
    follower.catch_up()  # the follower reads in between
    # B cannot take a position while A's is uncommitted: nothing after A's position for the follower to skip to.
    assert not b_done.is_set() and follower.position == 0
    release_a.set()
    a.join(30)
    b.join(30)
    assert b_done.is_set()
    assert follower.catch_up() == 2 and follower.position == 2 == backend.open().head()
    assert follower.search(v[0], 1)[0].identity == "a" and follower.stats.stale_entries == 1
    a_entry = a_store.identity_entries("a")[0].entry_id
    assert a_store.changes_after(0, 1).present[0].entry_id == a_entry  # A committed first: position 1


@pytest.mark.parametrize("plan", [FLAT, HNSW], ids=["flat", "hnsw"])
def test_snapshot_round_trip_replays_newer_changes_exactly_once(tmp_path, plan, backend):
    gallery = open_gallery(tmp_path, plan, backend=backend)
    rng = np.random.default_rng(7)
    vectors = enroll_people(gallery, rng, 6)
    gallery.snapshot()
    before = gallery.search(vectors["p3"][0], 6)
    late = unit(rng, 2)
    gallery.enroll("late", late, [None, None], None)  # after the snapshot
    assert gallery.delete("p1")  # after the snapshot: must not come back
    gallery.store.close()

    again = open_gallery(tmp_path, plan, backend=backend)
    assert again.replayed_at_open == 5  # 2 enrolled + 3 deleted, each once
    assert again._index.dead_fraction == 3 / 20  # p1's 3 of 18 + 2 slots: none added twice
    assert again.stats.entries == 6 * 3 - 3 + 2
    assert again.search(late[1], 1)[0].identity == "late"
    assert all(m.identity != "p1" for m in again.search(vectors["p1"][0], 10))
    assert [m for m in again.search(vectors["p3"][0], 6) if m.identity != "p1"][:4] == \
        [m for m in before if m.identity != "p1"][:4]


def test_deleted_identity_stays_gone_after_snapshot_and_restart(tmp_path, backend):
    gallery = open_gallery(tmp_path, HNSW, backend=backend)
    rng = np.random.default_rng(8)
    vectors = enroll_people(gallery, rng, 4)
    assert gallery.delete("p2")
    gallery.snapshot()  # the snapshot holds p2's vectors in dead slots
    gallery.store.close()
    again = open_gallery(tmp_path, HNSW, backend=backend)
    assert again.replayed_at_open == 0
    assert all(m.identity != "p2" for m in again.search(vectors["p2"][0], 10, by="entry"))
    assert again.identity_entries("p2") is None


def damage(tmp_path, backend) -> None:
    path = next((tmp_path / "index").glob("*.faiss"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign(tmp_path, backend) -> None:
    other = tmp_path / "other"
    other.mkdir()
    g = open_gallery(other, backend=backend.another(other))
    enroll_people(g, np.random.default_rng(9), 6)
    g.snapshot()
    shutil.rmtree(tmp_path / "index")
    shutil.copytree(other / "index", tmp_path / "index")


def ahead(tmp_path, backend) -> None:
    """The store restored from an older backup: the snapshot covers changes it no longer has."""

    def more_then_snapshot():
        g = open_gallery(tmp_path, backend=backend)
        enroll_people(g, np.random.default_rng(10), 2)
        g.snapshot()
        g.store.close()

    backend.restore_older(more_then_snapshot)


@pytest.mark.parametrize("spoil, reason", [
    (lambda tmp, _: (tmp / "index" / "manifest.json").unlink(), "no snapshot"),
    (damage, "damaged"),
    (lambda tmp, _: (tmp / "index" / "manifest.json").write_text("{not json"), "unreadable manifest"),
    (foreign, "another gallery store"),
    (ahead, "past the store's last"),
])
def test_unusable_snapshot_is_rebuilt_from_the_store_with_one_log_line(tmp_path, caplog, spoil, reason, backend):
    gallery = open_gallery(tmp_path, backend=backend)
    vectors = enroll_people(gallery, np.random.default_rng(11), 5)
    gallery.snapshot()
    gallery.store.close()
    spoil(tmp_path, backend)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.gallery"):
        again = open_gallery(tmp_path, backend=backend)
    lines = [r.getMessage() for r in caplog.records if "snapshot not used" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines
    assert again.stats.entries == 15 and again.search(vectors["p4"][2], 1)[0].identity == "p4"


def test_snapshot_of_another_model_or_index_setting_is_not_used(tmp_path, caplog, backend):
    gallery = open_gallery(tmp_path, backend=backend)
    enroll_people(gallery, np.random.default_rng(12), 3)
    gallery.snapshot()
    gallery.store.close()
    with caplog.at_level(logging.INFO, logger="service.gallery"):
        other_model = open_gallery(tmp_path, fingerprint="fp-new", backend=backend)
        other_model.store.close()
        other_kind = open_gallery(tmp_path, HNSW, backend=backend)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "made for model fp" in messages and "other index settings" in messages
    assert other_model.stats.entries == 0 and other_model.stats.stale_entries == 9
    assert other_kind.stats.entries == 9 and other_kind.stats.index_kind == "hnsw"


def test_background_rebuild_swaps_in_a_fitting_index_without_losing_changes(tmp_path, backend):
    plan = IndexPlanSettings(setting="auto", exact_max_entries=50, ivf_lists=2)
    gallery = open_gallery(tmp_path, plan, backend=backend)
    rng = np.random.default_rng(13)
    vectors = enroll_people(gallery, rng, 40)  # 120 entries: past the exact limit, IVF now fits
    assert gallery.stats.index_kind == "flat"
    assert "call for IVF2,Flat" in gallery.rebuild_reason()

    late = unit(rng, 1)
    original_build = __import__("service.gallery", fromlist=["_build_index"])._build_index

    def build_then_write(*args, **kwargs):  # a write lands while the new index is being built
        built = original_build(*args, **kwargs)
        gallery.enroll("during", late, [None], None)
        return built

    import service.gallery as module
    module._build_index = build_then_write
    try:
        gallery.rebuild("test")
    finally:
        module._build_index = original_build
    assert gallery.stats.index_kind == "ivf" and gallery.rebuild_reason() is None
    assert gallery.stats.entries == 121
    assert gallery.search(late[0], 1)[0].identity == "during"
    assert gallery.search(vectors["p7"][0], 1)[0].identity == "p7"

    for p in range(30):  # most slots dead: compaction
        gallery.delete(f"p{p}")
    assert "dead" in gallery.rebuild_reason()
    gallery.rebuild("compaction")
    assert gallery._index.dead_fraction == 0 and gallery.stats.entries == 31


def test_compressed_gallery_rescores_from_the_store_and_answers_without_it(tmp_path, backend):
    plan = IndexPlanSettings(setting="ivf", ivf_lists=4, storage="sq8")
    gallery = open_gallery(tmp_path, plan, backend=backend)
    rng = np.random.default_rng(15)
    vectors = np.concatenate(list(enroll_people(gallery, rng, 60).values()))  # 180 entries: IVF4,SQ8 fits
    gallery.rebuild("grown")
    assert gallery.stats.index_kind == "ivf" and gallery._index.spec.factory == "IVF4,SQ8"
    query = vectors[50]
    exact = np.sort(vectors @ query)[::-1][:5]
    np.testing.assert_allclose([m.score for m in gallery.search(query, 5, by="entry")], exact, atol=1e-6)
    gallery.store.close()  # the store goes away: approximate scores, still the right person first
    matches = gallery.search(query, 5, by="entry")
    assert matches[0].identity == "p16" and abs(matches[0].score - 1.0) < 0.02


# -- import-vectors checks ------------------------------------------------------------------


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def good_arrays(n=6, d=DIM):
    rng = np.random.default_rng(14)
    return {"identity": np.array([f"id{i // 2}" for i in range(n)]), "vector": rng.normal(size=(n, d)).astype(np.float32),
            "camera": np.array([i % 3 - 1 for i in range(n)])}


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("vector"), "missing array(s) vector"),
    (lambda a: a.pop("identity"), "missing array(s) identity"),
    (lambda a: a.update(vector=a["vector"][:, :8]), "N x 16"),
    (lambda a: a["vector"].__setitem__((3, 2), np.nan), "NaN or infinity (first at row 3)"),
    (lambda a: a["vector"].__setitem__((1, 0), np.inf), "first at row 1"),
    (lambda a: a["vector"].__setitem__(4, 0.0), "zero (first at row 4)"),
    (lambda a: a.update(identity=a["identity"][:5]), "one string per vector"),
    (lambda a: a.update(camera=a["camera"][:2]), "one integer per vector"),
    (lambda a: a.update(camera=np.array([-5, 0, 0, 0, 0, 0])), "camera at row 0 is -5"),
    (lambda a: a.update(identity=np.array(["a", "b", "", "c", "d", "e"])), "identity at row 2: identity is empty"),
    (lambda a: a.update(identity=np.array([1, 2, 3, 4, 5, 6], dtype=object)), "not pickled objects"),
    (lambda a: a.update(vector=np.zeros((0, DIM), np.float32), identity=np.array([], dtype=str)), "no rows"),
])
def test_bad_vector_files_name_the_problem(tmp_path, change, message):
    arrays = good_arrays()
    change(arrays)
    path = write_npz(tmp_path / "v.npz", **arrays)
    with pytest.raises(VectorFileError) as e:
        read_vector_file(path, DIM)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_vectors_are_normalised_and_import_resumes_after_the_last_whole_chunk(tmp_path, backend):
    data = read_vector_file(write_npz(tmp_path / "v.npz", **good_arrays(n=10)), DIM)
    np.testing.assert_allclose(np.linalg.norm(data.vectors, axis=1), 1.0, atol=1e-6)
    assert data.cameras[:3] == [None, 0, 1]
    store = backend.open()
    real_add = store.add_groups
    calls = []

    def crash_on_third(groups, fingerprint, progress=None):
        calls.append(progress)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the operator's ^C in the middle of the import
        return real_add(groups, fingerprint, progress)

    store.add_groups = crash_on_third
    with pytest.raises(KeyboardInterrupt):
        import_vectors(store, data, "fp", chunk_rows=4)
    assert store.counts_by_fingerprint() == {"fp": 8}  # two whole chunks
    store.add_groups = real_add
    assert import_vectors(store, data, "fp", chunk_rows=4) == (8, 2)
    assert import_vectors(store, data, "fp", chunk_rows=4) == (10, 0)  # a finished import does nothing
    assert store.counts_by_fingerprint() == {"fp": 10}
    assert dict(store.list_identities(0, 100)) == {f"id{i}": 2 for i in range(5)}
