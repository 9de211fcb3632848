"""The service as users run it: a real `python -m service` subprocess on a loopback port.

Ranking, filters, delete, restart on the same data dir, micro-batching under concurrency,
kill -9 in the middle of enrollments, stale-model entries and reembed, import, promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import ImageEnhance, ImageOps

from service.embedder import load_embedder
from service.imaging import decode_image
from service.sqlite_store import SQLiteStore
from service.store import NewEntry
from models.preprocess import resize_pixels
from tests.service_support import (
    ROOT, EnrollmentsUntilKilled, ServiceProcess, files, jpeg, make_checkpoint, person_crop, run_cli, seed_onnx_cache,
)

PEOPLE = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Two checkpoints (two embedding spaces) and an ONNX cache that every data dir starts from."""
    tmp = tmp_path_factory.mktemp("service-process")
    make_checkpoint(tmp / "a.safetensors", seed=0)
    make_checkpoint(tmp / "b.safetensors", seed=1)
    for name in ("a", "b"):
        load_embedder(tmp / f"{name}.safetensors", device="cpu", backend="onnx", data_dir=tmp / "template")
    return tmp


def new_data_dir(workdir: Path, name: str) -> Path:
    data = workdir / name
    data.mkdir()
    seed_onnx_cache(workdir / "template", data)
    return data


@pytest.fixture(scope="module")
def server(workdir):
    """A server with PEOPLE identities (two views each, camera = person % 3)."""
    service = ServiceProcess(workdir / "a.safetensors", new_data_dir(workdir, "main")).start()
    with service.client() as c:
        for person in range(PEOPLE):
            r = c.post("/gallery", data={"identity": f"p{person}", "camera": str(person % 3)},
                       files=files(jpeg(person_crop(person, 0)), jpeg(person_crop(person, 1))))
            assert r.status_code == 201, r.text
    yield service
    service.stop()


def top(client: httpx.Client, image_bytes: bytes, **params) -> list[dict]:
    r = client.post("/query", params=params, files=files(image_bytes))
    assert r.status_code == 200, r.text
    return r.json()["matches"]


PERTURBATIONS = {
    "flip": ImageOps.mirror,
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.25),
    "cropped": lambda im: im.crop((3, 5, 61, 124)),
    "other view": None,
}


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_query_ranks_own_identity_first(server, name):
    with server.client() as c:
        for person in range(PEOPLE):
            image = person_crop(person, 7) if PERTURBATIONS[name] is None else PERTURBATIONS[name](person_crop(person, 0))
            matches = top(c, jpeg(image), k=3)
            assert matches[0]["identity"] == f"p{person}", (name, matches)


def test_enrolled_crop_matches_itself_with_score_one(server):
    with server.client() as c:
        matches = top(c, jpeg(person_crop(3, 0)), k=PEOPLE * 2, by="entry")
        assert matches[0]["identity"] == "p3" and matches[0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert len(matches) == PEOPLE * 2
        by_identity = top(c, jpeg(person_crop(3, 0)), k=PEOPLE * 2)
        assert [m["identity"] for m in by_identity][0] == "p3" and len(by_identity) == PEOPLE
        # GET /query with an /embed id gives the same ranking as POST /query.
        embedded = c.post("/embed", files=files(jpeg(person_crop(3, 0)))).json()
        r = c.get("/query", params={"embedding_id": embedded["embeddings"][0]["embedding_id"], "k": PEOPLE})
        assert [m["entry_id"] for m in r.json()["matches"]] == [m["entry_id"] for m in by_identity]


def test_camera_filters(server):
    with server.client() as c:
        only = top(c, jpeg(person_crop(4, 0)), k=20, by="entry", camera=1)  # p1 and p4 are on camera 1
        assert {m["identity"] for m in only} == {"p1", "p4"} and len(only) == 4
        excluded = top(c, jpeg(person_crop(4, 0)), k=20, exclude_camera=1)
        assert {m["identity"] for m in excluded} == {"p0", "p2", "p3", "p5"}


def test_concurrent_embeds_share_forward_passes(server):
    def batch_counts() -> tuple[float, float]:
        text = httpx.get(f"{server.url}/metrics").text
        count = float(re.search(r"^reid_batch_size_count (\S+)$", text, re.M).group(1))
        total = float(re.search(r"^reid_batch_size_sum (\S+)$", text, re.M).group(1))
        return count, total

    body = jpeg(person_crop(0, 4))
    count0, total0 = batch_counts()
    start = threading.Barrier(16)
    statuses = []

    def client():
        with server.client() as c:
            start.wait()
            for _ in range(3):
                statuses.append(c.post("/embed", files=files(body)).status_code)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    count, total = batch_counts()
    assert statuses == [200] * 48
    assert total - total0 == 48
    assert count - count0 < 48  # fewer forward passes than images: some batch held more than one


def test_metrics_pass_promtool(server):
    with server.client() as c:
        c.get("/gallery/nobody")
        text = c.get("/metrics").text
    for name in ("reid_request_duration_seconds", "reid_stage_duration_seconds", "reid_batch_size",
                 "reid_gallery_entries", "reid_gallery_identities", "reid_errors_total", "reid_model_info"):
        assert name in text
    for stage in ("decode", "preprocess", "queue_wait", "inference", "search"):
        assert f'reid_stage_duration_seconds_count{{stage="{stage}"}}' in text
    assert re.search(r'reid_request_duration_seconds_count\{method="GET",route="/gallery/\{identity\}",status="404"\}', text)
    result = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=text,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_delete_then_restart_keeps_the_gallery(server, workdir):
    with server.client() as c:
        assert c.post("/gallery", data={"identity": "gone"}, files=files(jpeg(person_crop(7, 0)))).status_code == 201
        assert c.delete("/gallery/gone").status_code == 204
        before = c.get("/gallery").json()
        ranking = top(c, jpeg(person_crop(2, 5)), k=PEOPLE)
    server.stop()
    with ServiceProcess(server.checkpoint, server.data_dir) as again, again.client() as c:
        assert c.get("/gallery").json() == before
        assert c.get("/readyz").json()["gallery_size"] == PEOPLE * 2
        assert top(c, jpeg(person_crop(2, 5)), k=PEOPLE) == ranking
        assert c.get("/gallery/gone").status_code == 404
    server.start()  # leave the module's server running for any later test


def test_kill_9_loses_nothing_acknowledged(workdir):
    data = new_data_dir(workdir, "crash")
    service = ServiceProcess(workdir / "a.safetensors", data).start()
    crash = EnrollmentsUntilKilled(service, camera="1")
    crash.run()

    store = SQLiteStore(data / "gallery.sqlite3")
    stored = dict(store.list_identities(0, 100_000))
    store.close()
    crash.check(stored)
    with ServiceProcess(workdir / "a.safetensors", data) as again, again.client() as c:
        assert c.get("/readyz").json()["gallery_size"] == sum(stored.values())


def test_stale_model_entries_are_excluded_until_reembedded(workdir):
    """Entries written under model A, served with model B: kept out, then fixed by reembed."""
    data = new_data_dir(workdir, "stale")
    old = load_embedder(workdir / "a.safetensors", device="cpu", backend="onnx", data_dir=data)
    store = SQLiteStore(data / "gallery.sqlite3")
    for person in range(4):
        crops = [jpeg(person_crop(person, v)) for v in range(2)]
        images = [decode_image(c, filename="x", input_size=old.info.input_size, max_pixels=10**6).image for c in crops]
        vectors = old.embed(np.stack([resize_pixels(im, old.info.input_size) for im in images]))
        store.add_entries(f"p{person}", [NewEntry(v, 0, c) for v, c in zip(vectors, crops)], old.info.fingerprint)
    store.add_entries("no-crop", [NewEntry(vectors[0], 0, None)], old.info.fingerprint)
    store.close()

    new = workdir / "b.safetensors"
    with ServiceProcess(new, data) as service, service.client() as c:
        ready = c.get("/readyz").json()
        assert ready["stale_entries"] == 9 and ready["gallery_size"] == 0
        assert c.get("/gallery").json()["stale_entries"] == 9
        assert top(c, jpeg(person_crop(1, 0))) == []  # never mixed into results

    env = {"REID_DATA_DIR": str(data), "REID_CHECKPOINT": str(new)}
    result = run_cli("reembed", env=env)
    assert result.returncode == 2, result.stderr  # one entry could not be re-embedded
    assert "re-embedded 8 entries" in result.stdout
    assert "1 entries have no usable stored crop" in result.stderr

    with ServiceProcess(new, data) as service, service.client() as c:
        ready = c.get("/readyz").json()
        assert ready["stale_entries"] == 1 and ready["gallery_size"] == 8
        for person in range(4):
            assert top(c, jpeg(ImageOps.mirror(person_crop(person, 0))), k=1)[0]["identity"] == f"p{person}"


def test_import_enrols_a_market1501_folder(workdir):
    folder = workdir / "market" / "bounding_box_test"
    folder.mkdir(parents=True)
    for person in (1, 2, 3):
        for cam in (1, 2):
            person_crop(person, cam).save(folder / f"{person:04d}_c{cam}s1_000{cam}01_00.jpg")
    person_crop(4).save(folder / "0000_c1s1_000001_00.jpg")  # distractor
    person_crop(5).save(folder / "-1_c3s1_000001_00.jpg")  # junk
    (folder / "readme.txt").write_text("not an image")
    data = new_data_dir(workdir, "imported")
    env = {"REID_DATA_DIR": str(data), "REID_CHECKPOINT": str(workdir / "a.safetensors")}

    result = run_cli("import", str(folder), "--max-identities", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "importing" in result.stderr  # not a terminal: lines, no redraws
    store = SQLiteStore(data / "gallery.sqlite3")
    assert dict(store.list_identities(0, 100)) == {"0001": 2, "0002": 2}
    assert sorted(e.camera for e in store.identity_entries("0002")) == [1, 2]
    store.close()

    again = run_cli("import", str(folder), "--if-empty", env=env)
    assert again.returncode == 0 and "nothing imported" in again.stdout

    missing = run_cli("import", str(workdir / "nowhere"), env=env)
    assert missing.returncode != 0 and missing.stderr.strip().count("\n") == 0 and "no such folder" in missing.stderr


@pytest.mark.parametrize("content", [None, b"not a checkpoint at all"])
def test_bad_checkpoint_stops_startup_with_one_line(workdir, content):
    path = workdir / f"bad-{content is None}.safetensors"
    if content is not None:
        path.write_bytes(content)
    result = run_cli("--checkpoint", str(path), "--data-dir", str(workdir / "unused"), "--port", "0", timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]


def wait_for_top(client: httpx.Client, image_bytes: bytes, identity: str, timeout: float = 5.0) -> float:
    """Seconds until a query's best match is ``identity`` (fails after ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        matches = top(client, image_bytes, k=1)
        if matches and matches[0]["identity"] == identity:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{identity} not searchable after {timeout} s")


def test_imports_by_another_process_become_searchable_without_restart(server, workdir):
    env = {"REID_DATA_DIR": str(server.data_dir), "REID_CHECKPOINT": str(server.checkpoint)}
    folder = workdir / "late-market" / "bounding_box_test"
    folder.mkdir(parents=True)
    for cam in (1, 2):
        person_crop(6, cam).save(folder / f"0042_c{cam}s1_000{cam}01_00.jpg")
    with server.client() as c:
        result = run_cli("import", str(folder), env=env)
        assert result.returncode == 0, result.stderr
        assert wait_for_top(c, jpeg(person_crop(6, 3)), "0042") < 2.0

        # Embeddings made elsewhere (a GPU batch job) with the serving model.
        embedder = load_embedder(server.checkpoint, device="cpu", backend="onnx", data_dir=server.data_dir)
        crops = [resize_pixels(person_crop(7, v), embedder.info.input_size) for v in range(3)]
        vectors = embedder.embed(np.stack(crops)) * 3.0  # not unit length: the import normalises
        npz = workdir / "late.npz"
        np.savez(npz, identity=np.array(["batch-job"] * 3), vector=vectors, camera=np.array([4, -1, 4]))
        result = run_cli("import-vectors", str(npz), env=env)
        assert result.returncode == 0, result.stderr
        assert "imported 3 vectors for 1 identities" in result.stdout
        assert wait_for_top(c, jpeg(person_crop(7, 5)), "batch-job") < 2.0
        entries = c.get("/gallery/batch-job").json()["entries"]
        assert [e["camera"] for e in entries] == [4, None, 4] and not any(e["has_crop"] for e in entries)
        assert c.delete("/gallery/batch-job").status_code == 204
        assert c.delete("/gallery/0042").status_code == 204


def test_import_vectors_refuses_a_bad_file_with_one_line_and_writes_nothing(workdir):
    data = new_data_dir(workdir, "bad-vectors")
    env = {"REID_DATA_DIR": str(data), "REID_CHECKPOINT": str(workdir / "a.safetensors")}
    npz = workdir / "wrong-dim.npz"
    np.savez(npz, identity=np.array(["x", "y"]), vector=np.ones((2, 7), np.float32))
    result = run_cli("import-vectors", str(npz), env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "N x 1024" in line
    assert not (data / "gallery.sqlite3").exists()


def test_clean_shutdown_leaves_a_snapshot_that_the_next_start_uses(workdir):
    data = new_data_dir(workdir, "snapshot")
    with ServiceProcess(workdir / "a.safetensors", data) as service, service.client() as c:
        for person in range(3):
            assert c.post("/gallery", data={"identity": f"s{person}"},
                          files=files(jpeg(person_crop(person, 0)))).status_code == 201
        position = c.get("/readyz").json()["log_position"]
    manifest = json.loads((data / "index" / "manifest.json").read_text())
    assert manifest["position"] == position == 3 and manifest["entries"] == 3
    with ServiceProcess(workdir / "a.safetensors", data, log_level="info") as service, service.client() as c:
        assert c.get("/readyz").json()["gallery_size"] == 3
        assert top(c, jpeg(person_crop(1, 4)), k=1)[0]["identity"] == "s1"
    assert "from the snapshot, 0 newer changes applied" in service.log()


def test_calibrated_checkpoint_answers_known_and_unknown(workdir):
    """`python -m training calibrate` on held-out crops, then the service decides with its threshold.

    The checkpoint is the untrained HA-CNN of this module (carefully chosen crops rather than a
    trained model, to stay fast and deterministic): on the palette-distinct synthetic persons 0-7
    it scores the same person >= 0.99 and different people <= 0.98 (views 0-9, both backends), so a
    threshold fitted on views 0-5 separates a new view of an enrolled person from a stranger."""
    market = workdir / "calibration-set"
    for split, views in (("query", (0, 1, 2)), ("bounding_box_test", (3, 4, 5))):
        (market / split).mkdir(parents=True)
        for person in range(8):
            for view in views:
                person_crop(person, view).save(market / split / f"{person + 1:04d}_c{view % 3 + 1}s1_{view:06d}_00.jpg")
    calibrated = workdir / "a-calibrated.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "training", "calibrate", "--checkpoint", str(workdir / "a.safetensors"),
         "--data", str(market), "--out", str(calibrated), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    threshold = json.loads(result.stdout.strip().splitlines()[-1])["threshold"]

    with ServiceProcess(calibrated, new_data_dir(workdir, "calibrated")) as service, service.client() as c:
        ready = c.get("/readyz").json()
        assert ready["calibrated"] and ready["match_threshold"] == threshold and ready["threshold_source"] == "checkpoint"
        for person in range(4):
            r = c.post("/gallery", data={"identity": f"p{person}", "camera": "1"},
                       files=files(jpeg(person_crop(person, 0)), jpeg(person_crop(person, 1))))
            assert r.status_code == 201 and r.json()["likely_duplicates"] == [], r.text
        for person in range(8):
            body = c.post("/query", files=files(jpeg(person_crop(person, 9)))).json()
            assert body["threshold"] == threshold
            if person < 4:  # enrolled: another crop of them is recognised
                assert body["decision"] == "known" and body["matches"][0]["identity"] == f"p{person}", body
            else:  # never enrolled
                assert body["decision"] == "unknown" and not any(m["match"] for m in body["matches"]), body
