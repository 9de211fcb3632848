"""The gallery: a store (the truth, a change log) and a FAISS index that follows it.

The index is a view of the log up to ``position``. Every write goes to the store first;
the index learns about it only by applying the log, the writer's own changes included
(an enrollment returns after its changes are applied: read-your-writes), so there is one
way into the index and it is the same for this process's writes, another process's
import, and a rebuild. Routes reach the store and the index only through this class.

Start-up: load the snapshot if it fits (service/snapshot.py), else build from the store;
then apply the changes after its position. A background rebuild (the index kind no longer
fits the gallery's size, or too many dead slots) builds a new index from a consistent scan
while the old one serves, catches it up, and swaps it in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.index import IndexPlanSettings, Match, SearchSettings, VectorIndex, plan_index
from service.rerank import rerank_order
from service.snapshot import SnapshotKey, SnapshotRejected, load_snapshot, save_snapshot
from service.store import ChangeBatch, EntryRow, GalleryStore, NewEntry, ScanBatch, StoreError, stale_count

log = logging.getLogger(__name__)

CHANGE_BATCH = 10_000  # log changes read and applied at a time
DEAD_FRACTION_REBUILD = 0.2  # rebuild once this share of the index's slots is dead


@dataclass(frozen=True)
class GalleryStats:
    entries: int  # searchable: current-model entries in the index
    identities: int
    stale_entries: int  # made by another model, kept out of the index
    position: int  # log position the index covers
    index_kind: str


@dataclass(frozen=True)
class IdentityPage:
    identities: list[tuple[str, int]]  # (name, entries)
    total: int


def _build_index(
    store: GalleryStore, fingerprint: str, dim: int, plan: IndexPlanSettings, search: SearchSettings
) -> tuple[VectorIndex, int]:
    """A new index over a consistent scan of the store; (index, the position it covers)."""
    expected = store.counts_by_fingerprint().get(fingerprint, 0)
    spec = plan_index(plan, expected)
    index = VectorIndex(dim, spec, search)
    index.built_for = expected
    position, batches = store.scan(fingerprint)
    started, added, next_report = time.monotonic(), 0, max(expected // 10, 100_000)
    pending: list[ScanBatch] = []
    for batch in batches:
        if not index.is_trained:
            pending.append(batch)  # an IVF learns its cells from the first entries
            if sum(len(b.entry_ids) for b in pending) < spec.training_size():
                continue
            index.train(np.concatenate([b.vectors for b in pending]))
        for b in pending or [batch]:
            index.upsert(b.entry_ids, b.identity_ids, b.identities, b.cameras, b.vectors)
            added += len(b.entry_ids)
        pending = []
        if added >= next_report:
            log.info("index: %d of ~%d entries added (%.0f s)", added, expected, time.monotonic() - started)
            next_report += max(expected // 10, 100_000)
    if pending:  # fewer entries than the training wants: train on what there is
        index.train(np.concatenate([b.vectors for b in pending]))
        for b in pending:
            index.upsert(b.entry_ids, b.identity_ids, b.identities, b.cameras, b.vectors)
    return index, position


class Gallery:
    def __init__(
        self,
        store: GalleryStore,
        index: VectorIndex,
        position: int,
        *,
        fingerprint: str,
        plan: IndexPlanSettings,
        snapshot_dir: Path,
        on_change: Callable[[GalleryStats], None] | None = None,
    ):
        self.store, self.fingerprint, self.plan, self.snapshot_dir = store, fingerprint, plan, snapshot_dir
        self._index, self._position = index, position
        index.exact_vectors = self._exact_vectors
        self._on_change = on_change
        self._apply_lock = threading.Lock()  # one applier at a time: the position moves in order
        self.snapshot_position: int | None = None  # log position of the last snapshot (None: none yet)
        self.snapshot_time = time.monotonic()
        self._stats = self._index_stats(self._stale_entries())
        self.replayed_at_open = 0  # changes applied on top of the snapshot or build at start

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        store: GalleryStore,
        *,
        fingerprint: str,
        dim: int,
        plan: IndexPlanSettings,
        search: SearchSettings,
        snapshot_dir: Path,
        on_change: Callable[[GalleryStats], None] | None = None,
    ) -> "Gallery":
        """Load the snapshot or build from the store, then apply the newer changes."""
        started = time.monotonic()
        counts = store.counts_by_fingerprint()
        for fp, n in sorted(counts.items()):
            current = "current model" if fp == fingerprint else "another model: not searchable until reembed"
            log.info("gallery: %d entries under fingerprint %s (%s)", n, fp[:12], current)
        key = SnapshotKey(store.store_id, fingerprint, dim, plan)
        from_snapshot = True
        try:
            index, position = load_snapshot(snapshot_dir, key, store.head(), search)
        except SnapshotRejected as e:
            log.info("index snapshot not used (%s): building the index from the store", e)
            index, position = _build_index(store, fingerprint, dim, plan, search)
            from_snapshot = False
        gallery = cls(store, index, position, fingerprint=fingerprint, plan=plan, snapshot_dir=snapshot_dir,
                      on_change=on_change)
        if from_snapshot:
            gallery.snapshot_position = position
        replayed = gallery.replayed_at_open = gallery.catch_up()
        stale = gallery.stats.stale_entries
        log.info(
            "gallery: %d entries indexed (%s) at log position %d, %s, %d newer changes applied, in %.1f s",
            len(gallery._index), index.spec.factory, gallery.position,
            "from the snapshot" if from_snapshot else "built from the store", replayed, time.monotonic() - started,
        )
        if stale:
            log.warning("gallery: %d entries were made by another model and are excluded; run `python -m service reembed`",
                        stale)
        return gallery

    # -- following the log ---------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    @property
    def stats(self) -> GalleryStats:
        return self._stats

    def catch_up(self, until: int | None = None) -> int:
        """Apply the log after ``position`` (up to the head, or at least up to ``until``);
        how many changes were applied. The lock is taken per batch, so a long catch-up lets
        searches and other appliers in between batches."""
        applied = 0
        while True:
            with self._apply_lock:
                if until is not None and self._position >= until:
                    break
                batch = self.store.changes_after(self._position, CHANGE_BATCH)
                if not len(batch):
                    break
                _apply(self._index, batch, self.fingerprint)
                applied += batch.last_position - self._position  # positions are dense: one per change
                self._position = batch.last_position
                # Published with the index it describes: /readyz never reports an older position
                # than searches already see (the stale count follows in _changed).
                self._stats = self._index_stats(self._stats.stale_entries)
        if applied:
            self._changed()
        return applied

    def _changed(self) -> None:
        stale = self._stale_entries()  # a store query: outside the lock
        with self._apply_lock:  # so that a slower caller cannot publish an older position last
            self._stats = self._index_stats(stale)
            if self._on_change is not None:  # gauges only: cheap enough to set under the lock
                self._on_change(self._stats)

    def _stale_entries(self) -> int:
        return stale_count(self.store.counts_by_fingerprint(), self.fingerprint)

    def _index_stats(self, stale_entries: int) -> GalleryStats:
        """The stats of the index as it is now (the caller holds the applier lock, or is __init__)."""
        return GalleryStats(
            entries=len(self._index), identities=self._index.identity_count,
            stale_entries=stale_entries, position=self._position, index_kind=self._index.spec.kind,
        )

    # -- writes --------------------------------------------------------------------------

    def enroll(self, identity: str, vectors: np.ndarray, crops: list[bytes | None], camera: int | None) -> list[EntryRow]:
        """Commit the entries (one transaction), then make them searchable before returning."""
        entries = [NewEntry(vector=v, camera=camera, crop=c) for v, c in zip(vectors, crops)]
        written = self.store.add_entries(identity, entries, self.fingerprint)
        self._catch_up_after_write(written.position)
        return written.rows or []

    def delete(self, identity: str) -> bool:
        written = self.store.delete_identity(identity)
        if written is None:
            return False
        self._catch_up_after_write(written.position)
        return True

    def _catch_up_after_write(self, position: int) -> None:
        """Read-your-writes. The write is committed: a store lost just after it must not turn
        it into an error (a retry would write it twice); the follower applies it later."""
        try:
            self.catch_up(until=position)
        except StoreError as e:
            log.warning("write committed at log position %d, searchable here once the store is back: %s", position, e)

    # -- reads ---------------------------------------------------------------------------

    def _exact_vectors(self, entry_ids: np.ndarray) -> np.ndarray | None:
        """For a compressed index's re-score; None (its approximate scores stand) if the store
        cannot answer, so that queries go on while it is away."""
        try:
            vectors = self.store.vectors(entry_ids)
        except Exception as e:
            log.warning("exact re-score skipped, the store did not answer: %s", e)
            return None
        return vectors if vectors.shape[1:] == (self._index.dim,) else None

    def search(self, query: np.ndarray, k: int, *, by: str = "identity", rerank_shortlist: int | None = None,
               **filters) -> list[Match]:
        """Best first. With ``rerank_shortlist`` N, the N best entries are re-ranked with k-reciprocal
        neighbourhoods (service.rerank) using their stored vectors; scores stay cosines. Should the
        shortlist hold fewer than k answers, the plain ranking beyond it fills up the rest."""
        if rerank_shortlist is None:
            return self._index.search(query, k, by=by, **filters)
        found = self._index.search(query, rerank_shortlist, by="entry", **filters)
        vectors = self._exact_vectors(np.array([m.entry_id for m in found], dtype=np.int64)) if found else None
        if vectors is None or len(found) < 2:  # the store is away, or nothing to re-rank
            return self._index.search(query, k, by=by, **filters)
        known = ~np.isnan(vectors).any(axis=1)  # a delete may have raced the search
        shortlist, vectors = [m for m, ok in zip(found, known) if ok], vectors[known]
        if len(shortlist) < 2:
            return self._index.search(query, k, by=by, **filters)
        order, _ = rerank_order(query, vectors)
        reranked = _first_k([shortlist[i] for i in order], k, by)
        if len(reranked) < k and len(found) == rerank_shortlist:  # the gallery holds more than the shortlist
            reranked = _first_k(reranked + self._index.search(query, k, by=by, **filters), k, by)
        return reranked

    def likely_duplicates(self, identity: str, vectors: np.ndarray, threshold: float) -> list[Match]:
        """Other identities that some of ``vectors`` already match at or above ``threshold``: each at
        its best score, best first. (Run before enrolling them, so they do not find themselves.)"""
        best: dict[str, Match] = {}
        for vector in vectors:
            for m in self._index.search(vector, 2, by="identity"):  # 2: one may be ``identity`` itself
                if m.identity == identity or m.score < threshold:
                    continue
                if m.identity not in best or m.score > best[m.identity].score:
                    best[m.identity] = m
        return sorted(best.values(), key=lambda m: -m.score)

    def page(self, offset: int, limit: int) -> IdentityPage:
        return IdentityPage(self.store.list_identities(offset, limit), self.store.count_identities())

    def identity_entries(self, identity: str) -> list[EntryRow] | None:
        return self.store.identity_entries(identity)

    def crop(self, entry_id: int) -> bytes | None:
        return self.store.crop(entry_id)

    # -- snapshots and rebuilds ----------------------------------------------------------

    def changes_since_snapshot(self) -> int:
        return self._position - (self.snapshot_position or 0)

    def snapshot(self) -> None:
        """Save the index with its position; appliers wait, searches go on."""
        with self._apply_lock:
            if self._position == self.snapshot_position:
                return
            started = time.monotonic()
            key = SnapshotKey(self.store.store_id, self.fingerprint, self._index.dim, self.plan)
            save_snapshot(self.snapshot_dir, self._index, key, self._position)
            self.snapshot_position, self.snapshot_time = self._position, time.monotonic()
        log.info("index snapshot at log position %d: %d entries in %.1f s", self._position, len(self._index),
                 time.monotonic() - started)

    def rebuild_reason(self) -> str | None:
        """Why the index should be rebuilt now, or None."""
        index, n = self._index, len(self._index)
        if index.dead_fraction > DEAD_FRACTION_REBUILD:
            return f"{index.dead_fraction:.0%} of its slots are dead"
        planned = plan_index(self.plan, n)
        far = not (index.built_for / 2 <= n <= max(index.built_for, 1) * 2)
        if planned != index.spec and far:
            return f"{n} entries call for {planned.factory} instead of {index.spec.factory}"
        return None

    def rebuild(self, reason: str) -> None:
        """Build a new index beside the serving one, catch it up, swap it in."""
        log.info("index rebuild: %s", reason)
        started = time.monotonic()
        index, position = _build_index(self.store, self.fingerprint, self._index.dim, self.plan,
                                       self._index.search_settings)
        # Catch the new index up while the serving one goes on; the last stretch and the swap
        # under the applier lock, so that no change lands between them.
        while self._position - position > CHANGE_BATCH:
            position = _apply_next(self.store, index, position, self.fingerprint)
        with self._apply_lock:
            while position < self._position:
                position = _apply_next(self.store, index, position, self.fingerprint)
            index.exact_vectors = self._exact_vectors
            self._index, self._position = index, position
            self._stats = self._index_stats(self._stats.stale_entries)
        self.catch_up()
        self._changed()
        log.info("index rebuild done: %d entries (%s) in %.1f s", len(index), index.spec.factory,
                 time.monotonic() - started)


def _apply_next(store: GalleryStore, index: VectorIndex, position: int, fingerprint: str) -> int:
    batch = store.changes_after(position, CHANGE_BATCH)
    _apply(index, batch, fingerprint)
    return batch.last_position


def _apply(index: VectorIndex, batch: ChangeBatch, fingerprint: str) -> None:
    """Bring ``index`` to the entries' current state: an entry of this model is (re)indexed,
    one that is gone or made by another model is removed. Idempotent."""
    current = [s for s in batch.present if s.fingerprint == fingerprint]
    index.remove([*batch.gone, *(s.entry_id for s in batch.present if s.fingerprint != fingerprint)])
    if current:
        index.upsert(
            np.array([s.entry_id for s in current], dtype=np.int64),
            np.array([s.identity_id for s in current], dtype=np.int64),
            [s.identity for s in current], [s.camera for s in current], np.stack([s.vector for s in current]),
        )


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
