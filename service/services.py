"""Everything a request needs once start-up is done, built off the event loop."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss

from service.batcher import Batcher
from service.cache import EmbeddingCache
from service.decision import Threshold, configured_threshold
from service.embedder import Embedder, StartupError, load_embedder
from service.follower import Follower, FollowPolicy
from service.gallery import Gallery
from service.index import IndexPlanSettings, SearchSettings, exact_max_entries
from service.metrics import Metrics
from service.postgres_store import PostgresStore, describe_url
from service.settings import Settings
from service.sqlite_store import SQLiteStore
from service.store import GalleryStore, StoreUnavailable

log = logging.getLogger(__name__)

STORE_FILE = "gallery.sqlite3"
SNAPSHOT_DIR = "index"
STORE_RETRY_FIRST_S, STORE_RETRY_MAX_S = 0.5, 15.0  # start-up waiting for an unreachable store


@dataclass
class StartupStatus:
    """What start-up is doing (for /readyz), and a way to make it stop waiting."""

    detail: str = "loading model and gallery"
    stopping: threading.Event = field(default_factory=threading.Event)


@dataclass
class Services:
    settings: Settings
    embedder: Embedder
    batcher: Batcher
    gallery: Gallery
    follower: Follower
    cache: EmbeddingCache
    metrics: Metrics

    @property
    def default_threshold(self) -> Threshold | None:
        """REID_MATCH_THRESHOLD, else the checkpoint's calibrated threshold, else None."""
        return configured_threshold(self.settings.match_threshold, self.embedder.info.match_threshold)

    def close(self) -> None:
        """Stop following, snapshot what changed since the last snapshot, close everything."""
        self.batcher.close()
        self.follower.stop()
        try:
            self.gallery.snapshot()
        except Exception as e:  # the next start rebuilds or replays: nothing is lost
            log.warning("index snapshot at shutdown failed: %s", e)
        self.gallery.store.close()


def open_store(settings: Settings, on_reconnect: Callable[[], None] | None = None) -> GalleryStore:
    """PostgreSQL when a database URL is set (replicas share it), else SQLite under the data dir."""
    if settings.database_url:
        return PostgresStore(settings.database_url, pool_size=settings.database_pool_size,
                             timeout_s=settings.database_timeout_s, on_reconnect=on_reconnect)
    return SQLiteStore(settings.data_dir / STORE_FILE)


def store_name(settings: Settings) -> str:
    return describe_url(settings.database_url) if settings.database_url else str(settings.data_dir / STORE_FILE)


def index_plan(settings: Settings, dim: int) -> IndexPlanSettings:
    return IndexPlanSettings(
        setting=settings.index, exact_max_entries=settings.index_exact_max_entries or exact_max_entries(dim),
        hnsw_m=settings.hnsw_m,
        hnsw_ef_construction=settings.hnsw_ef_construction, ivf_lists=settings.ivf_lists, storage=settings.index_storage,
    )


def search_settings(settings: Settings) -> SearchSettings:
    return SearchSettings(hnsw_ef_search=settings.hnsw_ef_search, ivf_nprobe=settings.ivf_nprobe)


def load_model(settings: Settings) -> Embedder:
    if settings.checkpoint is None:
        raise StartupError("no checkpoint given: pass --checkpoint FILE or set REID_CHECKPOINT")
    return load_embedder(
        settings.checkpoint, device=settings.device, backend=settings.backend, precision=settings.precision,
        min_cosine=settings.min_cosine, data_dir=settings.data_dir, workers=settings.model_workers, threads=settings.threads,
    )


def open_gallery(settings: Settings, store: GalleryStore, fingerprint: str, dim: int, metrics: Metrics) -> Gallery:
    """Load or build the index; all cores for that (nothing is searching yet), then one thread
    per search: OpenMP fan-out for a single query costs more in spin-waiting than it saves,
    and steals the cores the model is using (10x slower when busy)."""
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        return Gallery.open(
            store, fingerprint=fingerprint, dim=dim, plan=index_plan(settings, dim), search=search_settings(settings),
            snapshot_dir=settings.data_dir / SNAPSHOT_DIR, on_change=metrics.observe_gallery,
        )
    finally:
        faiss.omp_set_num_threads(settings.search_threads)


def open_gallery_when_reachable(
    settings: Settings, fingerprint: str, dim: int, metrics: Metrics, status: StartupStatus
) -> Gallery:
    """Open the store and the gallery, retrying with backoff while the store is unreachable
    (a database still starting, or down); /readyz says why meanwhile."""
    delay = STORE_RETRY_FIRST_S
    while True:
        try:
            store = open_store(settings, on_reconnect=metrics.store_reconnects.inc)
            try:
                return open_gallery(settings, store, fingerprint, dim, metrics)
            except BaseException:
                store.close()
                raise
        except StoreUnavailable as e:
            reason = str(e)
        status.detail = f"waiting for the gallery store ({reason}); next try in {delay:.1f} s"
        log.warning("gallery store unreachable, next try in %.1f s: %s", delay, reason)
        if status.stopping.wait(delay):
            raise StartupError(f"stopped while waiting for the gallery store: {reason}")
        delay = min(delay * 2, STORE_RETRY_MAX_S)


def build_services(settings: Settings, metrics: Metrics, status: StartupStatus | None = None) -> Services:
    """Load the model, open the store, load or build the index: the slow part of start-up."""
    status = status or StartupStatus()
    embedder = load_model(settings)
    info = embedder.info
    metrics.observe_model(embedder)
    status.detail = f"opening the gallery store {store_name(settings)}"
    gallery = open_gallery_when_reachable(settings, info.fingerprint, info.embedding_dim, metrics, status)
    metrics.observe_gallery(gallery.stats)
    policy = FollowPolicy(
        interval_s=settings.follow_interval_s, snapshot_every_changes=settings.snapshot_every_changes,
        snapshot_every_s=settings.snapshot_every_s,
    )
    follower = Follower(gallery, policy, on_error=lambda e: metrics.follow_errors.inc())
    metrics.watch_follower(follower)
    follower.start()
    batcher = Batcher(
        embedder.embed, max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0, workers=embedder.workers, on_batch=metrics.observe_batch,
        on_drop=metrics.images_dropped.inc,
    )
    cache = EmbeddingCache(settings.embedding_cache_size, settings.embedding_cache_ttl_s)
    return Services(settings, embedder, batcher, gallery, follower, cache, metrics)
