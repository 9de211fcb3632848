"""Everything a request needs once start-up is done, built off the event loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss

from service.batcher import Batcher
from service.cache import EmbeddingCache
from service.embedder import Embedder, load_embedder
from service.gallery import Gallery
from service.index import VectorIndex
from service.metrics import Metrics
from service.settings import Settings
from service.store import GalleryStore

log = logging.getLogger(__name__)

STORE_FILE = "gallery.sqlite3"


@dataclass
class Services:
    settings: Settings
    embedder: Embedder
    batcher: Batcher
    gallery: Gallery
    cache: EmbeddingCache
    metrics: Metrics

    def refresh_gauges(self) -> None:
        self.metrics.gallery_entries.set(self.gallery.size)
        self.metrics.gallery_identities.set(self.gallery.index.identity_count)
        self.metrics.stale_entries.set(self.gallery.stale_entries)

    def close(self) -> None:
        self.batcher.close()
        self.gallery.store.close()


def open_store(settings: Settings) -> GalleryStore:
    return GalleryStore(settings.data_dir / STORE_FILE)


def load_model(settings: Settings) -> Embedder:
    if settings.checkpoint is None:
        from service.embedder import StartupError

        raise StartupError("no checkpoint given: pass --checkpoint FILE or set REID_CHECKPOINT")
    return load_embedder(
        settings.checkpoint, device=settings.device, backend=settings.backend,
        data_dir=settings.data_dir, workers=settings.model_workers, threads=settings.threads,
    )


def build_services(settings: Settings, metrics: Metrics) -> Services:
    """Load the model, open the store, build the index: the slow part of start-up."""
    embedder = load_model(settings)
    info = embedder.info
    metrics.model_info.info(
        {"arch": info.arch, "fingerprint": info.fingerprint, "backend": embedder.backend, "device": embedder.device}
    )
    store = open_store(settings)
    # One query scans the index on one thread: OpenMP fan-out for a single query costs more in
    # spin-waiting than it saves, and steals the cores the model is using (10x slower when busy).
    faiss.omp_set_num_threads(settings.search_threads)
    index = VectorIndex(info.embedding_dim, settings.index, settings.hnsw_m, settings.hnsw_ef_search)
    gallery = Gallery(store, index, info.fingerprint)
    report = gallery.load()
    log.info("gallery: %d entries indexed (%s), %d stale", report.indexed, settings.index, report.stale)
    batcher = Batcher(
        embedder.embed, max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0, workers=embedder.workers, on_batch=metrics.observe_batch,
        on_drop=metrics.images_dropped.inc,
    )
    services = Services(settings, embedder, batcher, gallery, EmbeddingCache(
        settings.embedding_cache_size, settings.embedding_cache_ttl_s), metrics)
    services.refresh_gauges()
    return services
