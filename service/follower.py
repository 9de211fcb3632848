"""The background thread that keeps the index in step with the store while the service runs.

Each round: wait for the store to say something may have changed (SQLite: a short sleep;
PostgreSQL: a notification wakes it at once, and the interval is the safety net), apply the
new changes, then snapshot the index when enough changed or enough time passed, and rebuild
it when its kind no longer fits the gallery or too many slots are dead. The applying itself
is ``Gallery.catch_up``, the same code the writer's own read-your-writes uses.

When the store cannot be reached, rounds fail and are retried with backoff (at most
``FAILURE_BACKOFF_MAX_S`` apart); searches go on from the index, which is then *stale*:
not confirmed against the store for longer than ``FollowPolicy.stale_after_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from service.gallery import Gallery

log = logging.getLogger(__name__)

REBUILD_RETRY_S = 600.0
FAILURE_BACKOFF_MAX_S = 5.0  # a store back online is followed again within this


@dataclass(frozen=True)
class FollowPolicy:
    interval_s: float = 0.25  # longest wait between looks at the log
    snapshot_every_changes: int = 10_000
    snapshot_every_s: float = 300.0
    rebuild: bool = True

    @property
    def stale_after_s(self) -> float:
        """The index is called stale once it has not been confirmed against the store for this long."""
        return max(2.0, 8 * self.interval_s)


class Follower:
    def __init__(self, gallery: Gallery, policy: FollowPolicy, on_error=None):
        self.gallery, self.policy = gallery, policy
        self._on_error = on_error or (lambda e: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reid-follower", daemon=True)
        self._rebuilding: threading.Thread | None = None
        self._rebuild_failed_at = -float("inf")
        self.head = gallery.position  # the store's head at the last look
        self._synced_at = time.monotonic()  # the index held every change committed before this

    def sync_age(self) -> float:
        """Seconds since the index was last confirmed up to date with the store."""
        return time.monotonic() - self._synced_at

    @property
    def stale(self) -> bool:
        return self.sync_age() > self.policy.stale_after_s

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following (after the round in progress); the caller snapshots if it wants to."""
        self._stop.set()
        self._thread.join(timeout=600)
        if self._rebuilding is not None:
            self._rebuilding.join()

    def snapshot_due(self) -> bool:
        g, p = self.gallery, self.policy
        changed = g.changes_since_snapshot()
        if not changed:
            return False
        if g.snapshot_position is None:  # built from the store: save that work at once
            return True
        return changed >= p.snapshot_every_changes or time.monotonic() - g.snapshot_time >= p.snapshot_every_s

    def run_once(self) -> None:
        g = self.gallery
        started = time.monotonic()
        self.head = g.store.head()
        g.catch_up()  # up to an empty read: everything committed before `started` is applied
        self._synced_at = started
        if self.rebuilding:
            return  # snapshot the new index once it serves, not the old one
        retry = time.monotonic() - self._rebuild_failed_at > REBUILD_RETRY_S
        if self.policy.rebuild and retry and (reason := g.rebuild_reason()):
            # On a thread of its own (minutes for a big gallery): following goes on meanwhile.
            self._rebuilding = threading.Thread(target=self._rebuild, args=(reason,), name="reid-rebuild", daemon=True)
            self._rebuilding.start()
        elif self.snapshot_due():
            g.snapshot()

    @property
    def rebuilding(self) -> bool:
        return self._rebuilding is not None and self._rebuilding.is_alive()

    def _rebuild(self, reason: str) -> None:
        try:
            self.gallery.rebuild(reason)
            self.gallery.snapshot()
        except Exception as e:
            self._rebuild_failed_at = time.monotonic()
            self._on_error(e)
            log.warning("index rebuild failed, the old index keeps serving (next try in %.0f s): %s", REBUILD_RETRY_S, e)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.gallery.store.wait_for_change(self.gallery.position, self.policy.interval_s)
                if self._stop.is_set():
                    break
                self.run_once()
                failures = 0
            except Exception as e:  # keep following: the next round may succeed (a store back online)
                failures += 1
                self._on_error(e)
                if failures == 1 or failures % 100 == 0:
                    log.warning("following the gallery log failed (%d in a row): %s", failures, e)
                self._stop.wait(min(FAILURE_BACKOFF_MAX_S, self.policy.interval_s * 2 ** min(failures, 7)))
