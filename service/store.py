"""The gallery's source of truth, seen as a change log: the interface every store backend keeps.

A store holds identities and entries (vector, camera, model fingerprint, optional crop) and,
written in the same transaction as every mutation, one *change* per entry touched: its
position (an integer that only grows, assigned in commit order) and the entry id. A change
does not carry the entry's data: a follower reads the entry's state *now* (present, and
then its vector, identity, camera and fingerprint; or gone). Applying a change is therefore
idempotent, and a follower that has applied every change up to position P has the state
the store had at P or later. docs/gallery.md explains why nothing can be skipped or applied
twice.

``service.sqlite_store.SQLiteStore`` is the embedded backend; ``service.postgres_store.PostgresStore``
holds one gallery for several service replicas.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class StoreError(RuntimeError):
    """The store cannot do what was asked (unreachable, damaged, wrong schema); one-line reason."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (a database server down or cut off); trying again may work.
    Nothing was written by the call that raised it, unless the connection was lost during COMMIT."""


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


@dataclass(frozen=True)
class Written:
    """What a committed mutation did: the entries it touched and the log position it reached."""

    entry_ids: list[int]
    position: int
    rows: list[EntryRow] | None = None  # the new entries, for an enrollment


@dataclass(frozen=True)
class EntryState:
    """An entry as it is now, for a follower applying a change."""

    entry_id: int
    identity_id: int
    identity: str
    camera: int | None
    fingerprint: str
    vector: np.ndarray


@dataclass(frozen=True)
class ChangeBatch:
    """Changes (last_position - k, last_position], each resolved to the entry's current state."""

    last_position: int
    present: list[EntryState]  # entries that exist now (each once)
    gone: list[int]  # entry ids that no longer exist

    def __len__(self) -> int:
        return len(self.present) + len(self.gone)


@dataclass(frozen=True)
class ScanBatch:
    """A batch of a consistent scan of one embedding space: parallel arrays, N x D vectors."""

    entry_ids: np.ndarray
    identity_ids: np.ndarray
    identities: list[str]
    cameras: list[int | None]
    vectors: np.ndarray


class GalleryStore(Protocol):
    """The interface the gallery, the follower and the CLI use; one implementation per backend."""

    @property
    def store_id(self) -> str:
        """A random id made when the store was created: a snapshot of another store is foreign."""

    # -- writes: each one transaction, committed durably before returning, with its changes --

    def add_entries(self, identity: str, entries: list[NewEntry], fingerprint: str) -> Written: ...

    def add_groups(
        self, groups: list[tuple[str, list[NewEntry]]], fingerprint: str, progress: tuple[str, int] | None = None
    ) -> Written:
        """Several identities' entries in one transaction (bulk import). ``progress=(key, rows)``
        records, in the same transaction, that the import ``key`` has written ``rows`` rows."""

    def delete_identity(self, identity: str) -> Written | None: ...

    def update_vectors(self, updates: list[tuple[int, np.ndarray]], fingerprint: str) -> Written: ...

    # -- the log --

    def head(self) -> int:
        """The position of the last committed change (0 for an empty log)."""

    def changes_after(self, position: int, limit: int) -> ChangeBatch:
        """The next ``limit`` changes after ``position``, in position order, resolved to the
        entries' current state."""

    def scan(self, fingerprint: str, batch: int = 10_000) -> tuple[int, Iterator[ScanBatch]]:
        """(position P, the entries of one embedding space exactly as they were at P)."""

    def wait_for_change(self, after: int, timeout: float) -> None:
        """Return when the head may have passed ``after``, or after ``timeout`` seconds."""

    def import_progress(self, key: str) -> int:
        """Rows an import ``key`` has committed so far (0 if never started)."""

    # -- reads --

    def counts_by_fingerprint(self) -> dict[str, int]: ...

    def count_identities(self) -> int: ...

    def list_identities(self, offset: int, limit: int) -> list[tuple[str, int]]: ...

    def identity_entries(self, identity: str) -> list[EntryRow] | None: ...

    def crop(self, entry_id: int) -> bytes | None: ...

    def vectors(self, entry_ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these entries, in the given order: N x D float32, a NaN row for
        an id that does not exist (a compressed index re-scores its shortlist with them)."""

    def stale_entries(self, fingerprint: str, after_id: int = 0, batch: int = 256) -> list[tuple[int, bytes | None]]:
        """Entries made under another fingerprint: (entry_id, crop or None), in id order."""

    def close(self) -> None: ...


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def blob_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


def vectors_in_order(entry_ids: list[int], found: dict[int, np.ndarray]) -> np.ndarray:
    """The found vectors in ``entry_ids``' order, a NaN row for each id not found."""
    dim = len(next(iter(found.values()))) if found else 0
    out = np.full((len(entry_ids), dim), np.nan, dtype=np.float32)
    for row, entry_id in enumerate(entry_ids):
        if entry_id in found:
            out[row] = found[entry_id]
    return out


def stale_count(counts: dict[str, int], fingerprint: str) -> int:
    """Entries made under any other model than ``fingerprint``: the one definition of 'stale'."""
    return sum(n for fp, n in counts.items() if fp != fingerprint)
