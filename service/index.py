"""The in-memory FAISS index over the gallery's current-model entries, with their labels.

Exact search is IndexIDMap2 over IndexFlatIP (inner product of L2-normalised vectors =
cosine similarity); ``hnsw`` swaps in IndexHNSWFlat for large galleries. HNSW cannot
remove vectors, so removed ids become tombstones filtered out of results, and the graph
is rebuilt once they pass a fifth of it. One lock serialises adds, removes and searches.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import faiss
import numpy as np

TOMBSTONE_REBUILD_FRACTION = 0.2


@dataclass(frozen=True)
class Match:
    identity: str
    score: float
    entry_id: int
    camera: int | None


def _new_faiss_index(dim: int, kind: str, hnsw_m: int, ef_search: int) -> tuple[faiss.Index, faiss.Index]:
    """(id map, the inner index it wraps): the inner one is kept to reach HNSW's parameters."""
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = ef_search
    else:
        inner = faiss.IndexFlatIP(dim)
    return faiss.IndexIDMap2(inner), inner


class VectorIndex:
    def __init__(self, dim: int, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 128):
        self.dim, self.kind, self.hnsw_m, self.ef_search = dim, kind, hnsw_m, ef_search
        self._index, self._inner = _new_faiss_index(dim, kind, hnsw_m, ef_search)
        self._labels: dict[int, tuple[str, int | None]] = {}  # entry id -> (identity, camera)
        self._by_identity: dict[str, set[int]] = {}
        self._tombstones: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def identity_count(self) -> int:
        return len(self._by_identity)

    def add(self, ids: np.ndarray, vectors: np.ndarray, identities: list[str], cameras: list[int | None]) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            self._index.add_with_ids(vectors, ids)
            for entry_id, identity, camera in zip(ids.tolist(), identities, cameras):
                self._labels[entry_id] = (identity, camera)
                self._by_identity.setdefault(identity, set()).add(entry_id)

    def remove_identity(self, identity: str) -> int:
        """Drop an identity's entries; how many were indexed."""
        with self._lock:
            ids = self._by_identity.pop(identity, set())
            for entry_id in ids:
                del self._labels[entry_id]
            if ids:
                self._remove_ids(np.fromiter(ids, dtype=np.int64))
            return len(ids)

    def _remove_ids(self, ids: np.ndarray) -> None:
        if self.kind != "hnsw":
            self._index.remove_ids(ids)
            return
        self._tombstones.update(ids.tolist())
        if len(self._tombstones) > TOMBSTONE_REBUILD_FRACTION * max(self._index.ntotal, 1):
            self._rebuild()

    def _rebuild(self) -> None:
        all_ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._inner.reconstruct_n(0, self._inner.ntotal)
        keep = ~np.isin(all_ids, np.fromiter(self._tombstones, dtype=np.int64))
        self._index, self._inner = _new_faiss_index(self.dim, self.kind, self.hnsw_m, self.ef_search)
        if keep.any():
            self._index.add_with_ids(np.ascontiguousarray(vectors[keep]), np.ascontiguousarray(all_ids[keep]))
        self._tombstones.clear()

    def vectors(self, entry_ids: list[int]) -> tuple[list[int], np.ndarray]:
        """The stored vectors of a shortlist (to re-rank it): (the ids still indexed, in the given
        order; their vectors, one row each). An id removed since the search is left out."""
        with self._lock:
            kept = [int(i) for i in entry_ids if int(i) in self._labels]
            out = np.empty((len(kept), self.dim), dtype=np.float32)
            for row, entry_id in enumerate(kept):
                out[row] = self._index.reconstruct(entry_id)  # IndexIDMap2: by external id
            return kept, out

    def search(
        self,
        query: np.ndarray,
        k: int,
        *,
        by: str = "identity",
        camera: int | None = None,
        exclude_camera: int | None = None,
    ) -> list[Match]:
        """Best first. by="identity": each identity once, at its best entry. Filters drop entries
        outside ``camera`` or inside ``exclude_camera``; the search widens until k survive."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        with self._lock:
            total = self._index.ntotal
            if total == 0:
                return []
            fetch = min(total, max(4 * k, 64))
            while True:
                if self.kind == "hnsw":
                    self._inner.hnsw.efSearch = max(self.ef_search, fetch)
                scores, ids = self._index.search(query, fetch)
                matches = self._select(scores[0], ids[0], k, by, camera, exclude_camera)
                if len(matches) >= k or fetch >= total:
                    return matches
                fetch = min(total, fetch * 4)

    def _select(self, scores, ids, k, by, camera, exclude_camera) -> list[Match]:
        matches: list[Match] = []
        seen: set[str] = set()
        for score, entry_id in zip(scores.tolist(), ids.tolist()):
            if entry_id < 0 or entry_id in self._tombstones:
                continue
            identity, entry_camera = self._labels[entry_id]
            if camera is not None and entry_camera != camera:
                continue
            if exclude_camera is not None and entry_camera == exclude_camera:
                continue
            if by == "identity":
                if identity in seen:
                    continue
                seen.add(identity)
            matches.append(Match(identity, float(score), int(entry_id), entry_camera))
            if len(matches) == k:
                break
        return matches
