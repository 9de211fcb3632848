"""The PostgreSQL store backend: one gallery, one change log, for several service replicas.

Positions in commit order. A sequence would not do: its values are handed out when asked
for, not when the transaction commits, so the transaction holding 11 can commit before the
one holding 10, and a follower that read "after 10" would never see 10. Here every write
transaction first locks the single row of ``log_head`` (``SELECT ... FOR UPDATE``) and only
then reads, writes and appends its changes at the positions after the head it locked. The
row lock is held until COMMIT, so writers go one at a time, exactly like SQLite's
``BEGIN IMMEDIATE``, and a writer becomes visible to new snapshots before the next writer
gets the lock (PostgreSQL ends a transaction's visibility before it releases its locks).
Any snapshot that sees position p therefore sees every position below p. The positions
are also dense: a rolled-back writer rolls its ``log_head`` update back too.
docs/gallery.md has the argument in full; tests/test_gallery.py races it deliberately.

Durability: every connection sets ``synchronous_commit = on``, so a write returns after its
COMMIT is flushed to the server's WAL (whatever the server's or role's default).

Followers: each write calls ``pg_notify`` in its transaction, which PostgreSQL delivers at
commit, with the new head as payload (never any data). ``wait_for_change`` LISTENs on a
connection of its own and only uses that as a wake-up: the follower then reads the log
by position, which is the truth. After the listening connection was lost it LISTENs again
and returns at once, so that the follower catches up on whatever it missed.

Unreachable server: every call that needs it raises ``StoreUnavailable`` (nothing written).
The pool replaces broken connections and checks each one before lending it, so the first
call after the server comes back works.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from service.store import (
    ChangeBatch, EntryRow, EntryState, NewEntry, ScanBatch, StoreError, StoreUnavailable, Written, blob_to_vector,
    vector_to_blob, vectors_in_order,
)

SCHEMA_VERSION = 1
NOTIFY_CHANNEL = "reid_gallery_changes"
MIGRATION_LOCK = 0x7265_6964  # pg_advisory_xact_lock key: one replica migrates at a time ("reid")
POOL_RECONNECT_S = 10.0  # the pool's backoff gives up after this; the next request starts it afresh

# Schema per version: a database at version v gets MIGRATIONS[v + 1], ... in one transaction.
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE identities (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  DOUBLE PRECISION NOT NULL
);
CREATE TABLE entries (
    id                 BIGSERIAL PRIMARY KEY,  -- never reused: index slots, crop URLs stay valid
    identity_id        BIGINT NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    camera             INTEGER,
    created_at         DOUBLE PRECISION NOT NULL,
    model_fingerprint  TEXT NOT NULL,
    dim                INTEGER NOT NULL,
    vector             BYTEA NOT NULL,  -- float32, little-endian, L2-normalised
    crop               BYTEA            -- JPEG bytes, NULL when crops are not kept
);
-- Out of line and uncompressed: float32 and JPEG bytes do not compress, and index scans
-- then read small rows.
ALTER TABLE entries ALTER COLUMN vector SET STORAGE EXTERNAL;
ALTER TABLE entries ALTER COLUMN crop SET STORAGE EXTERNAL;
CREATE INDEX entries_identity ON entries(identity_id);
CREATE INDEX entries_fingerprint ON entries(model_fingerprint);
-- The change log: one row per entry touched by a committed write, in commit order.
CREATE TABLE changes (
    position    BIGINT PRIMARY KEY,
    entry_id    BIGINT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL
);
-- The last position handed out; its row lock is what puts writers (and positions) in commit order.
CREATE TABLE log_head (
    one       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    position  BIGINT NOT NULL
);
INSERT INTO log_head VALUES (TRUE, 0);
-- Entries per model fingerprint, kept in step by every write: the stale count without a scan.
CREATE TABLE fingerprint_counts (
    fingerprint  TEXT PRIMARY KEY,
    entries      BIGINT NOT NULL
);
-- Bulk imports: rows committed so far per import, so that an interrupted one resumes.
CREATE TABLE imports (
    key         TEXT PRIMARY KEY,
    rows        BIGINT NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL
);
""",
}

_ENTRY_STATE_SQL = (
    "SELECT c.position, c.entry_id, e.identity_id, i.name, e.camera, e.model_fingerprint, e.vector"
    " FROM changes c LEFT JOIN entries e ON e.id = c.entry_id LEFT JOIN identities i ON i.id = e.identity_id"
    " WHERE c.position > %s ORDER BY c.position LIMIT %s"
)
_COPY_ENTRIES = (
    "COPY entries (id, identity_id, camera, created_at, model_fingerprint, dim, vector, crop) FROM STDIN (FORMAT BINARY)"
)
_ENTRY_TYPES = ["int8", "int8", "int4", "float8", "text", "int4", "bytea", "bytea"]


def describe_url(url: str) -> str:
    """The URL without its password, for logs and messages."""
    try:
        p = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{p['user']}@" if p.get("user") else ""
    port = f":{p['port']}" if p.get("port") else ""
    return f"postgresql://{user}{p.get('host', '')}{port}/{p.get('dbname', '')}"


def _reason(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


@dataclass
class _Tx:
    """A write transaction holding the log head's lock: ``log`` appends changes after it."""

    cur: psycopg.Cursor
    position: int  # the head when the lock was taken; moves with every change appended

    def log(self, entry_ids: list[int], now: float) -> int:
        if entry_ids:
            self.cur.execute(
                "INSERT INTO changes(position, entry_id, created_at)"
                " SELECT %s + t.n, t.id, %s FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(id, n)",
                (self.position, now, entry_ids),
            )
            self.position += len(entry_ids)
        return self.position

    def bump_count(self, fingerprint: str, delta: int) -> None:
        if delta:
            self.cur.execute(
                "INSERT INTO fingerprint_counts VALUES (%s, %s) ON CONFLICT (fingerprint)"
                " DO UPDATE SET entries = fingerprint_counts.entries + EXCLUDED.entries",
                (fingerprint, delta),
            )


class PostgresStore:
    """Thread-safe: each call borrows a pooled connection; one connection of its own LISTENs."""

    def __init__(self, url: str, *, pool_size: int = 8, timeout_s: float = 5.0,
                 on_reconnect: Callable[[], None] | None = None):
        self.url, self.timeout_s = url, timeout_s
        self._on_reconnect = on_reconnect or (lambda: None)
        self._conninfo = make_conninfo(
            url, application_name="reid-service", connect_timeout=max(1, round(timeout_s)),
            # A server that vanished without closing the connection (a cut network) is noticed
            # in ~20 s instead of hanging until the kernel gives up (hours).
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=2,
        )
        self._listener: psycopg.Connection | None = None
        self._listener_lock = threading.Lock()
        self._listened_before = False
        # A first connection of our own: its error names the real reason (refused, no such
        # database, authentication), where the pool would only report a timeout.
        with self._connect() as conn:
            self._store_id = self._migrate(conn)
        self._pool = ConnectionPool(
            self._conninfo, min_size=1, max_size=pool_size, kwargs={"autocommit": True},
            configure=self._configure, check=ConnectionPool.check_connection, timeout=timeout_s,
            reconnect_timeout=POOL_RECONNECT_S, name="reid-gallery", open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except psycopg.OperationalError as e:
            self._pool.close()
            raise StoreUnavailable(f"{describe_url(url)}: cannot connect: {_reason(e)}") from None

    # -- connections ----------------------------------------------------------------------

    @staticmethod
    def _configure(conn: psycopg.Connection) -> None:
        conn.execute("SET synchronous_commit = on")  # a 201 means flushed, whatever the server default

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
            self._configure(conn)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"{describe_url(self.url)}: cannot connect: {_reason(e)}") from None
        return conn

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection; a lost or unreachable server becomes ``StoreUnavailable``."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"gallery database unreachable: {_reason(e)}") from None

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    # -- schema ---------------------------------------------------------------------------

    def _migrate(self, conn: psycopg.Connection) -> str:
        """Create or upgrade the schema (one replica at a time); the store id."""
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                version = self._schema_version(conn)
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{describe_url(self.url)}: gallery schema version {version} is newer than this software"
                        f" ({SCHEMA_VERSION}); upgrade it"
                    )
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    conn.execute(MIGRATIONS[v])
                if version == 0:
                    conn.execute("INSERT INTO meta VALUES ('store_id', %s)", (uuid.uuid4().hex,))
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    (str(SCHEMA_VERSION),),
                )
                return conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"{describe_url(self.url)}: {_reason(e)}") from None

    def _schema_version(self, conn: psycopg.Connection) -> int:
        has = conn.execute("SELECT to_regclass('meta') IS NOT NULL, to_regclass('entries') IS NOT NULL").fetchone()
        if has[0]:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            return int(row[0]) if row else 0
        if has[1]:
            raise StoreError(
                f"{describe_url(self.url)}: the database has an 'entries' table that is not a reid gallery;"
                " give the gallery a database of its own"
            )
        return 0

    @property
    def store_id(self) -> str:
        return self._store_id

    def close(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._pool.close()

    # -- writes ---------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[_Tx]:
        """One write: lock the log head first (writers in commit order), move it and notify
        the followers at the end; COMMIT on leaving, ROLLBACK on an exception."""
        with self._connection() as conn, conn.transaction():
            cur = conn.cursor()
            head = cur.execute("SELECT position FROM log_head FOR UPDATE").fetchone()[0]
            tx = _Tx(cur, head)
            yield tx
            if tx.position != head:
                cur.execute("UPDATE log_head SET position = %s", (tx.position,))
                cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(tx.position)))

    def add_entries(self, identity: str, entries: list[NewEntry], fingerprint: str) -> Written:
        return self.add_groups([(identity, entries)], fingerprint)

    def add_groups(
        self, groups: list[tuple[str, list[NewEntry]]], fingerprint: str, progress: tuple[str, int] | None = None
    ) -> Written:
        now = time.time()
        flat = [(identity, e) for identity, entries in groups for e in entries]
        names = sorted({identity for identity, _ in groups})
        with self._transaction() as tx:
            cur = tx.cur
            cur.execute(
                "INSERT INTO identities(name, created_at) SELECT unnest(%s::text[]), %s ON CONFLICT (name) DO NOTHING",
                (names, now),
            )
            identity_ids = dict(cur.execute("SELECT name, id FROM identities WHERE name = ANY(%s)", (names,)).fetchall())
            ids = sorted(r[0] for r in cur.execute(
                "SELECT nextval(pg_get_serial_sequence('entries', 'id')) FROM generate_series(1, %s)", (len(flat),)
            ))
            with cur.copy(_COPY_ENTRIES) as copy:
                copy.set_types(_ENTRY_TYPES)
                for entry_id, (identity, e) in zip(ids, flat):
                    copy.write_row((entry_id, identity_ids[identity], e.camera, now, fingerprint,
                                    int(e.vector.shape[0]), vector_to_blob(e.vector), e.crop))
            tx.bump_count(fingerprint, len(ids))
            position = tx.log(ids, now)
            if progress is not None:
                cur.execute(
                    "INSERT INTO imports VALUES (%s, %s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET rows = EXCLUDED.rows, updated_at = EXCLUDED.updated_at",
                    (*progress, now),
                )
        rows = [EntryRow(entry_id, identity, e.camera, now, fingerprint, e.crop is not None)
                for entry_id, (identity, e) in zip(ids, flat)]
        return Written(ids, position, rows)

    def delete_identity(self, identity: str) -> Written | None:
        now = time.time()
        with self._transaction() as tx:
            row = tx.cur.execute("SELECT id FROM identities WHERE name = %s", (identity,)).fetchone()
            if row is None:
                return None
            deleted = tx.cur.execute(
                "DELETE FROM entries WHERE identity_id = %s RETURNING id, model_fingerprint", row
            ).fetchall()
            for fp, n in Counter(fp for _, fp in deleted).items():
                tx.bump_count(fp, -n)
            tx.cur.execute("DELETE FROM identities WHERE id = %s", row)
            ids = sorted(entry_id for entry_id, _ in deleted)
            position = tx.log(ids, now)
        return Written(ids, position)

    def update_vectors(self, updates: list[tuple[int, np.ndarray]], fingerprint: str) -> Written:
        now = time.time()
        with self._transaction() as tx:
            old = dict(tx.cur.execute(
                "SELECT id, model_fingerprint FROM entries WHERE id = ANY(%s)", ([i for i, _ in updates],)
            ).fetchall())
            done = [(entry_id, vector) for entry_id, vector in updates if entry_id in old]  # deleted meanwhile: skipped
            tx.cur.executemany(
                "UPDATE entries SET vector = %s, dim = %s, model_fingerprint = %s WHERE id = %s",
                [(vector_to_blob(v), int(v.shape[0]), fingerprint, entry_id) for entry_id, v in done],
            )
            for fp, n in Counter(old[entry_id] for entry_id, _ in done).items():
                tx.bump_count(fp, -n)
            tx.bump_count(fingerprint, len(done))
            ids = [entry_id for entry_id, _ in done]
            position = tx.log(ids, now)
        return Written(ids, position)

    # -- the log --------------------------------------------------------------------------

    def head(self) -> int:
        return self._query("SELECT position FROM log_head")[0][0]

    def changes_after(self, position: int, limit: int) -> ChangeBatch:
        with self._connection() as conn:  # one statement: one snapshot, a prefix of the log
            rows = conn.cursor(binary=True).execute(_ENTRY_STATE_SQL, (position, limit)).fetchall()
        present: dict[int, EntryState] = {}
        gone: dict[int, None] = {}
        for _, entry_id, identity_id, name, camera, fp, blob in rows:
            if identity_id is None:
                gone[entry_id] = None
            else:
                present[entry_id] = EntryState(entry_id, identity_id, name, camera, fp, blob_to_vector(blob))
        last = rows[-1][0] if rows else position
        return ChangeBatch(last, list(present.values()), list(gone))

    def scan(self, fingerprint: str, batch: int = 10_000) -> tuple[int, Iterator[ScanBatch]]:
        try:
            conn = self._pool.getconn()
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"gallery database unreachable: {_reason(e)}") from None
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")  # every batch sees the state at `position`
            position = conn.execute("SELECT position FROM log_head").fetchone()[0]
        except psycopg.OperationalError as e:
            self._pool.putconn(conn)
            raise StoreUnavailable(f"gallery database unreachable: {_reason(e)}") from None

        def batches() -> Iterator[ScanBatch]:
            try:
                cur, last = conn.cursor(binary=True), 0
                while True:
                    rows = cur.execute(
                        "SELECT e.id, e.identity_id, i.name, e.camera, e.vector FROM entries e"
                        " JOIN identities i ON e.identity_id = i.id"
                        " WHERE e.model_fingerprint = %s AND e.id > %s ORDER BY e.id LIMIT %s",
                        (fingerprint, last, batch),
                    ).fetchall()
                    if not rows:
                        return
                    last = rows[-1][0]
                    yield ScanBatch(
                        entry_ids=np.array([r[0] for r in rows], dtype=np.int64),
                        identity_ids=np.array([r[1] for r in rows], dtype=np.int64),
                        identities=[r[2] for r in rows],
                        cameras=[r[3] for r in rows],
                        vectors=np.stack([blob_to_vector(r[4]) for r in rows]),
                    )
            except psycopg.OperationalError as e:
                raise StoreUnavailable(f"gallery database unreachable: {_reason(e)}") from None
            finally:
                try:
                    conn.execute("ROLLBACK")  # read only: nothing to commit
                except psycopg.OperationalError:
                    pass  # a broken connection: the pool discards it
                self._pool.putconn(conn)

        return position, batches()

    def wait_for_change(self, after: int, timeout: float) -> None:
        """Return at a notification of a position past ``after``, after ``timeout``, or at once
        when the listening connection was just (re)made: what happened before it was missed."""
        with self._listener_lock:
            if self._listener is None:
                self._listener = self._connect()
                try:
                    self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
                except psycopg.OperationalError as e:
                    self._drop_listener()
                    raise StoreUnavailable(f"gallery database unreachable: {_reason(e)}") from None
                if self._listened_before:
                    self._on_reconnect()
                self._listened_before = True
                return
            deadline = time.monotonic() + timeout
            try:
                while (left := deadline - time.monotonic()) > 0:
                    for notify in self._listener.notifies(timeout=left, stop_after=1):
                        if int(notify.payload) > after:
                            return
            except psycopg.OperationalError as e:
                self._drop_listener()
                raise StoreUnavailable(f"gallery database unreachable: {_reason(e)}") from None

    def _drop_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def import_progress(self, key: str) -> int:
        rows = self._query("SELECT rows FROM imports WHERE key = %s", (key,))
        return rows[0][0] if rows else 0

    # -- reads ----------------------------------------------------------------------------

    def count_identities(self) -> int:
        return self._query("SELECT COUNT(*) FROM identities")[0][0]

    def counts_by_fingerprint(self) -> dict[str, int]:
        return dict(self._query("SELECT fingerprint, entries FROM fingerprint_counts WHERE entries > 0"))

    def list_identities(self, offset: int, limit: int) -> list[tuple[str, int]]:
        # Byte order (COLLATE "C"), as SQLite sorts: the same page whatever the database's locale.
        return self._query(
            "SELECT i.name, (SELECT COUNT(*) FROM entries e WHERE e.identity_id = i.id)"
            ' FROM identities i ORDER BY i.name COLLATE "C" LIMIT %s OFFSET %s',
            (limit, offset),
        )

    def identity_entries(self, identity: str) -> list[EntryRow] | None:
        with self._connection() as conn:
            found = conn.execute("SELECT id FROM identities WHERE name = %s", (identity,)).fetchone()
            if found is None:
                return None
            rows = conn.execute(
                "SELECT id, camera, created_at, model_fingerprint, crop IS NOT NULL FROM entries"
                " WHERE identity_id = %s ORDER BY id",
                found,
            ).fetchall()
        return [EntryRow(r[0], identity, r[1], r[2], r[3], bool(r[4])) for r in rows]

    def crop(self, entry_id: int) -> bytes | None:
        rows = self._query("SELECT crop FROM entries WHERE id = %s", (entry_id,))
        return rows[0][0] if rows else None

    def vectors(self, entry_ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in entry_ids]
        rows = self._query("SELECT id, vector FROM entries WHERE id = ANY(%s)", (ids,))
        return vectors_in_order(ids, {i: blob_to_vector(bytes(blob)) for i, blob in rows})

    def stale_entries(self, fingerprint: str, after_id: int = 0, batch: int = 256) -> list[tuple[int, bytes | None]]:
        return self._query(
            "SELECT id, crop FROM entries WHERE model_fingerprint != %s AND id > %s ORDER BY id LIMIT %s",
            (fingerprint, after_id, batch),
        )
