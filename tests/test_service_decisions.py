"""Decisions, thresholds, tracklets and re-ranking over HTTP (in-process TestClient).

The checkpoint is an untrained HA-CNN given a hand-set calibration: on the palette-distinct
crops of tests.service_support it scores the same person >= 0.988 and different people
<= 0.979 (measured for persons 0-7, views 0-5), so THRESHOLD sits between the two."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.checkpoint import write_calibration
from service.app import create_app
from service.settings import Settings
from tests.service_support import files, jpeg, make_checkpoint, person_crop

THRESHOLD = 0.985
ENROLLED = range(4)  # persons 0-3, views 0 and 1; persons 4-7 are never enrolled


@contextlib.contextmanager
def running_app(checkpoint, data_dir, **settings):
    app = create_app(Settings(checkpoint=checkpoint, data_dir=data_dir, backend="torch", **settings))
    with TestClient(app, raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, c.get("/readyz").json()
            time.sleep(0.05)
        yield c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("decisions") / "model.safetensors")
    write_calibration(path, {"threshold": THRESHOLD, "far": 1e-3, "tar": 0.9})
    return path


@pytest.fixture(scope="module")
def client(checkpoint):
    with running_app(checkpoint, checkpoint.parent / "data", max_tracklet_crops=4) as c:
        for person in ENROLLED:
            r = c.post("/gallery", data={"identity": f"person-{person}", "camera": "1"},
                       files=files(jpeg(person_crop(person, 0)), jpeg(person_crop(person, 1))))
            assert r.status_code == 201 and r.json()["likely_duplicates"] == [], r.text
        yield c


def query(client, *crops, **params) -> dict:
    r = client.post("/query", params=params, files=files(*[jpeg(c) for c in crops]))
    assert r.status_code == 200, r.text
    return r.json()


def test_readiness_reports_the_calibrated_threshold(client):
    ready = client.get("/readyz").json()
    assert ready["calibrated"] is True and ready["match_threshold"] == THRESHOLD
    assert ready["threshold_source"] == "checkpoint" and ready["detail"] is None


@pytest.mark.parametrize("person", ENROLLED)
def test_an_enrolled_persons_other_crop_is_known(client, person):
    body = query(client, person_crop(person, 5))
    assert body["decision"] == "known" and body["matches"][0]["identity"] == f"person-{person}"
    assert body["threshold"] == THRESHOLD and body["threshold_source"] == "checkpoint"
    assert body["crops"] == 1 and body["reranked"] is False
    assert [m["match"] for m in body["matches"]] == [m["score"] >= THRESHOLD for m in body["matches"]]
    assert body["matches"][0]["match"] is True


@pytest.mark.parametrize("person", [4, 5, 6, 7])
def test_a_person_never_enrolled_is_unknown(client, person):
    body = query(client, person_crop(person, 5))
    assert body["decision"] == "unknown" and not any(m["match"] for m in body["matches"])
    assert len(body["matches"]) == 4  # still ranked: the decision is an addition, not a filter


def test_threshold_parameter_overrides_for_one_query(client):
    strict = query(client, person_crop(2, 5), threshold=0.9999)
    assert strict["decision"] == "unknown" and strict["threshold"] == 0.9999 and strict["threshold_source"] == "query"
    lax = query(client, person_crop(6, 5), threshold=0.5)
    assert lax["decision"] == "known" and all(m["match"] for m in lax["matches"])
    assert query(client, person_crop(6, 5))["threshold"] == THRESHOLD  # nothing sticks


@pytest.mark.parametrize("value", ["1.5", "-2", "high"])
def test_bad_threshold_is_422(client, value):
    r = client.post("/query", params={"threshold": value}, files=files(jpeg(person_crop(0))))
    assert r.status_code == 422 and "threshold" in r.json()["detail"]


def test_setting_overrides_the_checkpoint_and_the_query_overrides_both(checkpoint, tmp_path):
    with running_app(checkpoint, tmp_path / "data", match_threshold=0.5) as c:
        ready = c.get("/readyz").json()
        assert ready["match_threshold"] == 0.5 and ready["threshold_source"] == "setting" and ready["calibrated"]
        c.post("/gallery", data={"identity": "p0"}, files=files(jpeg(person_crop(0))))
        body = c.post("/query", files=files(jpeg(person_crop(6)))).json()
        assert (body["threshold"], body["threshold_source"], body["decision"]) == (0.5, "setting", "known")
        body = c.post("/query", params={"threshold": 0.999}, files=files(jpeg(person_crop(6)))).json()
        assert (body["threshold"], body["threshold_source"], body["decision"]) == (0.999, "query", "unknown")


def test_enrolling_a_known_person_under_a_new_name_warns_of_a_duplicate(client):
    r = client.post("/gallery", data={"identity": "new-name"}, files=files(jpeg(person_crop(1, 3)), jpeg(person_crop(7, 3))))
    assert r.status_code == 201
    duplicates = r.json()["likely_duplicates"]
    assert [d["identity"] for d in duplicates] == ["person-1"] and duplicates[0]["score"] >= THRESHOLD
    assert client.get("/gallery/new-name").json()["entries"]  # stored anyway: a warning, not a refusal
    client.delete("/gallery/new-name")
    # A stranger is no duplicate, and more crops of the same identity are not a duplicate of itself.
    for view in (3, 4):
        r = client.post("/gallery", data={"identity": "stranger"}, files=files(jpeg(person_crop(6, view))))
        assert r.status_code == 201 and r.json()["likely_duplicates"] == []
    client.delete("/gallery/stranger")


def embed(client, *crops) -> list[dict]:
    r = client.post("/embed", files=files(*[jpeg(c) for c in crops]))
    assert r.status_code == 200
    return r.json()["embeddings"]


def test_tracklet_query_uses_the_mean_of_the_unit_embeddings(client):
    crops = [person_crop(3, v) for v in (5, 6, 7)]
    items = embed(client, *crops)
    mean = np.mean([i["vector"] for i in items], axis=0)
    mean /= np.linalg.norm(mean)
    posted = query(client, *crops, by="entry", k=8)
    got = client.get("/query", params={"embedding_id": [i["embedding_id"] for i in items], "by": "entry", "k": 8}).json()
    assert posted["crops"] == got["crops"] == 3
    assert [m["entry_id"] for m in posted["matches"]] == [m["entry_id"] for m in got["matches"]]
    # Every score is the cosine between the hand-computed mean and that entry's own vector (its
    # stored crop, embedded again).
    for m in got["matches"]:
        stored = client.get(f"/crops/{m['entry_id']}").content
        r = client.post("/embed", files=files(stored))
        assert m["score"] == pytest.approx(float(mean @ np.array(r.json()["embeddings"][0]["vector"])), abs=1e-5)
    assert got["matches"][0]["identity"] == "person-3" and got["decision"] == "known"


def test_tracklet_bad_input_gets_a_named_4xx(client):
    good = embed(client, person_crop(0, 5))[0]["embedding_id"]
    r = client.get("/query", params={"embedding_id": [good, "f" * 32]})
    assert r.status_code == 404 and repr("f" * 32) in r.json()["detail"] and "(1 of 2)" in r.json()["detail"]
    assert good not in r.json()["detail"]
    r = client.get("/query", params={"embedding_id": [good] * 5})
    assert r.status_code == 422 and "5 embedding ids" in r.json()["detail"] and "at most 4" in r.json()["detail"]
    r = client.post("/query", files=files(*[jpeg(person_crop(0, v)) for v in range(5)]))
    assert r.status_code == 422 and "5 images" in r.json()["detail"]
    r = client.post("/query", data={"not": "an image"})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    r = client.get("/query")
    assert r.status_code == 422 and "embedding_id" in r.json()["detail"]
    metrics = client.get("/metrics").text
    assert 'reid_errors_total{kind="too_many_crops"}' in metrics and 'reid_errors_total{kind="unknown_embedding"}' in metrics


def test_rerank_returns_the_shortlist_reordered_with_cosine_scores(client):
    # k covers the whole gallery (fewer entries than the shortlist): the same entries, reordered.
    plain = query(client, person_crop(2, 5), by="entry", k=100)
    reranked = query(client, person_crop(2, 5), by="entry", k=100, rerank="true")
    assert reranked["reranked"] is True and plain["reranked"] is False
    assert {(m["entry_id"], m["score"]) for m in reranked["matches"]} == {(m["entry_id"], m["score"]) for m in plain["matches"]}
    assert reranked["matches"][0]["identity"] == "person-2" and reranked["decision"] == "known"
