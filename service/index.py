"""The in-memory FAISS index over the gallery's current-model entries, with their labels.

Vectors live in *slots*: the i-th vector added is slot i, FAISS's own sequential id, for every
index kind. A slot is never reused or moved; removing an entry (a delete, or a re-embed
that replaces its vector) only marks its slot dead, and dead slots are filtered out of
results. That makes removal O(1) for every kind (HNSW cannot remove at all, an exact index
would move every vector after the removed one) and keeps a snapshot a plain copy of the
arrays. Dead slots are reclaimed by rebuilding the index from the store in the background
(``dead_fraction``; service/follower.py decides when).

Kinds (``IndexSpec``): ``flat`` (exact inner product), ``hnsw`` (graph), ``ivf`` (inverted
lists over k-means cells), with full vectors or 8-bit codes (``SQ8``, a quarter of the
memory); a compressed index re-scores its shortlist with the exact vectors, which it asks
for through ``exact_vectors`` (the gallery reads them from the store). docs/gallery.md has
the measurements behind the choice ``plan_index`` makes for ``REID_INDEX=auto``.

Concurrency: searches share a read lock (FAISS searches are const and release the GIL);
adds and removals take the write lock; a snapshot holds a read lock while it writes, so
queries go on and writes wait.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

NO_CAMERA = np.iinfo(np.int32).min  # a camera-less entry in the int32 camera array
IVF_MIN_TRAIN_PER_LIST = 39  # FAISS warns below this many training points per cell
IVF_MAX_TRAIN = 262_144  # k-means on more points costs time and gains nothing
SQ_TRAIN = 65_536  # enough to learn each dimension's value range
SQ_MIN_TRAIN = 1_000
# Exact search reads every vector: ~10 ms per 32M floats on one core here (docs/gallery.md).
EXACT_SCAN_BUDGET = 32 * 2**20


def exact_max_entries(dim: int) -> int:
    """The largest gallery ``auto`` searches exactly: the one that fits the scan budget."""
    return EXACT_SCAN_BUDGET // dim


@dataclass(frozen=True)
class IndexSpec:
    """What an index is made of; a snapshot is only reused by an identical spec."""

    kind: str  # flat | hnsw | ivf
    factory: str  # faiss.index_factory description
    ef_construction: int = 0  # HNSW build breadth

    @property
    def compressed(self) -> bool:
        """Codes, not vectors: scores are approximate until re-scored exactly."""
        return "SQ" in self.factory

    def needs_training(self) -> bool:
        """IVF learns its cells, scalar quantisation its value ranges, from sample vectors."""
        return self.kind == "ivf" or self.compressed

    def training_size(self) -> int:
        if self.kind == "ivf":
            return min(IVF_MAX_TRAIN, int(self.factory.split(",")[0][3:]) * 64)
        return SQ_TRAIN if self.needs_training() else 0


@dataclass(frozen=True)
class IndexPlanSettings:
    setting: str = "auto"  # auto | flat | hnsw | ivf
    exact_max_entries: int = 32_768  # the service derives it from the dimension: exact_max_entries()
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    ivf_lists: int = 0  # 0: from the gallery size
    storage: str = "flat"  # flat | sq8 (8-bit codes in memory, the shortlist re-scored from the store)


def ivf_lists_for(entries: int) -> int:
    """Cells for an IVF index over ``entries``: ~4 sqrt(N), a power of two, 256..65536."""
    target = 4 * math.sqrt(max(entries, 1))
    return int(min(65_536, max(256, 2 ** round(math.log2(target)))))


def plan_index(plan: IndexPlanSettings, entries: int) -> IndexSpec:
    """The index an ``entries``-sized gallery gets. auto: exact up to ``exact_max_entries``,
    IVF above (measured: docs/gallery.md). A kind that learns from the data (IVF cells,
    scalar-quantiser ranges) needs enough of it: below that the gallery is searched exactly,
    which is as fast at that size, until it grows."""
    kind = plan.setting
    if kind == "auto":
        kind = "flat" if entries <= plan.exact_max_entries else "ivf"
    storage = "SQ8" if plan.storage == "sq8" else "Flat"
    if kind == "ivf":
        lists = plan.ivf_lists or ivf_lists_for(entries)
        spec, needed = IndexSpec("ivf", f"IVF{lists},{storage}"), lists * IVF_MIN_TRAIN_PER_LIST
    elif kind == "hnsw":
        spec, needed = IndexSpec("hnsw", f"HNSW{plan.hnsw_m},{storage}", plan.hnsw_ef_construction), SQ_MIN_TRAIN
    else:
        return IndexSpec("flat", "Flat")
    if spec.needs_training() and entries < needed:
        return IndexSpec("flat", "Flat")
    return spec


@dataclass(frozen=True)
class SearchSettings:
    hnsw_ef_search: int = 128
    ivf_nprobe: int = 32


@dataclass(frozen=True)
class Match:
    identity: str
    score: float
    entry_id: int
    camera: int | None


def _hnsw(index: faiss.Index) -> faiss.HNSW:
    return faiss.downcast_index(index).hnsw


class _RWLock:
    """Many readers or one writer; a waiting writer holds new readers back (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class _Growable:
    """A 1-D numpy array with amortised O(1) appends and a fill value beyond its length."""

    def __init__(self, dtype, fill, data: np.ndarray | None = None):
        self.fill = fill
        self.data = np.asarray(data if data is not None else np.empty(0, dtype), dtype=dtype)

    def ensure(self, size: int) -> None:
        if size > len(self.data):
            grown = np.full(max(size, 2 * len(self.data), 1024), self.fill, dtype=self.data.dtype)
            grown[: len(self.data)] = self.data
            self.data = grown


class VectorIndex:
    def __init__(self, dim: int, spec: IndexSpec, search: SearchSettings | None = None, _faiss: faiss.Index | None = None):
        self.dim, self.spec, self.search_settings = dim, spec, search or SearchSettings()
        self._faiss = _faiss if _faiss is not None else faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        if spec.kind == "hnsw":
            _hnsw(self._faiss).efConstruction = spec.ef_construction
        self._slots = 0  # slots used (== FAISS ntotal)
        self._slot_entry = _Growable(np.int64, -1)
        self._slot_identity = _Growable(np.int64, -1)
        self._slot_camera = _Growable(np.int32, NO_CAMERA)
        self._alive = _Growable(np.bool_, False)
        self._entry_slot = _Growable(np.int64, -1)  # entry id -> its live slot
        self._names: dict[int, str] = {}  # identity id -> name
        self._identity_live: dict[int, int] = {}  # identity id -> live entries
        self._live = 0
        self.built_for = 0  # gallery size the spec was planned for (the follower re-plans far from it)
        # entry ids -> N x D exact vectors (NaN rows for unknown ids), or None when they cannot be had:
        # how a compressed index re-scores its shortlist. Set by the gallery.
        self.exact_vectors: Callable[[np.ndarray], np.ndarray | None] | None = None
        self._lock = _RWLock()

    # -- size ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._live

    @property
    def identity_count(self) -> int:
        return len(self._identity_live)

    @property
    def dead_fraction(self) -> float:
        return (self._slots - self._live) / self._slots if self._slots else 0.0

    @property
    def is_trained(self) -> bool:
        return bool(self._faiss.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        with self._lock.write():
            self._faiss.train(np.ascontiguousarray(vectors, dtype=np.float32))

    # -- writes --------------------------------------------------------------------------

    def upsert(
        self, entry_ids: np.ndarray, identity_ids: np.ndarray, identities: list[str],
        cameras: Iterable[int | None], vectors: np.ndarray,
    ) -> None:
        """Add entries; an entry already indexed is replaced (its old slot dies)."""
        entry_ids = np.asarray(entry_ids, dtype=np.int64)
        if not len(entry_ids):
            return
        identity_ids = np.asarray(identity_ids, dtype=np.int64)
        camera_array = np.array([NO_CAMERA if c is None else c for c in cameras], dtype=np.int32)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock.write():
            self._kill(entry_ids)
            first, n = self._slots, len(entry_ids)
            self._faiss.add(vectors)
            for growable in (self._slot_entry, self._slot_identity, self._slot_camera, self._alive):
                growable.ensure(first + n)
            self._slot_entry.data[first:first + n] = entry_ids
            self._slot_identity.data[first:first + n] = identity_ids
            self._slot_camera.data[first:first + n] = camera_array
            self._alive.data[first:first + n] = True
            self._entry_slot.ensure(int(entry_ids.max()) + 1)
            self._entry_slot.data[entry_ids] = np.arange(first, first + n)
            self._slots += n
            self._live += n
            for identity_id, name in zip(identity_ids.tolist(), identities):
                self._names[identity_id] = name
            ids, counts = np.unique(identity_ids, return_counts=True)
            for identity_id, count in zip(ids.tolist(), counts.tolist()):
                self._identity_live[identity_id] = self._identity_live.get(identity_id, 0) + count

    def remove(self, entry_ids: Iterable[int]) -> int:
        """Drop entries (unknown ids are ignored); how many were indexed."""
        entry_ids = np.fromiter(entry_ids, dtype=np.int64)
        with self._lock.write():
            return self._kill(entry_ids)

    def _kill(self, entry_ids: np.ndarray) -> int:
        known = entry_ids[entry_ids < len(self._entry_slot.data)]
        slots = self._entry_slot.data[known]
        slots = slots[slots >= 0]
        if not len(slots):
            return 0
        self._alive.data[slots] = False
        self._entry_slot.data[self._slot_entry.data[slots]] = -1
        self._live -= len(slots)
        ids, counts = np.unique(self._slot_identity.data[slots], return_counts=True)
        for identity_id, count in zip(ids.tolist(), counts.tolist()):
            left = self._identity_live[identity_id] - count
            if left:
                self._identity_live[identity_id] = left
            else:
                del self._identity_live[identity_id]
                self._names.pop(identity_id, None)
        return len(slots)

    # -- search --------------------------------------------------------------------------

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
        with self._lock.read():
            if not self._live:
                return []
            fetch, widen = self._first_fetch(k, by), 1
            while True:
                params, exhaustive = self._search_params(fetch, widen)
                scores, slots = self._faiss.search(query, fetch, params=params)
                matches = self._select(query[0], scores[0], slots[0], k, by, camera, exclude_camera)
                if len(matches) >= k or (fetch >= self._slots and exhaustive):
                    return matches
                fetch, widen = min(self._slots, fetch * 4), widen * 4

    def _first_fetch(self, k: int, by: str) -> int:
        """A shortlist likely to hold k survivors at once: dead slots and, for by=identity, an
        identity's other entries take places in it."""
        per_identity = self._live / max(len(self._identity_live), 1) if by == "identity" else 1.0
        wanted = k * per_identity * 2 / max(1.0 - self.dead_fraction, 0.05)
        return int(min(self._slots, max(wanted, 4 * k, 64)))

    def _search_params(self, fetch: int, widen: int) -> tuple[faiss.SearchParameters | None, bool]:
        """FAISS parameters for a shortlist of ``fetch``, and whether they search everything (so
        that widening further cannot find more)."""
        s = self.search_settings
        if self.spec.kind == "hnsw":
            base = faiss.SearchParametersHNSW()
            base.efSearch = max(s.hnsw_ef_search, fetch)
            exhaustive = True  # ef >= every slot once fetch reaches them all
        elif self.spec.kind == "ivf":
            lists = faiss.extract_index_ivf(self._faiss).nlist
            base = faiss.SearchParametersIVF()
            base.nprobe = min(s.ivf_nprobe * widen, lists)
            exhaustive = base.nprobe == lists
        else:
            return None, True
        return base, exhaustive

    def _select(self, query, scores, slots, k, by, camera, exclude_camera) -> list[Match]:
        found = slots >= 0  # FAISS pads a short result with -1
        slots, scores = slots[found], scores[found]
        keep = self._alive.data[slots]
        cams = self._slot_camera.data[slots]
        if camera is not None:
            keep &= cams == camera
        if exclude_camera is not None:
            keep &= cams != exclude_camera
        slots, scores = slots[keep], scores[keep]
        if self.spec.compressed and self.exact_vectors is not None and len(slots):
            slots, scores = self._rescore(query, slots, scores)
        matches: list[Match] = []
        seen: set[int] = set()
        for score, slot in zip(scores.tolist(), slots.tolist()):
            identity_id = int(self._slot_identity.data[slot])
            if by == "identity":
                if identity_id in seen:
                    continue
                seen.add(identity_id)
            cam = int(self._slot_camera.data[slot])
            matches.append(Match(self._names[identity_id], float(score), int(self._slot_entry.data[slot]),
                                 None if cam == NO_CAMERA else cam))
            if len(matches) == k:
                break
        return matches

    def _rescore(self, query: np.ndarray, slots: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shortlist's exact cosine scores, best first; the codes' scores if the exact vectors
        cannot be had (an entry deleted meanwhile is dropped)."""
        vectors = self.exact_vectors(self._slot_entry.data[slots])
        if vectors is None:
            return slots, scores
        exact = vectors @ query
        known = ~np.isnan(exact)
        slots, exact = slots[known], exact[known]
        order = np.argsort(-exact, kind="stable")
        return slots[order], exact[order]

    # -- snapshots -----------------------------------------------------------------------

    def save(self, faiss_path: Path, labels_path: Path) -> None:
        """Write the FAISS index and the slot labels (a read lock: queries go on meanwhile)."""
        with self._lock.read():
            faiss.write_index(self._faiss, str(faiss_path))
            n = self._slots
            names = sorted(self._names.items())
            with open(labels_path, "wb") as f:
                np.savez(
                    f,
                    slot_entry=self._slot_entry.data[:n], slot_identity=self._slot_identity.data[:n],
                    slot_camera=self._slot_camera.data[:n], alive=self._alive.data[:n],
                    name_ids=np.array([i for i, _ in names], dtype=np.int64),
                    names=np.array([name for _, name in names], dtype=np.str_),
                )

    @classmethod
    def load(cls, dim: int, spec: IndexSpec, search: SearchSettings, faiss_path: Path, labels_path: Path) -> "VectorIndex":
        """The inverse of ``save``; ValueError when the two files do not fit each other."""
        index = cls(dim, spec, search, _faiss=faiss.read_index(str(faiss_path)))
        with np.load(labels_path, allow_pickle=False) as z:
            n = len(z["slot_entry"])
            if index._faiss.ntotal != n or index._faiss.d != dim:
                raise ValueError(f"index holds {index._faiss.ntotal} vectors of {index._faiss.d}-d, labels {n} of {dim}-d")
            index._slots = n
            index._slot_entry = _Growable(np.int64, -1, z["slot_entry"])
            index._slot_identity = _Growable(np.int64, -1, z["slot_identity"])
            index._slot_camera = _Growable(np.int32, NO_CAMERA, z["slot_camera"])
            index._alive = _Growable(np.bool_, False, z["alive"])
            names = dict(zip(z["name_ids"].tolist(), z["names"].tolist()))
        alive = index._alive.data
        live_entries = index._slot_entry.data[alive]
        index._entry_slot.ensure(int(live_entries.max()) + 1 if len(live_entries) else 0)
        index._entry_slot.data[live_entries] = np.flatnonzero(alive)
        index._live = int(alive.sum())
        ids, counts = np.unique(index._slot_identity.data[alive], return_counts=True)
        index._identity_live = dict(zip(ids.tolist(), counts.tolist()))
        index._names = {i: names[i] for i in index._identity_live}
        return index
