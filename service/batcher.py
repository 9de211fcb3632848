"""Micro-batching: concurrent requests share forward passes on the batcher's worker threads.

Each image is submitted on its own; a worker takes the first waiting image, then
everything already queued, up to ``max_batch_size``. It waits for more (at most
``max_wait_s``) only while requests have announced images that are still being decoded
(``expecting``): a lone request never waits on the timer, and requests that arrive
together share a forward pass. While a batch runs, new images queue up, so under load
batches fill by themselves. Several workers may run passes side by side (``workers``):
on CPU, one single-threaded pass per core beats one pass split over all cores.

An image whose request has given up (its future cancelled: the client left or the request
timed out) or whose deadline has passed is dropped when a worker takes it from the queue:
the model never spends a pass on an answer nobody waits for.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class DeadlineExceeded(Exception):
    """The image's deadline passed while it was queued; the model did not run it."""


@dataclass
class _Item:
    image: np.ndarray  # H x W x 3 uint8 (the embedder normalises whole batches)
    future: Future
    deadline: float | None = None  # time.monotonic()
    submitted: float = field(default_factory=time.perf_counter)


_STOP = object()


class Batcher:
    def __init__(
        self,
        embed: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_wait_s: float,
        workers: int = 1,
        on_batch: Callable[[int, float, list[float]], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ):
        """``on_batch(size, inference_seconds, queue_waits)`` is called after every forward pass,
        ``on_drop(images)`` when queued images are dropped; with several workers, ``embed`` and
        the callbacks are called from several threads at once."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._embed = embed
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._on_drop = on_drop
        self._queue: queue.Queue = queue.Queue()
        self._expected = 0  # images announced by requests and not yet submitted
        self._expected_lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"reid-batcher-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    def submit(self, image: np.ndarray, deadline: float | None = None) -> Future:
        """A future for the image's embedding; past ``deadline`` (time.monotonic()) it fails with
        DeadlineExceeded instead, and cancelling it drops the image, as long as no pass took it."""
        if self._closed:  # no worker would ever answer
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        self._queue.put(_Item(image, future, deadline))
        return future

    def _adjust_expected(self, n: int) -> None:
        with self._expected_lock:
            self._expected += n

    @contextmanager
    def expecting(self, n: int) -> Iterator[dict]:
        """Announce n images about to be submitted (decoding now) so the worker waits for them."""
        announced = {"left": n}
        self._adjust_expected(n)
        try:
            yield announced
        finally:
            self._adjust_expected(-announced["left"])

    async def embed(
        self, images: list[np.ndarray], announced: dict | None = None, deadline: float | None = None
    ) -> np.ndarray:
        """Embed images (each H x W x 3) without blocking the event loop: N x D. Cancelling the
        call drops the images still queued."""
        futures = [asyncio.wrap_future(self.submit(image, deadline)) for image in images]
        if announced is not None:  # queued first, then un-announced: the worker never misses them
            self._adjust_expected(-announced["left"])
            announced["left"] = 0
        if len(futures) == 1:  # the common case: no gather task to schedule
            return (await futures[0])[None]
        return np.stack(await asyncio.gather(*futures))

    def embed_sync(self, images: list[np.ndarray]) -> np.ndarray:
        """The same from a plain thread (CLI import, reembed)."""
        futures = [self.submit(image) for image in images]
        return np.stack([f.result() for f in futures])

    def close(self) -> None:
        """Finish what is queued, then stop every worker."""
        self._closed = True
        for _ in self._threads:  # each worker leaves on the first stop it takes
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=30)
        # Anything queued after the workers left (a submit racing close) is cancelled, not left hanging.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.future.cancel()

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        batch, stop = [first], False
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()  # whatever queued while the last batch ran
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._expected <= 0:  # nobody is about to submit: run now
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                stop = True
                break
            if self._take(item):
                batch.append(item)
        return batch, stop

    def _take(self, item: _Item) -> bool:
        """Claim the item for a pass (it can no longer be cancelled), or drop it: its request
        gave up, or its deadline has passed."""
        if not item.future.set_running_or_notify_cancel():
            self._dropped()
            return False
        if item.deadline is not None and time.monotonic() > item.deadline:
            item.future.set_exception(DeadlineExceeded())
            self._dropped()
            return False
        return True

    def _dropped(self) -> None:
        if self._on_drop is not None:
            self._on_drop(1)

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            if not self._take(first):
                continue
            batch, stop = self._collect(first)
            started = time.perf_counter()
            try:
                vectors = self._embed(np.stack([item.image for item in batch]))
            except Exception as e:  # the model failed: every waiting request learns it
                log.exception("model forward pass failed")
                for item in batch:
                    item.future.set_exception(e)
                continue
            elapsed = time.perf_counter() - started
            for item, vector in zip(batch, vectors):
                item.future.set_result(vector)
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed, [started - item.submitted for item in batch])
