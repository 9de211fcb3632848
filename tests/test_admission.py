"""Admission control in-process: the queue bound, deadlines and disconnects cancel queued work,
and the batcher drops what nobody waits for before the model runs it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from service.admission import Admission, ClientGone, QueuePolicy, WaitBudget, default_bound, run_bounded
from service.calibration import calibrate, candidate_batches
from service.batcher import Batcher, DeadlineExceeded
from service.errors import ClientError

IMAGE = np.zeros((4, 2, 3), np.uint8)


class GatedModel:
    """A model whose passes wait for the test to open the gate; it records every image it ran."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.ran = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.started.set()
        self.gate.wait(10)
        self.ran += len(images)
        return images.reshape(len(images), -1)[:, :4].astype(np.float32)


def never_disconnects():
    async def receive() -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


# -- the bound ----------------------------------------------------------------------------


def admission_with(bound: int, throughput: float, **kwargs) -> Admission:
    admission = Admission(**kwargs)
    admission.configure(QueuePolicy(target_s=1.0, floor=1, busy_depth=1, fixed_bound=bound), throughput)
    return admission


def test_admission_refuses_beyond_the_bound_with_retry_after_and_frees_room_after():
    refused = []
    admission = admission_with(bound=10, throughput=4.0, on_refuse=lambda: refused.append(1))
    with admission.admit(8):
        assert not admission.full
        with pytest.raises(ClientError) as error:
            with admission.admit(3):
                pass
        assert error.value.status == 503 and error.value.kind == "overloaded"
        assert error.value.headers == {"Retry-After": "2"}  # 8 images at 4 images/s
        with admission.admit(2):
            assert admission.full and admission.depth == 10
    assert admission.depth == 0 and len(refused) == 1


def test_nothing_is_refused_before_start_up_has_measured_the_model():
    admission = Admission()
    with admission.admit(1000):
        assert not admission.full


def test_a_request_bigger_than_the_bound_runs_alone():
    admission = admission_with(bound=4, throughput=100.0)
    with admission.admit(64):  # nothing else waits: admitted, else it could never run
        with pytest.raises(ClientError):
            with admission.admit(1):
                pass


def test_default_bound_is_the_target_wait_of_measured_work():
    assert default_bound(throughput=300.0, target_s=0.5, floor=64) == 150
    assert default_bound(throughput=20.0, target_s=0.5, floor=64) == 64  # a full batch per worker at least


def model_taking(seconds_per_image) -> SimpleNamespace:
    """An embedder whose pass over n images takes seconds_per_image(n) x n."""

    def run(pixels: np.ndarray) -> np.ndarray:
        time.sleep(seconds_per_image(len(pixels)) * len(pixels))
        return np.zeros((len(pixels), 4), np.float32)

    return SimpleNamespace(embed=run, workers=2, info=SimpleNamespace(input_size=(4, 2)))


def test_calibration_picks_the_batch_the_model_runs_fastest_per_image():
    # Like HA-CNN on a 2-core CPU: a pass of 32 is slower per image than a pass of 8.
    cpu = calibrate(model_taking(lambda n: 0.001 if n <= 8 else 0.002), max_batch=32)
    assert cpu.batch_size == 8 and set(cpu.rates) == {8, 16, 32}
    assert 2 * 8 / 0.012 < cpu.throughput <= 2 * 8 / 0.008  # two workers side by side
    # Like a GPU: the bigger the batch, the faster.
    gpu = calibrate(model_taking(lambda n: 0.02 / n), max_batch=32)
    assert gpu.batch_size == 32
    assert candidate_batches(1) == [1] and candidate_batches(8) == [2, 4, 8]


def test_the_bound_follows_the_throughput_served_while_the_model_is_saturated():
    """Start-up measures the bare model (1000 images/s); the service, sharing the cores with
    HTTP, serves 100: the bound comes down to 100 x 0.5 s. Light load teaches it nothing."""
    now = [0.0]
    admission = Admission(clock=lambda: now[0])
    admission.configure(QueuePolicy(target_s=0.5, floor=8, busy_depth=2), throughput=1000.0)
    assert admission.bound == 500

    def serve(seconds: float, rate: float, backlog: int) -> None:
        """``backlog`` images always admitted, ``rate`` requests of one image served per second."""
        with admission.admit(backlog) if backlog else contextlib.nullcontext():
            for _ in range(int(seconds * rate)):
                with admission.admit(1):
                    now[0] += 1 / rate

    serve(seconds=2, rate=5, backlog=0)  # one image at a time: the model was not saturated
    assert admission.bound == 500
    serve(seconds=10, rate=100, backlog=20)
    assert admission.throughput == pytest.approx(100, rel=0.05) and admission.bound == pytest.approx(50, abs=3)
    serve(seconds=10, rate=300, backlog=20)  # the machine got faster
    assert admission.bound == pytest.approx(150, abs=8)


# -- the batcher drops what nobody waits for ----------------------------------------------


def test_batcher_drops_cancelled_and_expired_images_before_the_model_runs_them():
    model, dropped = GatedModel(), []
    batcher = Batcher(model, max_batch_size=4, max_wait_s=0, on_drop=dropped.append)
    first = batcher.submit(IMAGE)
    assert model.started.wait(10)  # a pass holds the only worker; everything else queues
    cancelled = [batcher.submit(IMAGE) for _ in range(3)]
    expired = [batcher.submit(IMAGE, deadline=time.monotonic() + 0.05) for _ in range(2)]
    alive = [batcher.submit(IMAGE, deadline=time.monotonic() + 60) for _ in range(2)]
    for future in cancelled:
        assert future.cancel()
    time.sleep(0.1)  # the expired ones' deadline passes while they wait
    model.gate.set()
    for future in [first, *alive]:
        assert future.result(10).shape == (4,)
    for future in expired:
        with pytest.raises(DeadlineExceeded):
            future.result(10)
    batcher.close()
    assert model.ran == 3 and sum(dropped) == 5


def test_cancelling_an_embed_call_drops_its_queued_images():
    model, dropped = GatedModel(), []
    batcher = Batcher(model, max_batch_size=2, max_wait_s=0, on_drop=dropped.append)

    async def scenario() -> None:
        blocker = asyncio.ensure_future(batcher.embed([IMAGE]))
        await asyncio.to_thread(model.started.wait, 10)
        waiting = asyncio.ensure_future(batcher.embed([IMAGE] * 5))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        model.gate.set()
        await blocker

    asyncio.run(scenario())
    batcher.close()
    assert model.ran == 1 and sum(dropped) == 5


# -- deadlines and disconnects ------------------------------------------------------------


def test_run_bounded_answers_504_at_the_deadline_and_cancels_the_work():
    async def scenario() -> asyncio.Task:
        work = asyncio.ensure_future(asyncio.sleep(30))
        with pytest.raises(ClientError) as error:
            await run_bounded(work, deadline=time.monotonic() + 0.05, receive=never_disconnects())
        assert error.value.status == 504 and error.value.kind == "timeout"
        return work

    assert asyncio.run(scenario()).cancelled()


def test_run_bounded_cancels_the_work_when_the_client_disconnects():
    async def scenario() -> asyncio.Task:
        gone = asyncio.Event()

        async def receive() -> dict:
            await gone.wait()
            return {"type": "http.disconnect"}

        work = asyncio.ensure_future(asyncio.sleep(30))
        asyncio.get_running_loop().call_later(0.05, gone.set)
        with pytest.raises(ClientGone):
            await run_bounded(work, deadline=time.monotonic() + 30, receive=receive)
        return work

    assert asyncio.run(scenario()).cancelled()


def test_an_expired_image_found_by_the_batcher_is_a_504_too():
    async def expired_in_queue(deadline: float):
        raise DeadlineExceeded()

    counted = []
    budget = WaitBudget(Admission(), time.monotonic() + 30, never_disconnects(),
                        on_timeout=lambda: counted.append(1))
    with pytest.raises(ClientError) as error:
        asyncio.run(budget.run(1, expired_in_queue))
    assert error.value.status == 504 and counted == [1] and budget.admission.depth == 0
