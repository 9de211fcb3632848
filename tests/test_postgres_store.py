"""What only the PostgreSQL store does: its schema version, LISTEN/NOTIFY as a wake-up that
survives a lost connection, and a server that is unreachable or goes away and comes back.
The behaviour both backends share is tested against both in tests/test_gallery.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest

from service.gallery import Gallery
from service.index import IndexPlanSettings, SearchSettings
from service.postgres_store import SCHEMA_VERSION, PostgresStore
from service.store import NewEntry, StoreError, StoreUnavailable
from tests.pg_support import PostgresCluster, free_port

DIM = 8


def vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def open_gallery(store, tmp_path) -> Gallery:
    return Gallery.open(store, fingerprint="fp", dim=DIM, plan=IndexPlanSettings(setting="flat"),
                        search=SearchSettings(), snapshot_dir=tmp_path / "index")


def test_schema_version_is_recorded_and_a_newer_or_foreign_schema_refused(postgres):
    url = postgres.create_database()
    store = PostgresStore(url)
    assert dict(store._query("SELECT key, value FROM meta"))["schema_version"] == str(SCHEMA_VERSION)
    again = PostgresStore(url)  # a second replica starting: nothing created twice, same store
    assert again.store_id == store.store_id
    store._query("UPDATE meta SET value = %s WHERE key = 'schema_version' RETURNING key", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1} is newer") as e:
        PostgresStore(url)
    assert not isinstance(e.value, StoreUnavailable)  # not worth retrying
    store.close(), again.close()

    foreign = postgres.create_database()
    with psycopg.connect(foreign, autocommit=True) as conn:
        conn.execute("CREATE TABLE entries (id int)")
    with pytest.raises(StoreError, match="not a reid gallery"):
        PostgresStore(foreign)


def test_replicas_starting_together_make_one_schema(postgres):
    url = postgres.create_database()
    ids, errors = [], []

    def start() -> None:
        try:
            store = PostgresStore(url)
            ids.append(store.store_id)
            store.close()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 4 and len(set(ids)) == 1


def test_unreachable_server_is_store_unavailable_naming_the_reason():
    where = f"127.0.0.1:{free_port()}/gallery"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as e:
        PostgresStore(f"postgresql://reid:s3cret@{where}", timeout_s=1)
    assert time.monotonic() - started < 10
    message = str(e.value)
    assert "\n" not in message and "refused" in message.lower()
    assert f"postgresql://reid@{where}" in message and "s3cret" not in message


def test_a_notification_wakes_the_follower_and_a_lost_listener_listens_again(postgres, tmp_path):
    url = postgres.create_database()
    reconnects = []
    store = PostgresStore(url, on_reconnect=lambda: reconnects.append(1))
    writer = PostgresStore(url)
    gallery = open_gallery(store, tmp_path)
    v = vectors(3)

    store.wait_for_change(gallery.position, 5)  # the first call connects and LISTENs: returns at once
    threading.Timer(0.3, lambda: writer.add_entries("a", [NewEntry(v[0])], "fp")).start()
    started = time.monotonic()
    store.wait_for_change(gallery.position, 10)
    assert 0.2 < time.monotonic() - started < 5  # woken by the commit's notification, not the timeout
    assert gallery.catch_up() == 1

    # The listening connection is cut (a server restart, a network blip) and a write lands meanwhile.
    with psycopg.connect(url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' AND datname = %s",
            (url.rsplit("/", 1)[1],),
        ).fetchall()
    assert killed == [(True,)]
    writer.add_entries("b", [NewEntry(v[1])], "fp")  # its notification is lost with the connection
    with pytest.raises(StoreUnavailable):
        store.wait_for_change(gallery.position, 5)
    started = time.monotonic()
    store.wait_for_change(gallery.position, 5)  # LISTENs again and returns at once: catch up now
    assert time.monotonic() - started < 2 and reconnects == [1]
    assert gallery.catch_up() == 1 and gallery.search(v[1], 1)[0].identity == "b"
    threading.Timer(0.3, lambda: writer.add_entries("c", [NewEntry(v[2])], "fp")).start()
    started = time.monotonic()
    store.wait_for_change(gallery.position, 10)  # and notifications wake it again
    assert time.monotonic() - started < 5
    writer.close(), store.close()


def test_server_down_fails_writes_whole_and_the_same_store_works_when_it_is_back(tmp_path):
    with PostgresCluster() as cluster:
        url = cluster.create_database()
        store = PostgresStore(url, timeout_s=1)
        gallery = open_gallery(store, tmp_path)
        v = vectors(3)
        gallery.enroll("before", v[:1], [None], None)
        cluster.stop()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.add_entries("during", [NewEntry(v[1]), NewEntry(v[2])], "fp")
        with pytest.raises(StoreUnavailable):
            gallery.catch_up()
        assert gallery.search(v[0], 1)[0].identity == "before"  # the index still answers
        cluster.start()
        deadline = time.monotonic() + 20
        while True:  # the pool replaces its dead connections: no new store object needed
            try:
                written = store.add_entries("after", [NewEntry(v[1])], "fp")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not recover"
                time.sleep(0.2)
        assert store.identity_entries("during") is None  # the failed write left nothing
        assert written.position == 2 and store.head() == 2
        assert gallery.catch_up() == 1 and gallery.search(v[1], 1)[0].identity == "after"
        store.close()


def test_a_write_committed_just_before_the_database_went_away_is_acknowledged(postgres, tmp_path):
    """The COMMIT succeeded, the read-your-writes catch-up after it did not: answering an error
    would make the client retry and store the crops twice. The write is acknowledged and
    becomes searchable here when the follower can read the log again."""
    store = PostgresStore(postgres.create_database())
    gallery = open_gallery(store, tmp_path)
    v = vectors(1)
    read_log = store.changes_after

    def unreachable(*args):
        raise StoreUnavailable("gallery database unreachable: server closed the connection unexpectedly")

    store.changes_after = unreachable
    rows = gallery.enroll("committed", v, [None], None)
    assert [r.identity for r in rows] == ["committed"] and store.head() == 1
    store.changes_after = read_log
    assert gallery.catch_up() == 1 and gallery.search(v[0], 1)[0].identity == "committed"
    store.close()
