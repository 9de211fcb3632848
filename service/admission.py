"""Admission control: a bound on the images waiting for the model, and per-request deadlines.

An image is *admitted* once its request's body is read and until its embedding is back (it
is being decoded, queued in the batcher or in a forward pass). A request whose images do not
fit under the bound is answered 503 with Retry-After at once: a queue that only grows serves
nobody in time. The bound defaults to what the service gets through in ``REID_QUEUE_TARGET_S``
(throughput measured at start, then as served), so an admitted image waits about that long.

Admitted work then runs under the request's deadline: past it, or when the client
disconnects, the work is cancelled and its images still queued are dropped by the batcher
before the model runs them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from service.batcher import DeadlineExceeded
from service.errors import ClientError, retry_later

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

DEADLINE_KEY = "reid.deadline"  # in the ASGI scope: time.monotonic() by which the images must be embedded


@dataclass(frozen=True)
class QueuePolicy:
    """How the bound follows the model's throughput."""

    target_s: float  # the wait an admitted image should see at most: bound = throughput x this
    floor: int  # the bound never goes below: a full batch for every worker
    busy_depth: int  # admitted images that keep every worker busy (one per worker)
    fixed_bound: int = 0  # REID_MAX_QUEUE_IMAGES: a bound that does not follow (0: follow)


class Admission:
    """Counts admitted images against the bound. Used on the event loop only: no lock.

    The throughput starts as measured at start-up (the bare model) and then follows what the
    service really gets through while the model is saturated: every WINDOW_S in which the
    admitted images never fell below ``busy_depth``, images served / window time, smoothed.
    HTTP, decoding and other work on the same cores make that less than the bare model; so
    the bound keeps the wait of an admitted image near the target whatever the machine does.
    """

    WINDOW_S = 1.0
    SMOOTHING = 0.5  # weight of the newest window

    def __init__(self, on_refuse: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic):
        self.bound: int | None = None  # None until start-up has measured the model: nothing refused
        self.throughput: float | None = None  # images per second
        self.depth = 0
        self.policy: QueuePolicy | None = None
        self._on_refuse, self._clock = on_refuse, clock
        self._window_start, self._served, self._lowest = clock(), 0, 0

    def configure(self, policy: QueuePolicy, throughput: float) -> None:
        self.policy = policy
        self._follow(throughput)
        log.info("queue bound: %d images (%s)", self.bound, "REID_MAX_QUEUE_IMAGES" if policy.fixed_bound else
                 f"{policy.target_s:g} s at {throughput:.0f} images/s to start with; follows the throughput served")

    def _follow(self, throughput: float) -> None:
        assert self.policy is not None
        self.throughput = throughput
        self.bound = self.policy.fixed_bound or default_bound(throughput, self.policy.target_s, self.policy.floor)

    def _observe(self) -> None:
        """After every change of depth: close the window when it is over."""
        self._lowest = min(self._lowest, self.depth)
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < self.WINDOW_S:
            return
        if self.policy is not None and self._lowest >= self.policy.busy_depth and self._served:
            measured = self._served / elapsed
            self._follow(self.SMOOTHING * measured + (1 - self.SMOOTHING) * (self.throughput or measured))
        self._window_start, self._served, self._lowest = now, 0, self.depth

    @property
    def full(self) -> bool:
        """No room for even one more image: refuse from the headers, before reading a body."""
        return self.bound is not None and self.depth >= self.bound

    def retry_after_s(self) -> int:
        """Seconds until what is admitted now has drained (at least 1)."""
        if not self.throughput:
            return 1
        return max(1, math.ceil(self.depth / self.throughput))

    def refuse(self) -> ClientError:
        """The 503 for a request that finds no room (counted as shed)."""
        self._on_refuse()
        return retry_later(
            "overloaded", f"overloaded: {self.depth} images are waiting for the model (limit {self.bound}); retry later",
            self.retry_after_s(),
        )

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Hold room for ``images`` until the block ends, or raise a 503. A request bigger than
        the whole bound is still admitted when nothing else waits, so that it can ever run."""
        if self.bound is not None and self.depth > 0 and self.depth + images > self.bound:
            raise self.refuse()
        self.depth += images
        self._observe()
        served = False
        try:
            yield
            served = True
        finally:
            self.depth -= images
            self._served += images if served else 0
            self._observe()


# -- the default bound ---------------------------------------------------------------------


def default_bound(throughput: float, target_s: float, floor: int) -> int:
    """Images the model gets through in ``target_s``; at least ``floor`` (a full batch per worker)."""
    return max(floor, math.ceil(throughput * target_s))


def queue_policy(settings: Settings, batch_size: int, workers: int) -> QueuePolicy:
    """REID_MAX_QUEUE_IMAGES fixes the bound; else it follows the throughput, never below a full
    batch for every worker."""
    return QueuePolicy(target_s=settings.queue_target_s, floor=batch_size * workers, busy_depth=workers,
                       fixed_bound=settings.max_queue_images)


# -- deadlines and disconnects -------------------------------------------------------------


class ClientGone(ClientError):
    """The client disconnected while its work waited. Nobody reads the answer; the access log
    and metrics show it as 499, as nginx does."""

    def __init__(self) -> None:
        super().__init__(499, "client_gone", "the client disconnected before its images were embedded")


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns once the client has gone. Only called after the body was read, when the next
    ASGI message can only be ``http.disconnect``."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_bounded(work: Awaitable[T], *, deadline: float, receive: Callable[[], Awaitable[dict]]) -> T:
    """Await ``work`` until ``deadline`` (time.monotonic()) or until the client disconnects; then
    cancel it (its queued images are dropped) and raise a 504 ClientError or ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            try:
                return task.result()
            except DeadlineExceeded:  # the batcher found the images expired before our timer fired
                raise timed_out() from None
        task.cancel()
        await asyncio.wait({task})  # its images are un-queued before the answer goes out
        if watcher in done:
            raise ClientGone()
        raise timed_out()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def timed_out() -> ClientError:
    return ClientError(504, "timeout", "the request's deadline passed before its images were embedded; retry later")


@dataclass(frozen=True)
class WaitBudget:
    """What one request may spend waiting for the model: room under the bound, its deadline,
    and its connection (to notice a client that leaves). Built per request by a dependency."""

    admission: Admission
    deadline: float  # time.monotonic()
    receive: Callable[[], Awaitable[dict]]
    on_timeout: Callable[[], None] = lambda: None
    on_gone: Callable[[], None] = lambda: None

    async def run(self, images: int, work: Callable[[float], Awaitable[T]]) -> T:
        """Admit ``images`` (503 when there is no room), then await ``work(deadline)`` within the
        deadline (504) and while the client stays (ClientGone)."""
        with self.admission.admit(images):
            try:
                return await run_bounded(work(self.deadline), deadline=self.deadline, receive=self.receive)
            except ClientGone:
                self.on_gone()
                raise
            except ClientError as e:
                if e.status == 504:
                    self.on_timeout()
                raise
