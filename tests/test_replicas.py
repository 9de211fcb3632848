"""Several replicas over one PostgreSQL gallery, as users run them: real `python -m service`
processes, each with its own data dir (index and snapshot), on one throw-away database.

A write on one replica is searchable there when it returns and on the others within a
second; a CLI import reaches all; a replica killed mid-enrollment leaves only whole
identities; the database going away and coming back: writes 503, queries go on and say
they may be stale, and every replica recovers without a restart.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.embedder import load_embedder
from service.postgres_store import PostgresStore
from tests.pg_support import PostgresCluster
from tests.service_support import EnrollmentsUntilKilled, ServiceProcess, files, jpeg, make_checkpoint, person_crop, run_cli, seed_onnx_cache

VISIBLE_WITHIN_S = 1.0  # the promise for a write made on another replica


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("replicas")
    make_checkpoint(tmp / "model.safetensors", seed=0)
    load_embedder(tmp / "model.safetensors", device="cpu", backend="onnx", data_dir=tmp / "template")
    return tmp


def replica(workdir: Path, name: str, database_url: str, **settings) -> ServiceProcess:
    data = workdir / name
    data.mkdir()
    seed_onnx_cache(workdir / "template", data)
    return ServiceProcess(workdir / "model.safetensors", data, database_url=database_url, **settings)


@pytest.fixture(scope="module")
def pair(workdir, postgres):
    url = postgres.create_database()
    a = replica(workdir, "a", url).launch()
    b = replica(workdir, "b", url).launch()
    try:
        a.wait_ready(), b.wait_ready()
        yield a, b, url
    finally:
        a.stop()
        b.stop()


def enroll(client: httpx.Client, identity: str, person: int, views: int = 2) -> httpx.Response:
    return client.post("/gallery", data={"identity": identity},
                       files=files(*[jpeg(person_crop(person, v)) for v in range(views)]))


def embedding_id(client: httpx.Client, person: int, view: int = 9) -> str:
    r = client.post("/embed", files=files(jpeg(person_crop(person, view))))
    assert r.status_code == 200, r.text
    return r.json()["embeddings"][0]["embedding_id"]


def best(client: httpx.Client, embedding: str) -> str | None:
    r = client.get("/query", params={"embedding_id": embedding, "k": 1})
    assert r.status_code == 200, r.text
    matches = r.json()["matches"]
    return matches[0]["identity"] if matches else None


def seconds_until(condition, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not true after {timeout} s"
        time.sleep(0.01)
    return time.monotonic() - started


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not exported"
    return float(found.group(1))


def test_enroll_on_one_replica_is_searchable_on_the_other_and_a_delete_there_reaches_back(pair):
    a, b, _ = pair
    with a.client() as ca, b.client() as cb:
        probe_a, probe_b = embedding_id(ca, 3), embedding_id(cb, 3)  # GET /query: a pure index search
        r = enroll(ca, "alice", 3)
        assert r.status_code == 201, r.text
        assert best(ca, probe_a) == "alice"  # read-your-writes on the replica that took it
        assert seconds_until(lambda: best(cb, probe_b) == "alice", 10) < VISIBLE_WITHIN_S
        assert len(cb.get("/gallery/alice").json()["entries"]) == 2

        assert cb.delete("/gallery/alice").status_code == 204
        assert ca.get("/gallery/alice").status_code == 404  # the store is shared: at once
        assert seconds_until(lambda: best(ca, probe_a) != "alice", 10) < VISIBLE_WITHIN_S
        ready_a, ready_b = ca.get("/readyz").json(), cb.get("/readyz").json()
        assert ready_a["log_position"] == ready_b["log_position"] == 4
        assert ready_a["gallery_store"] == ready_b["gallery_store"] == a.env["REID_DATABASE_URL"]
        assert ready_a["gallery_stale"] is False


def test_an_import_run_against_the_database_reaches_every_replica(pair, workdir):
    a, b, url = pair
    folder = workdir / "market" / "bounding_box_test"
    folder.mkdir(parents=True)
    for cam in (1, 2):
        person_crop(5, cam).save(folder / f"0042_c{cam}s1_000{cam}01_00.jpg")
    seed_onnx_cache(workdir / "template", workdir / "cli-data")
    result = run_cli("import", str(folder), "--database-url", url,
                     env={"REID_CHECKPOINT": str(workdir / "model.safetensors"), "REID_DATA_DIR": str(workdir / "cli-data")})
    assert result.returncode == 0, result.stderr
    for service in (a, b):
        with service.client() as c:
            probe = embedding_id(c, 5)
            seconds_until(lambda: best(c, probe) == "0042", VISIBLE_WITHIN_S)
    with b.client() as c:
        assert c.delete("/gallery/0042").status_code == 204


def test_kill_9_of_a_replica_mid_enrollment_leaves_whole_identities_on_the_other(workdir, postgres):
    url = postgres.create_database()
    victim = replica(workdir, "victim", url).launch()
    survivor = replica(workdir, "survivor", url).launch()
    crash = EnrollmentsUntilKilled(victim)
    try:
        victim.wait_ready(), survivor.wait_ready()
        crash.run()

        store = PostgresStore(url)
        stored = dict(store.list_identities(0, 100_000))
        head = store.head()
        store.close()
        crash.check(stored)
        with survivor.client() as c:
            seconds_until(lambda: c.get("/readyz").json()["log_position"] == head, 5)
            assert c.get("/readyz").json()["gallery_size"] == sum(stored.values())
            page = c.get("/gallery", params={"limit": 1000}).json()
            assert {i["identity"]: i["entries"] for i in page["identities"]} == stored
    finally:
        victim.stop()
        survivor.stop()


def test_database_down_at_start_and_under_load_then_back_every_replica_recovers(workdir):
    cluster = PostgresCluster().start()
    url = cluster.create_database()
    cluster.stop()
    a = replica(workdir, "outage-a", url, database_timeout_s=1)
    b = replica(workdir, "outage-b", url, database_timeout_s=1)
    try:
        a.launch()
        # Down at start: the process runs, is not ready, and says why.
        seconds_until(lambda: _answers(a, "/healthz"), 60)
        seconds_until(lambda: "waiting for the gallery store" in (_readyz(a) or ""), 60)
        r = httpx.get(f"{a.url}/readyz", timeout=5)
        assert r.status_code == 503 and "refused" in r.json()["detail"].lower()
        cluster.start()
        a.wait_ready()  # without a restart
        b.start()
        _outage_under_load(cluster, a, b)
    finally:
        a.stop()
        b.stop()
        cluster.remove()


def _answers(service: ServiceProcess, path: str) -> bool:
    try:
        return httpx.get(f"{service.url}{path}", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _readyz(service: ServiceProcess) -> str | None:
    try:
        return httpx.get(f"{service.url}/readyz", timeout=2).json().get("detail")
    except httpx.TransportError:
        return None


def _outage_under_load(cluster: PostgresCluster, a: ServiceProcess, b: ServiceProcess) -> None:
    outcomes: dict[str, int] = {}  # identity -> status of its enrollment
    details: list[str] = []
    stop = threading.Event()

    def writer(service: ServiceProcess, tag: str) -> None:
        with service.client(timeout=30) as c:
            n = 0
            while not stop.is_set():
                identity = f"{tag}-{n}"
                r = enroll(c, identity, n % 3)  # persons 0-2: the probes below use others
                outcomes[identity] = r.status_code
                if r.status_code == 503:
                    details.append(r.json()["detail"])
                n += 1
                time.sleep(0.05)

    with a.client() as ca, b.client() as cb:
        probe_b = embedding_id(cb, 4)
        assert enroll(ca, "known", 4).status_code == 201
        seconds_until(lambda: best(cb, probe_b) == "known", VISIBLE_WITHIN_S)
        writers = [threading.Thread(target=writer, args=(s, s.data_dir.name)) for s in (a, b)]
        for w in writers:
            w.start()
        try:
            time.sleep(0.5)
            cluster.stop()
            # Queries go on from the local index and, after a while, say it may be stale.
            seconds_until(lambda: cb.get("/query", params={"embedding_id": probe_b}).json()["gallery_stale"], 15)
            answer = cb.get("/query", params={"embedding_id": probe_b, "k": 1}).json()
            assert answer["matches"][0]["identity"] == "known" and answer["gallery_sync_age_s"] > 1
            assert metric(b.url, "reid_gallery_stale") == 1 and metric(b.url, "reid_gallery_follow_errors_total") > 0
            seconds_until(lambda: len(details) >= 2, 15)  # writes meanwhile: 503 at once, saying why
            assert all("gallery store unavailable" in d for d in details), details
            assert cb.delete("/gallery/known").status_code == 503
            cluster.start()
            seconds_until(lambda: sum(1 for s in list(outcomes.values())[-4:] if s == 201) >= 4, 30)
        finally:
            stop.set()
            for w in writers:
                w.join()
        # Both recovered without a restart: writes on one are searchable on the other again.
        assert enroll(ca, "after", 6).status_code == 201
        probe_after = embedding_id(cb, 6)
        seconds_until(lambda: best(cb, probe_after) == "after", VISIBLE_WITHIN_S * 2)
        for service, client in ((a, ca), (b, cb)):
            probe = embedding_id(client, 4)
            seconds_until(lambda: not client.get("/query", params={"embedding_id": probe}).json()["gallery_stale"], 10)
            assert metric(service.url, "reid_gallery_stale") == 0
            assert metric(service.url, "reid_gallery_store_reconnects_total") >= 1
            assert metric(service.url, "reid_gallery_log_head") == client.get("/readyz").json()["log_position"]
        text = httpx.get(f"{b.url}/metrics", timeout=10).text
        result = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=text,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

    store = PostgresStore(a.env["REID_DATABASE_URL"])
    stored = dict(store.list_identities(0, 100_000))
    store.close()
    acked = {i for i, status in outcomes.items() if status == 201}
    refused = {i for i, status in outcomes.items() if status == 503}
    assert refused and acked
    assert all(stored.get(i) == 2 for i in acked), "an acknowledged enrollment is missing or partial"
    assert not refused & set(stored), "a refused enrollment was written"
    assert set(outcomes.values()) <= {201, 503}
