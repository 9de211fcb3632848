"""The embedded store backend: SQLite in WAL mode under the data directory.

Durability: journal_mode=WAL with synchronous=FULL. In WAL mode NORMAL already survives a
killed process (the WAL is in the OS page cache), but a power loss can drop the last
commits; FULL fsyncs the WAL at every commit, so an acknowledged write is on stable
storage. Every write is one ``BEGIN IMMEDIATE`` transaction: SQLite lets one writer in at a
time (across processes too), so the AUTOINCREMENT positions of the change log are handed
out in commit order, which is what a follower reading "after P" needs.

Two connections: one for writes, one for reads, so that a read never waits for a write's
fsync (WAL readers see the last committed state). A rebuild's scan opens a third, holding
one read transaction for a consistent view.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from service.store import (
    ChangeBatch, EntryRow, EntryState, NewEntry, ScanBatch, StoreError, Written, blob_to_vector, vector_to_blob,
    vectors_in_order,
)

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: index slots, crop URLs stay valid
    identity_id        INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    camera             INTEGER,
    created_at         REAL NOT NULL,
    model_fingerprint  TEXT NOT NULL,
    dim                INTEGER NOT NULL,
    vector             BLOB NOT NULL,  -- float32, little-endian, L2-normalised
    crop               BLOB            -- JPEG bytes, NULL when crops are not kept
);
CREATE INDEX IF NOT EXISTS entries_identity ON entries(identity_id);
CREATE INDEX IF NOT EXISTS entries_fingerprint ON entries(model_fingerprint);
-- The change log: one row per entry touched by a committed write, in commit order.
CREATE TABLE IF NOT EXISTS changes (
    position    INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id    INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
-- Entries per model fingerprint, kept in step by every write: the stale count without a scan.
CREATE TABLE IF NOT EXISTS fingerprint_counts (
    fingerprint  TEXT PRIMARY KEY,
    entries      INTEGER NOT NULL
);
-- Bulk imports: rows committed so far per import, so that an interrupted one resumes.
CREATE TABLE IF NOT EXISTS imports (
    key         TEXT PRIMARY KEY,
    rows        INTEGER NOT NULL,
    updated_at  REAL NOT NULL
);
"""

_ENTRY_STATE_SQL = (
    "SELECT c.position, c.entry_id, e.identity_id, i.name, e.camera, e.model_fingerprint, e.vector"
    " FROM changes c LEFT JOIN entries e ON e.id = c.entry_id LEFT JOIN identities i ON i.id = e.identity_id"
    " WHERE c.position > ? ORDER BY c.position LIMIT ?"
)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class SQLiteStore:
    """Thread-safe: each connection has its own lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = _connect(self.path)
            self._reader = _connect(self.path)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the gallery store: {e}") from None
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = threading.Event()
        with self._transaction() as cur:
            self._migrate(cur)
        self._store_id = self._query("SELECT value FROM meta WHERE key = 'store_id'")[0][0]

    # -- schema ------------------------------------------------------------------------

    def _migrate(self, cur: sqlite3.Cursor) -> None:
        version = cur.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: gallery schema version {version} is newer than this software ({SCHEMA_VERSION}); upgrade it"
            )
        had_entries = cur.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'entries'"
        ).fetchone() is not None
        for statement in _statements(SCHEMA):
            cur.execute(statement)
        if version < SCHEMA_VERSION:
            if had_entries:  # a version-1 store: every existing entry becomes a change, in id order
                cur.execute("INSERT INTO changes(entry_id, created_at) SELECT id, ? FROM entries ORDER BY id", (time.time(),))
                cur.execute(
                    "INSERT INTO fingerprint_counts SELECT model_fingerprint, COUNT(*) FROM entries GROUP BY model_fingerprint"
                )
            cur.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def store_id(self) -> str:
        return self._store_id

    def close(self) -> None:
        self._closed.set()
        with self._write_lock, self._read_lock:
            self._writer.close()
            self._reader.close()

    # -- writes --------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._write_lock:
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    @staticmethod
    def _identity_id(cur: sqlite3.Cursor, identity: str, now: float) -> int:
        cur.execute("INSERT OR IGNORE INTO identities(name, created_at) VALUES (?, ?)", (identity, now))
        return cur.execute("SELECT id FROM identities WHERE name = ?", (identity,)).fetchone()[0]

    @staticmethod
    def _log_new_entries(cur: sqlite3.Cursor, after_id: int, fingerprint: str, now: float) -> tuple[list[int], int]:
        """Record the entries inserted since ``after_id`` in the log; (their ids, last position)."""
        ids = [r[0] for r in cur.execute("SELECT id FROM entries WHERE id > ? ORDER BY id", (after_id,))]
        cur.execute("INSERT INTO changes(entry_id, created_at) SELECT id, ? FROM entries WHERE id > ? ORDER BY id",
                    (now, after_id))
        _bump_count(cur, fingerprint, len(ids))
        return ids, _last_position(cur)

    def add_entries(self, identity: str, entries: list[NewEntry], fingerprint: str) -> Written:
        """Enrol entries under an identity (created if new) in one committed transaction."""
        return self.add_groups([(identity, entries)], fingerprint)

    def add_groups(
        self, groups: list[tuple[str, list[NewEntry]]], fingerprint: str, progress: tuple[str, int] | None = None
    ) -> Written:
        now = time.time()
        with self._transaction() as cur:
            before = _max_entry_id(cur)
            rows = []
            for identity, entries in groups:
                identity_id = self._identity_id(cur, identity, now)
                rows.extend(
                    (identity_id, e.camera, now, fingerprint, int(e.vector.shape[0]), vector_to_blob(e.vector), e.crop)
                    for e in entries
                )
            cur.executemany(
                "INSERT INTO entries(identity_id, camera, created_at, model_fingerprint, dim, vector, crop)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            ids, position = self._log_new_entries(cur, before, fingerprint, now)
            if progress is not None:
                cur.execute("INSERT OR REPLACE INTO imports VALUES (?, ?, ?)", (*progress, now))
        entry_rows = []
        flat = [(identity, e) for identity, entries in groups for e in entries]
        for entry_id, (identity, e) in zip(ids, flat):
            entry_rows.append(EntryRow(entry_id, identity, e.camera, now, fingerprint, e.crop is not None))
        return Written(ids, position, entry_rows)

    def delete_identity(self, identity: str) -> Written | None:
        """Delete an identity and its entries; None if it does not exist."""
        now = time.time()
        with self._transaction() as cur:
            row = cur.execute("SELECT id FROM identities WHERE name = ?", (identity,)).fetchone()
            if row is None:
                return None
            for fp, n in cur.execute(
                "SELECT model_fingerprint, COUNT(*) FROM entries WHERE identity_id = ? GROUP BY model_fingerprint", row
            ).fetchall():
                _bump_count(cur, fp, -n)
            ids = [r[0] for r in cur.execute("SELECT id FROM entries WHERE identity_id = ? ORDER BY id", row)]
            cur.execute("DELETE FROM entries WHERE identity_id = ?", row)
            cur.execute("DELETE FROM identities WHERE id = ?", row)
            cur.executemany("INSERT INTO changes(entry_id, created_at) VALUES (?, ?)", [(i, now) for i in ids])
            position = _last_position(cur)
        return Written(ids, position)

    def update_vectors(self, updates: list[tuple[int, np.ndarray]], fingerprint: str) -> Written:
        """Replace vectors (reembed) in one transaction; entries deleted meanwhile are skipped."""
        now = time.time()
        with self._transaction() as cur:
            done = []
            for entry_id, vector in updates:
                old = cur.execute("SELECT model_fingerprint FROM entries WHERE id = ?", (entry_id,)).fetchone()
                if old is None:
                    continue
                cur.execute(
                    "UPDATE entries SET vector = ?, dim = ?, model_fingerprint = ? WHERE id = ?",
                    (vector_to_blob(vector), int(vector.shape[0]), fingerprint, entry_id),
                )
                _bump_count(cur, old[0], -1)
                _bump_count(cur, fingerprint, 1)
                done.append(entry_id)
            cur.executemany("INSERT INTO changes(entry_id, created_at) VALUES (?, ?)", [(i, now) for i in done])
            position = _last_position(cur)
        return Written(done, position)

    # -- the log -------------------------------------------------------------------------

    def head(self) -> int:
        return self._query("SELECT COALESCE(MAX(position), 0) FROM changes")[0][0]

    def changes_after(self, position: int, limit: int) -> ChangeBatch:
        rows = self._query(_ENTRY_STATE_SQL, (position, limit))
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
        conn = _connect(self.path)
        conn.execute("BEGIN")  # one read transaction: every batch sees the state at `position`
        position = conn.execute("SELECT COALESCE(MAX(position), 0) FROM changes").fetchone()[0]

        def batches() -> Iterator[ScanBatch]:
            try:
                last = 0
                while True:
                    rows = conn.execute(
                        "SELECT e.id, e.identity_id, i.name, e.camera, e.vector FROM entries e"
                        " JOIN identities i ON e.identity_id = i.id"
                        " WHERE e.model_fingerprint = ? AND e.id > ? ORDER BY e.id LIMIT ?",
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
            finally:
                conn.execute("COMMIT")
                conn.close()

        return position, batches()

    def wait_for_change(self, after: int, timeout: float) -> None:
        # SQLite has no notifications: the follower polls, and this only paces it.
        self._closed.wait(timeout)

    def import_progress(self, key: str) -> int:
        rows = self._query("SELECT rows FROM imports WHERE key = ?", (key,))
        return rows[0][0] if rows else 0

    # -- reads ---------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def count_identities(self) -> int:
        return self._query("SELECT COUNT(*) FROM identities")[0][0]

    def counts_by_fingerprint(self) -> dict[str, int]:
        return dict(self._query("SELECT fingerprint, entries FROM fingerprint_counts WHERE entries > 0"))

    def list_identities(self, offset: int, limit: int) -> list[tuple[str, int]]:
        # The page first, then the counts of its identities only: no GROUP BY over every entry.
        return self._query(
            "SELECT i.name, (SELECT COUNT(*) FROM entries e WHERE e.identity_id = i.id)"
            " FROM identities i ORDER BY i.name LIMIT ? OFFSET ?",
            (limit, offset),
        )

    def identity_entries(self, identity: str) -> list[EntryRow] | None:
        found = self._query("SELECT id FROM identities WHERE name = ?", (identity,))
        if not found:
            return None
        rows = self._query(
            "SELECT id, camera, created_at, model_fingerprint, crop IS NOT NULL FROM entries"
            " WHERE identity_id = ? ORDER BY id",
            found[0],
        )
        return [EntryRow(r[0], identity, r[1], r[2], r[3], bool(r[4])) for r in rows]

    def crop(self, entry_id: int) -> bytes | None:
        rows = self._query("SELECT crop FROM entries WHERE id = ?", (entry_id,))
        return rows[0][0] if rows else None

    def vectors(self, entry_ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in entry_ids]
        found: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), 900):  # under SQLite's bound-parameter limit
            chunk = ids[start:start + 900]
            sql = f"SELECT id, vector FROM entries WHERE id IN ({','.join('?' * len(chunk))})"
            found.update((i, blob_to_vector(blob)) for i, blob in self._query(sql, tuple(chunk)))
        return vectors_in_order(ids, found)

    def stale_entries(self, fingerprint: str, after_id: int = 0, batch: int = 256) -> list[tuple[int, bytes | None]]:
        return self._query(
            "SELECT id, crop FROM entries WHERE model_fingerprint != ? AND id > ? ORDER BY id LIMIT ?",
            (fingerprint, after_id, batch),
        )


def _statements(script: str) -> list[str]:
    """The statements of a schema script (executescript would commit the open transaction)."""
    return [s for s in script.split(";") if s.strip()]


def _max_entry_id(cur: sqlite3.Cursor) -> int:
    # sqlite_sequence remembers ids of deleted rows too: new ids are always above it.
    row = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
    return row[0] if row else 0


def _last_position(cur: sqlite3.Cursor) -> int:
    return cur.execute("SELECT COALESCE(MAX(position), 0) FROM changes").fetchone()[0]


def _bump_count(cur: sqlite3.Cursor, fingerprint: str, delta: int) -> None:
    if delta:
        cur.execute(
            "INSERT INTO fingerprint_counts VALUES (?, ?)"
            " ON CONFLICT(fingerprint) DO UPDATE SET entries = entries + excluded.entries",
            (fingerprint, delta),
        )
