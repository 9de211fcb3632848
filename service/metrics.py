"""Prometheus metrics, on a registry of the app's own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

STAGES = ("decode", "preprocess", "queue_wait", "inference", "search")
# Seconds: sub-millisecond stages (search on small galleries) up to slow CPU batches.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "reid_request_duration_seconds", "HTTP request latency by route template, method and status",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.stage_duration = Histogram(
            "reid_stage_duration_seconds", "Seconds per image (decode, preprocess, queue_wait), per forward pass (inference) or per query (search)",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram("reid_batch_size", "Images per model forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.gallery_entries = Gauge("reid_gallery_entries", "Entries searchable under the current model", registry=r)
        self.gallery_identities = Gauge("reid_gallery_identities", "Identities searchable under the current model", registry=r)
        self.stale_entries = Gauge("reid_gallery_stale_entries", "Entries made by another model, excluded from search", registry=r)
        self.gallery_position = Gauge("reid_gallery_log_position", "Gallery change-log position the index covers", registry=r)
        self.index_info = Info("reid_index", "The index kind in use (it changes when the gallery outgrows it)", registry=r)
        self.follow_errors = Counter(
            "reid_gallery_follow_errors", "Rounds of following the gallery log (or rebuilding the index) that failed", registry=r
        )
        self.log_head = Gauge(
            "reid_gallery_log_head", "The store's last committed log position, at the follower's last look "
            "(minus reid_gallery_log_position: changes not yet searchable here)", registry=r,
        )
        self.sync_age = Gauge(
            "reid_gallery_sync_age_seconds", "Seconds since this process's index was last confirmed up to date "
            "with the gallery store (about the follow interval when healthy; grows while the store is unreachable)",
            registry=r,
        )
        self.stale = Gauge(
            "reid_gallery_stale", "1 while queries answer from an index not confirmed against the store for a while",
            registry=r,
        )
        self.store_reconnects = Counter(
            "reid_gallery_store_reconnects", "Times the follower's connection to the gallery database was made again "
            "after being lost", registry=r,
        )
        self.errors = Counter("reid_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        self.model_info = Info("reid_model", "The model being served: arch, fingerprint, backend, precision, device", registry=r)
        self.backend_min_cosine = Gauge(
            "reid_backend_min_cosine", "Accuracy check of the backend serving: smallest cosine between its embeddings "
            "of the calibration batch and the fp32 reference's (1 when fp32 serves unchecked)", registry=r,
        )
        self.backend_required_cosine = Gauge(
            "reid_backend_required_min_cosine", "The accuracy check's tolerance (REID_MIN_COSINE)", registry=r,
        )
        self.backend_images_per_second = Gauge(
            "reid_backend_images_per_second", "Images/s of a backend and precision on the calibration batch at start "
            "(every candidate measured, the chosen one included)", ["backend", "precision"], registry=r,
        )
        # Admission control, deadlines and shutdown (service/admission.py, service/drain.py).
        self.requests_shed = Counter(
            "reid_requests_shed", "Requests refused with 503 before any work: reason overloaded or shutting_down",
            ["reason"], registry=r,
        )
        self.requests_timed_out = Counter(
            "reid_requests_timed_out", "Requests answered 504: their deadline passed before their images were embedded",
            registry=r,
        )
        self.requests_cancelled = Counter(
            "reid_requests_cancelled", "Requests whose client disconnected while their images waited", registry=r,
        )
        self.images_dropped = Counter(
            "reid_images_dropped", "Queued images removed before the model ran them (request timed out or gone)",
            registry=r,
        )
        self.queue_images = Gauge(
            "reid_queue_images", "Images admitted and not yet embedded (decoding, queued or in a forward pass)",
            registry=r,
        )
        self.queue_limit = Gauge("reid_queue_limit", "Most images admitted at once, beyond which uploads get 503 (follows the throughput served)", registry=r)
        for stage in STAGES:  # export every series from the start, at zero
            self.stage_duration.labels(stage)
        for reason in ("overloaded", "shutting_down"):
            self.requests_shed.labels(reason)

    def observe_model(self, embedder) -> None:
        info, check = embedder.info, embedder.check
        self.model_info.info({"arch": info.arch, "fingerprint": info.fingerprint, "backend": embedder.backend,
                              "precision": embedder.precision, "device": embedder.device})
        self.backend_min_cosine.set(check.chosen.min_cosine if check else 1.0)
        if check:
            self.backend_required_cosine.set(check.required_min_cosine)
            for trial in check.trials:
                self.backend_images_per_second.labels(trial.backend, trial.precision).set(trial.images_per_s)

    def observe_gallery(self, stats) -> None:
        """Gallery.on_change: the gauges follow every applied change, whoever made it."""
        self.gallery_entries.set(stats.entries)
        self.gallery_identities.set(stats.identities)
        self.stale_entries.set(stats.stale_entries)
        self.gallery_position.set(stats.position)
        self.index_info.info({"kind": stats.index_kind})

    def watch_follower(self, follower) -> None:
        """Read the follower's state at each scrape."""
        self.log_head.set_function(lambda: follower.head)
        self.sync_age.set_function(follower.sync_age)
        self.stale.set_function(lambda: float(follower.stale))

    def observe_batch(self, size: int, inference_s: float, queue_waits: list[float]) -> None:
        self.batch_size.observe(size)
        self.stage_duration.labels("inference").observe(inference_s)
        for wait in queue_waits:
            self.stage_duration.labels("queue_wait").observe(wait)
