"""The HTTP contract in-process (TestClient): every bad input gets a 4xx naming the problem,
never a 500 and never a half-written gallery; API key; filters; crops; readiness."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.service_support import files, jpeg, make_checkpoint, person_crop, png

API_KEY = "s3cret-key"
MAX_UPLOAD = 200_000
KEY = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service-api")
    settings = Settings(
        checkpoint=make_checkpoint(tmp / "model.safetensors"), data_dir=tmp / "data", backend="torch",
        max_upload_bytes=MAX_UPLOAD, max_image_pixels=1_000_000, api_key=API_KEY, max_images_per_request=8,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, c.get("/readyz").json()
            time.sleep(0.1)
        for person in range(4):
            r = c.post("/gallery", data={"identity": f"person-{person}", "camera": str(person % 2)},
                       files=files(jpeg(person_crop(person, 0)), jpeg(person_crop(person, 1))), headers=KEY)
            assert r.status_code == 201, r.text
        yield c


def detail(r, code: str | None = None) -> str:
    """The error body's sentence, after checking the body has the one error shape (and the code)."""
    body = r.json()
    assert set(body) == {"detail", "code"} and isinstance(body["detail"], str) and isinstance(body["code"], str)
    assert code is None or body["code"] == code, body
    return body["detail"]


def test_health_and_readiness_describe_the_model(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["arch"] == "hacnn" and ready["backend"] == "torch"
    assert ready["gallery_size"] == 8 and ready["identities"] == 4 and ready["stale_entries"] == 0
    # An uncalibrated checkpoint serves as a plain ranking, and says so.
    assert ready["calibrated"] is False and ready["match_threshold"] is None and ready["threshold_source"] is None
    assert "no calibrated threshold" in ready["detail"]


def test_embed_returns_normalised_vectors_with_ids(client):
    r = client.post("/embed", files=files(jpeg(person_crop(0)), png(person_crop(1))))
    assert r.status_code == 200
    body = r.json()
    assert body["dim"] == 1024 and len(body["embeddings"]) == 2
    for item in body["embeddings"]:
        assert sum(v * v for v in item["vector"]) == pytest.approx(1.0, abs=1e-4)
    r = client.get("/query", params={"embedding_id": body["embeddings"][1]["embedding_id"], "k": 1})
    assert r.json()["matches"][0]["identity"] == "person-1"
    # No threshold in force: no decision, no per-match verdict.
    assert r.json()["decision"] is None and r.json()["threshold"] is None and r.json()["matches"][0]["match"] is None


def test_not_an_image_is_415(client):
    r = client.post("/embed", files=[("image", ("notes.txt", b"hello, not a picture", "text/plain"))])
    assert r.status_code == 415 and "notes.txt" in detail(r, "not_image") and "not an image" in detail(r)


def test_empty_upload_is_422(client):
    r = client.post("/embed", files=[("image", ("empty.jpg", b"", "image/jpeg"))])
    assert r.status_code == 422 and "empty" in detail(r, "empty_upload")


def test_missing_image_field_is_422(client):
    r = client.post("/embed", data={"something": "else"})
    assert r.status_code == 422 and "image" in detail(r, "validation")


def test_too_many_bytes_is_413_from_content_length(client):
    r = client.post("/embed", files=[("image", ("big.jpg", b"\xff" * (MAX_UPLOAD + 100_000), "image/jpeg"))])
    assert r.status_code == 413 and "request body exceeds the limit" in detail(r, "too_large")
    # Refused before routing, but counted under the route it was sent to.
    assert 'reid_request_duration_seconds_count{method="POST",route="/embed",status="413"}' in client.get("/metrics").text


def test_too_many_bytes_is_413_while_streaming_without_content_length(client):
    boundary = "reidtestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()

    def body():  # chunked transfer: the server only learns the size while reading
        yield head
        for _ in range(40):
            yield b"\xff" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/embed", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "request body exceeds the limit" in detail(r, "too_large")


def test_too_many_pixels_is_413(client):
    r = client.post("/embed", files=[("image", ("huge.png", png(Image.new("RGB", (1500, 1000))), "image/png"))])
    assert r.status_code == 413 and "1500x1000" in detail(r, "too_many_pixels")


def test_big_images_take_the_worker_thread_path_with_the_same_ranking_and_errors(client):
    """Crops up to REID_INLINE_DECODE_PIXELS are decoded on the event loop, bigger images on a
    worker thread: both paths rank the same person first and refuse a damaged file alike."""
    small, big = jpeg(person_crop(2)), jpeg(person_crop(2, size=(320, 640)))  # 8,192 and 204,800 pixels
    for data in (small, big):
        r = client.post("/query", params={"k": 1}, files=files(data))
        assert r.status_code == 200 and r.json()["matches"][0]["identity"] == "person-2"
    r = client.post("/embed", files=files(big[: len(big) // 3], name="cut.jpg"))
    assert r.status_code == 415 and "cut.jpg" in detail(r)


def test_too_many_images_is_413(client):
    r = client.post("/embed", files=files(*[jpeg(person_crop(0))] * 9))
    assert r.status_code == 413 and "9 images" in detail(r, "too_many_images")


@pytest.mark.parametrize("k", [0, -1, 1001])
def test_k_out_of_bounds_is_422(client, k):
    r = client.post("/query", params={"k": k}, files=files(jpeg(person_crop(0))))
    assert r.status_code == 422 and "k must be between 1 and 1000" in detail(r, "bad_k")


def test_bad_by_and_camera_are_422(client):
    r = client.post("/query", params={"by": "face"}, files=files(jpeg(person_crop(0))))
    assert r.status_code == 422 and "by" in detail(r)
    r = client.post("/query", params={"camera": "lobby"}, files=files(jpeg(person_crop(0))))
    assert r.status_code == 422 and "camera" in detail(r)


def test_unknown_or_expired_embedding_is_404(client):
    r = client.get("/query", params={"embedding_id": "0" * 32})
    assert r.status_code == 404 and "embedding_id" in detail(r, "unknown_embedding")


def test_unknown_identity_is_404(client):
    assert client.get("/gallery/nobody").status_code == 404
    r = client.delete("/gallery/nobody", headers=KEY)
    assert r.status_code == 404 and "nobody" in detail(r, "unknown_identity")


@pytest.mark.parametrize("identity", ["", "a/b", "x" * 129, "bad\x01name"])
def test_bad_identity_is_422_and_writes_nothing(client, identity):
    before = client.get("/gallery").json()["total"]
    r = client.post("/gallery", data={"identity": identity}, files=files(jpeg(person_crop(5))), headers=KEY)
    # FastAPI reads an empty form field as a missing one
    assert r.status_code == 422 and "identity" in detail(r, "validation" if identity == "" else "bad_identity")
    assert client.get("/gallery").json()["total"] == before


def test_one_bad_image_rejects_the_whole_enrollment(client):
    r = client.post(
        "/gallery", data={"identity": "half"}, headers=KEY,
        files=files(jpeg(person_crop(6)), jpeg(person_crop(6, 1))) + [("image", ("x.jpg", b"garbage", "image/jpeg"))],
    )
    assert r.status_code == 415
    assert client.get("/gallery/half").status_code == 404
    assert client.get("/readyz").json()["gallery_size"] == 8


def test_api_key_guards_mutations_only(client):
    crop = files(jpeg(person_crop(7)))
    assert client.post("/gallery", data={"identity": "keyless"}, files=crop).status_code == 401
    r = client.post("/gallery", data={"identity": "keyless"}, files=crop, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and "X-API-Key" in detail(r, "unauthorized")
    assert client.delete("/gallery/person-0").status_code == 401
    assert client.get("/gallery/person-0").status_code == 200  # reads need no key
    assert client.post("/query", files=crop).status_code == 200
    assert client.get("/gallery/keyless").status_code == 404


def test_enroll_list_detail_crop_delete(client):
    r = client.post("/gallery", data={"identity": "  temp  ", "camera": "3"}, headers=KEY,
                    files=files(jpeg(person_crop(5)), jpeg(person_crop(5, 1)), jpeg(person_crop(5, 2))))
    assert r.status_code == 201
    body = r.json()
    assert body["identity"] == "temp" and len(body["entries"]) == 3 and body["gallery_size"] == 11
    assert body["likely_duplicates"] is None  # not checked: no threshold in force
    assert all(e["camera"] == 3 and e["has_crop"] for e in body["entries"])
    listed = {i["identity"]: i["entries"] for i in client.get("/gallery").json()["identities"]}
    assert listed["temp"] == 3
    entries = client.get("/gallery/temp").json()["entries"]
    assert [e["entry_id"] for e in entries] == [e["entry_id"] for e in body["entries"]]
    crop = client.get(f"/crops/{entries[0]['entry_id']}")
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
    assert crop.content == jpeg(person_crop(5))
    assert client.delete("/gallery/temp", headers=KEY).status_code == 204
    assert client.get("/gallery/temp").status_code == 404
    assert client.get(f"/crops/{entries[0]['entry_id']}").status_code == 404
    matches = client.post("/query", params={"k": 100, "by": "entry"}, files=files(jpeg(person_crop(5)))).json()
    assert all(m["identity"] != "temp" for m in matches["matches"]) and matches["gallery_size"] == 8


def test_gallery_paging(client):
    page = client.get("/gallery", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 4 and page["offset"] == 1 and page["limit"] == 2
    assert [i["identity"] for i in page["identities"]] == ["person-1", "person-2"]
    assert client.get("/gallery", params={"limit": 0}).status_code == 422


def test_by_identity_and_camera_filters(client):
    query = files(jpeg(person_crop(2, 3)))
    by_entry = client.post("/query", params={"k": 8, "by": "entry"}, files=query).json()["matches"]
    by_identity = client.post("/query", params={"k": 8}, files=query).json()["matches"]
    assert [m["identity"] for m in by_entry[:2]] == ["person-2", "person-2"]
    assert len(by_identity) == 4 and len({m["identity"] for m in by_identity}) == 4
    assert by_identity[0]["identity"] == "person-2"
    scores = [m["score"] for m in by_entry]
    assert scores == sorted(scores, reverse=True)
    # person-2 was enrolled on camera 0: exclude it and it disappears, ask only for it and only it remains.
    excluded = client.post("/query", params={"k": 8, "exclude_camera": 0}, files=query).json()["matches"]
    assert {m["identity"] for m in excluded} == {"person-1", "person-3"}
    only = client.post("/query", params={"k": 8, "camera": 0, "by": "entry"}, files=query).json()["matches"]
    assert {m["camera"] for m in only} == {0} and len(only) == 4


def test_errors_are_counted_in_metrics(client):
    client.post("/embed", files=[("image", ("e.jpg", b"", "image/jpeg"))])
    text = client.get("/metrics").text
    assert 'reid_errors_total{kind="empty_upload"}' in text
    assert 'reid_request_duration_seconds_count{method="POST",route="/embed",status="422"}' in text
    assert "reid_model_info{" in text and 'arch="hacnn"' in text
