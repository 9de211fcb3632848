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
from service.rerank import rerank_order
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

    def search(self, query: np.ndarray, k: int, *, by: str = "identity", rerank_shortlist: int | None = None,
               **filters) -> list[Match]:
        """Best first. With ``rerank_shortlist`` N, the N best entries are re-ranked with k-reciprocal
        neighbourhoods (service.rerank) using their stored vectors; scores stay cosines. Should the
        shortlist hold fewer than k answers, the plain ranking beyond it fills up the rest."""
        if rerank_shortlist is None:
            return self.index.search(query, k, by=by, **filters)
        found = self.index.search(query, rerank_shortlist, by="entry", **filters)
        kept, vectors = self.index.vectors([m.entry_id for m in found])
        still_indexed = set(kept)  # a delete may have raced the search
        shortlist = [m for m in found if m.entry_id in still_indexed]
        if len(shortlist) < 2:
            return self.index.search(query, k, by=by, **filters)
        order, _ = rerank_order(query, vectors)
        reranked = _first_k([shortlist[i] for i in order], k, by)
        if len(reranked) < k and len(found) == rerank_shortlist:  # the gallery holds more than the shortlist
            reranked = _first_k(reranked + self.index.search(query, k, by=by, **filters), k, by)
        return reranked

    def likely_duplicates(self, identity: str, vectors: np.ndarray, threshold: float) -> list[Match]:
        """Other identities that some of ``vectors`` already match at or above ``threshold``: each at
        its best score, best first. (Run before enrolling them, so they do not find themselves.)"""
        best: dict[str, Match] = {}
        for vector in vectors:
            for m in self.index.search(vector, 2, by="identity"):  # 2: one may be ``identity`` itself
                if m.identity == identity or m.score < threshold:
                    continue
                if m.identity not in best or m.score > best[m.identity].score:
                    best[m.identity] = m
        return sorted(best.values(), key=lambda m: -m.score)


def _first_k(matches: list[Match], k: int, by: str) -> list[Match]:
    """The first k of ``matches`` in order; by="identity": each identity once, at its first entry;
    an entry already taken is never repeated."""
    out, seen_identities, seen_entries = [], set(), set()
    for m in matches:
        if m.entry_id in seen_entries or (by == "identity" and m.identity in seen_identities):
            continue
        seen_entries.add(m.entry_id)
        seen_identities.add(m.identity)
        out.append(m)
        if len(out) == k:
            break
    return out
