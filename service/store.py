"""The gallery's source of truth: SQLite in WAL mode under the data directory.

Durability: journal_mode=WAL with synchronous=FULL. In WAL mode NORMAL already survives a
killed process (the WAL is in the OS page cache), but a power loss can drop the last
commits; FULL fsyncs the WAL at every commit, so a 201 from POST /gallery means the
enrollment is on stable storage. The cost is one fsync per enrollment, which is small next
to embedding the images. An enrollment is one transaction: all its entries or none.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: FAISS ids, crop URLs stay valid
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
"""


@dataclass(frozen=True)
class NewEntry:
    vector: np.ndarray
    camera: int | None = None
    crop: bytes | None = None


@dataclass(frozen=True)
class EntryRow:
    entry_id: int
    identity: str
    camera: int | None
    created_at: float
    model_fingerprint: str
    has_crop: bool


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


class GalleryStore:
    """Thread-safe: one connection, one lock; every write is an explicit transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- writes -------------------------------------------------------------------------

    def add_entries(self, identity: str, entries: list[NewEntry], fingerprint: str) -> list[EntryRow]:
        """Enrol entries under an identity (created if new) in one committed transaction."""
        now = time.time()
        rows = []
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute("INSERT OR IGNORE INTO identities(name, created_at) VALUES (?, ?)", (identity, now))
                (identity_id,) = cur.execute("SELECT id FROM identities WHERE name = ?", (identity,)).fetchone()
                for entry in entries:
                    cur.execute(
                        "INSERT INTO entries(identity_id, camera, created_at, model_fingerprint, dim, vector, crop)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (identity_id, entry.camera, now, fingerprint, int(entry.vector.shape[0]),
                         vector_to_blob(entry.vector), entry.crop),
                    )
                    rows.append(EntryRow(cur.lastrowid, identity, entry.camera, now, fingerprint, entry.crop is not None))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return rows

    def delete_identity(self, identity: str) -> list[int] | None:
        """Delete an identity and its entries; their ids, or None if it does not exist."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute("SELECT id FROM identities WHERE name = ?", (identity,)).fetchone()
                if row is None:
                    cur.execute("ROLLBACK")
                    return None
                ids = [r[0] for r in cur.execute("SELECT id FROM entries WHERE identity_id = ?", row)]
                cur.execute("DELETE FROM entries WHERE identity_id = ?", row)
                cur.execute("DELETE FROM identities WHERE id = ?", row)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return ids

    def update_vectors(self, updates: list[tuple[int, np.ndarray]], fingerprint: str) -> None:
        """Replace vectors (reembed) in one transaction."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany(
                    "UPDATE entries SET vector = ?, dim = ?, model_fingerprint = ? WHERE id = ?",
                    [(vector_to_blob(v), int(v.shape[0]), fingerprint, entry_id) for entry_id, v in updates],
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    # -- reads --------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def count_identities(self) -> int:
        return self._query("SELECT COUNT(*) FROM identities")[0][0]

    def count_entries(self) -> int:
        return self._query("SELECT COUNT(*) FROM entries")[0][0]

    def counts_by_fingerprint(self) -> dict[str, int]:
        return dict(self._query("SELECT model_fingerprint, COUNT(*) FROM entries GROUP BY model_fingerprint"))

    def list_identities(self, offset: int, limit: int) -> list[tuple[str, int]]:
        return self._query(
            "SELECT i.name, COUNT(e.id) FROM identities i LEFT JOIN entries e ON e.identity_id = i.id"
            " GROUP BY i.id ORDER BY i.name LIMIT ? OFFSET ?",
            (limit, offset),
        )

    def identity_entries(self, identity: str) -> list[EntryRow] | None:
        if not self._query("SELECT 1 FROM identities WHERE name = ?", (identity,)):
            return None
        rows = self._query(
            "SELECT e.id, e.camera, e.created_at, e.model_fingerprint, e.crop IS NOT NULL"
            " FROM entries e JOIN identities i ON e.identity_id = i.id WHERE i.name = ? ORDER BY e.id",
            (identity,),
        )
        return [EntryRow(r[0], identity, r[1], r[2], r[3], bool(r[4])) for r in rows]

    def crop(self, entry_id: int) -> bytes | None:
        rows = self._query("SELECT crop FROM entries WHERE id = ?", (entry_id,))
        return rows[0][0] if rows else None

    def iter_vectors(
        self, fingerprint: str, batch: int = 10_000
    ) -> Iterator[tuple[np.ndarray, list[str], list[int | None], np.ndarray]]:
        """Entries of one embedding space, in id order: (ids, identities, cameras, N x D vectors)."""
        last = 0
        while True:
            rows = self._query(
                "SELECT e.id, i.name, e.camera, e.vector FROM entries e JOIN identities i ON e.identity_id = i.id"
                " WHERE e.model_fingerprint = ? AND e.id > ? ORDER BY e.id LIMIT ?",
                (fingerprint, last, batch),
            )
            if not rows:
                return
            last = rows[-1][0]
            yield (
                np.array([r[0] for r in rows], dtype=np.int64),
                [r[1] for r in rows],
                [r[2] for r in rows],
                np.stack([blob_to_vector(r[3]) for r in rows]),
            )

    def stale_entries(self, fingerprint: str, after_id: int = 0, batch: int = 256) -> list[tuple[int, bytes | None]]:
        """Entries made under another fingerprint: (entry_id, crop or None), in id order."""
        return self._query(
            "SELECT id, crop FROM entries WHERE model_fingerprint != ? AND id > ? ORDER BY id LIMIT ?",
            (fingerprint, after_id, batch),
        )
