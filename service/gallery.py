"""The gallery: the SQLite store (truth) and the FAISS index (its searchable copy) kept in step.

Writes go to the store first and reach the index only after commit; one mutation lock
spans both, so a delete racing an enrollment of the same identity cannot leave the
index holding entries the store no longer has.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from service.index import Match, VectorIndex
from service.store import EntryRow, GalleryStore, NewEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadReport:
    indexed: int
    stale: int
    by_fingerprint: dict[str, int]


class Gallery:
    def __init__(self, store: GalleryStore, index: VectorIndex, fingerprint: str):
        self.store, self.index, self.fingerprint = store, index, fingerprint
        self.stale_entries = 0
        self._mutation = threading.Lock()

    def load(self) -> LoadReport:
        """Index every entry of the current model; count (and keep out) the others."""
        counts = self.store.counts_by_fingerprint()
        for fp, n in sorted(counts.items()):
            current = "current model" if fp == self.fingerprint else "another model: not searchable until reembed"
            log.info("gallery: %d entries under fingerprint %s (%s)", n, fp[:12], current)
        with self._mutation:
            for ids, identities, cameras, vectors in self.store.iter_vectors(self.fingerprint):
                self.index.add(ids, vectors, identities, cameras)
            self.stale_entries = sum(n for fp, n in counts.items() if fp != self.fingerprint)
        if self.stale_entries:
            log.warning(
                "gallery: %d entries were made by another model and are excluded; run `python -m service reembed`",
                self.stale_entries,
            )
        return LoadReport(indexed=len(self.index), stale=self.stale_entries, by_fingerprint=counts)

    @property
    def size(self) -> int:
        return len(self.index)

    def enroll(self, identity: str, vectors: np.ndarray, crops: list[bytes | None], camera: int | None) -> list[EntryRow]:
        entries = [NewEntry(vector=v, camera=camera, crop=c) for v, c in zip(vectors, crops)]
        with self._mutation:
            rows = self.store.add_entries(identity, entries, self.fingerprint)  # committed here
            self.index.add(
                np.array([r.entry_id for r in rows], dtype=np.int64), vectors, [identity] * len(rows), [camera] * len(rows)
            )
        return rows

    def delete(self, identity: str) -> bool:
        with self._mutation:
            ids = self.store.delete_identity(identity)
            if ids is None:
                return False
            self.index.remove_identity(identity)
            # Deleted entries that were stale were never indexed: recount them.
            self.stale_entries = sum(n for fp, n in self.store.counts_by_fingerprint().items() if fp != self.fingerprint)
        return True

    def search(self, query: np.ndarray, k: int, **filters) -> list[Match]:
        return self.index.search(query, k, **filters)
