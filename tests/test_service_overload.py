"""Overload, deadlines, disconnects and shutdown, on a real `python -m service` process (and the
deadline in-process): what a client and a load balancer see when the model cannot keep up.

The services here run one single-image forward pass at a time (REID_MODEL_WORKERS=1,
REID_MAX_BATCH_SIZE=1), so that a request of many images keeps the model busy for a while.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.sqlite_store import SQLiteStore
from tests.service_support import (
    ServiceProcess, files, jpeg, metric_value, person_crop, seed_onnx_cache,
)

SLOW = {"model_workers": 1, "max_batch_size": 1, "max_images_per_request": 256}
MANY = 200  # images in one long request: at least a second of model work at one image per pass


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, served_checkpoint) -> Path:
    return tmp_path_factory.mktemp("overload")


def start(checkpoint: tuple[Path, Path], data: Path, **settings) -> ServiceProcess:
    data.mkdir()
    seed_onnx_cache(checkpoint[1], data)
    return ServiceProcess(checkpoint[0], data, **settings).start()


@pytest.fixture(scope="module")
def crops() -> list[bytes]:
    return [jpeg(person_crop(i % 8, i)) for i in range(MANY)]


@pytest.fixture(scope="module")
def small_queue(workdir, served_checkpoint):
    """A queue bound of 8 images."""
    service = start(served_checkpoint, workdir / "small-queue", max_queue_images=8, **SLOW)
    yield service
    service.stop()


def raw_request(path: str, image_files: list[tuple], **fields) -> tuple[bytes, bytes]:
    """The head and body of a multipart POST, to send over a plain socket."""
    request = httpx.Request("POST", f"http://service{path}", files=image_files, data=fields or None)
    body = request.read()
    head = f"POST {path} HTTP/1.1\r\nHost: service\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host")
    return (head + "\r\n").encode(), body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"connection closed after {data!r}")
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body)


def wait_for(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def in_background(call) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    return thread, result


def test_a_full_queue_refuses_uploads_from_their_headers_with_503_and_retry_after(small_queue, crops):
    service = small_queue
    shed_before = service.metric('reid_requests_shed_total{reason="overloaded"}')
    with service.client() as c:
        long, answer = in_background(lambda: c.post("/embed", files=files(*crops)))  # admitted alone
        wait_for(lambda: service.metric("reid_queue_images") > 0, what="the long request to be admitted")

        # Only the head of a 5 MB upload is sent: the answer must come without its body.
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
            head, _ = raw_request("/embed", files(crops[0]))
            head = head.replace(f"content-length: {len(_)}".encode(), b"content-length: 5000000")
            sock.sendall(head)
            status, headers, body = read_response(sock)
        assert status == 503 and body["code"] == "overloaded" and "retry" in body["detail"]
        assert int(headers["retry-after"]) >= 1

        # A mutation under pressure follows the same rule, and writes nothing.
        with service.client() as other:
            r = other.post("/gallery", data={"identity": "late"}, files=files(crops[0]))
            assert r.status_code == 503 and r.json()["code"] == "overloaded" and "retry-after" in r.headers
        long.join()
        assert answer[0].status_code == 200 and len(answer[0].json()["embeddings"]) == MANY
        assert c.get("/gallery/late").status_code == 404
    assert service.metric('reid_requests_shed_total{reason="overloaded"}') - shed_before == 2
    assert service.metric("reid_queue_images") == 0


def test_a_client_that_disconnects_has_its_queued_images_dropped(small_queue, crops):
    service = small_queue
    ran_before, dropped_before = service.metric("reid_batch_size_sum"), service.metric("reid_images_dropped_total")
    head, body = raw_request("/embed", files(*crops))
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(head + body)
        wait_for(lambda: service.metric("reid_batch_size_sum") > ran_before, what="the first forward pass")
    # Closed: every image is either run (those already in a pass) or dropped, none left over.
    wait_for(lambda: service.metric("reid_requests_cancelled_total") == 1, what="the disconnect to be noticed")
    wait_for(lambda: service.metric("reid_batch_size_sum") - ran_before
             + service.metric("reid_images_dropped_total") - dropped_before == MANY, what="the queue to empty")
    assert service.metric("reid_images_dropped_total") - dropped_before > MANY / 2
    assert service.metric("reid_queue_images") == 0


def test_past_its_deadline_a_request_gets_504_and_the_model_skips_its_images(workdir, served_checkpoint, crops):
    checkpoint, template = served_checkpoint
    settings = Settings(checkpoint=checkpoint, data_dir=workdir / "deadline", backend="onnx",
                        request_timeout_s=0.3, max_queue_images=1000, **SLOW)
    seed_onnx_cache(template, settings.data_dir)
    with TestClient(create_app(settings)) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, what="readiness")

        def images_run_and_dropped() -> tuple[float, float]:
            text = c.get("/metrics").text
            return metric_value(text, "reid_batch_size_sum"), metric_value(text, "reid_images_dropped_total")

        for path, fields in (("/embed", {}), ("/gallery", {"identity": "too-slow"})):
            ran_before, dropped_before = images_run_and_dropped()
            r = c.post(path, data=fields, files=files(*crops))
            assert r.status_code == 504 and r.json()["code"] == "timeout", r.text
            # Every image was either run before the deadline or dropped unrun; most were dropped.
            wait_for(lambda: sum(images_run_and_dropped()) - ran_before - dropped_before == MANY,
                     what="the queue to empty")
            assert images_run_and_dropped()[1] - dropped_before > MANY / 2
        assert c.get("/gallery/too-slow").status_code == 404  # nothing written
        assert metric_value(c.get("/metrics").text, "reid_requests_timed_out_total") == 2


def test_sigterm_turns_readiness_503_refuses_new_work_and_finishes_enrollments(workdir, served_checkpoint, crops):
    service = start(served_checkpoint, workdir / "drain", log_level="info", log_format="json", max_queue_images=1000,
                    shutdown_delay_s=3, shutdown_grace_s=60, **SLOW)
    enrollments = {f"person-{i}": crops[i * 30:(i + 1) * 30] for i in range(3)}
    answers: dict[str, int] = {}

    def enrol(identity: str) -> None:
        with service.client() as c:
            r = c.post("/gallery", data={"identity": identity}, files=files(*enrollments[identity]))
            answers[identity] = r.status_code

    threads = [threading.Thread(target=enrol, args=(identity,)) for identity in enrollments]
    for t in threads:
        t.start()
    # One more enrollment whose upload is only half sent: it stays in flight until the test
    # sends the rest, so the drain cannot end before the test has seen every phase.
    slow = socket.create_connection(("127.0.0.1", service.port), timeout=60)
    head, body = raw_request("/gallery", files(*crops[90:100]), identity="person-slow")
    slow.sendall(head + body[: len(body) // 2])
    wait_for(lambda: service.metric("reid_queue_images") >= 60, what="enrollments to be admitted")

    service.proc.send_signal(signal.SIGTERM)
    with service.client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 503, timeout=5, what="readiness to turn 503")
        assert c.get("/readyz").json()["status"] == "stopping"
        assert c.post("/embed", files=files(crops[0])).status_code == 200  # still served during the delay
        # Then new requests are refused, with the connection closed so the client goes elsewhere.
        wait_for(lambda: c.get("/gallery").status_code == 503, timeout=10, what="new requests to be refused")
        refused = c.get("/gallery")
    assert refused.json()["code"] == "shutting_down" and refused.headers["connection"] == "close"
    assert "retry-after" in refused.headers
    # Requests in flight finish: the slow upload too.
    slow.sendall(body[len(body) // 2:])
    status, _, slow_answer = read_response(slow)
    slow.close()
    assert status == 201, slow_answer
    for t in threads:
        t.join()
    assert answers == {identity: 201 for identity in enrollments}
    assert service.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    service.stop()

    store = SQLiteStore(service.data_dir / "gallery.sqlite3")
    stored = dict(store.list_identities(0, 100))
    store.close()
    assert stored == {**{identity: 30 for identity in enrollments}, "person-slow": 10}
    records = [json.loads(line) for line in service.log_path.read_text().splitlines() if line.strip()]
    access = [r for r in records if r["logger"] == "service.access"]
    assert {(r["method"], r["route"], r["status"]) for r in access} >= {
        ("POST", "/gallery", 201), ("GET", "/readyz", 503), ("GET", "/gallery", 503)}
    assert all(isinstance(r["duration_ms"], float) for r in access)
    assert any(r["logger"] == "service.app" and r["message"] == "services closed" for r in records)
