"""Graceful shutdown on SIGTERM (or Ctrl+C), in the order a load balancer needs:

1. readiness (``/readyz``) turns 503 at once; work is still served for ``REID_SHUTDOWN_DELAY_S``
   (time for the balancer to notice and stop sending);
2. new requests are refused (503 ``shutting_down``, ``Connection: close``) while the requests
   in flight finish, for at most ``REID_SHUTDOWN_GRACE_S``;
3. uvicorn closes the listener and the lifespan closes the services (batcher, store), so
   everything acknowledged is on disk.

A second signal skips the wait; a third Ctrl+C kills at once (uvicorn's own behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)


class Lifecycle:
    """The shutdown state the routes and middleware consult; changed on the event loop only."""

    def __init__(self) -> None:
        self.stopping = False  # readiness answers 503
        self.refusing = False  # new requests answered 503
        self.in_flight = 0  # requests let through and not yet answered

    async def drain(self, delay_s: float, grace_s: float) -> None:
        self.stopping = True
        log.info("shutting down: readiness 503; serving %.1f s more, then refusing new requests", delay_s)
        await asyncio.sleep(delay_s)
        self.refusing = True
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.in_flight:
            log.warning("shutdown grace of %.1f s over with %d request(s) still in flight", grace_s, self.in_flight)
        else:
            log.info("shutting down: no request in flight")


class DrainingServer(uvicorn.Server):
    """uvicorn, with the first SIGTERM/SIGINT running ``Lifecycle.drain`` before uvicorn's shutdown."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, delay_s: float, grace_s: float):
        super().__init__(config)
        self.lifecycle, self.delay_s, self.grace_s = lifecycle, delay_s, grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._tasks: set[asyncio.Task] = set()  # a reference, so the task is not collected

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it runs on the main thread between two bytecodes of the event loop.
        if self._loop is None or self._draining or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: stop waiting
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain, sig)  # threadsafe: wakes the loop

    def _start_drain(self, sig: int) -> None:
        task = asyncio.ensure_future(self._drain_then_exit(sig))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_then_exit(self, sig: int) -> None:
        await self.lifecycle.drain(self.delay_s, self.grace_s)
        super().handle_exit(sig, None)  # uvicorn's shutdown, and the signal re-raised at the end
