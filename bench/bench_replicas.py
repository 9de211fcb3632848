"""Replicas over one PostgreSQL gallery (run by hand, not a test).

1. Propagation lag: a steady enrollment load on both replicas (``--rate`` enrollments/s
   each, one crop each), and probe enrollments on replica A; for each probe, the seconds
   from A's 201 until B's index covers A's log position (B's /readyz ``log_position``,
   polled every millisecond or two). p50 / p99 / max.
2. Throughput with one replica and with two (the load generator spreads its clients
   over the replicas, as a balancer would): /embed (C clients, one crop per request)
   and GET /query (C clients, exact search over ``--gallery`` entries).
3. The store alone: one-entry enrollment transactions per second, from 1 and from 4
   threads (writers take turns on the log head's lock: docs/gallery.md).

    python bench/bench_replicas.py [--checkpoint F] [--clients 8] [--seconds 10] [--gallery 10000]
                                   [--probes 200] [--rate 5]

A throw-away PostgreSQL cluster (tests/pg_support.py) on this machine holds the gallery.
Prints markdown tables. Every replica shares this machine's cores: on a 2-core machine two
replicas cannot be faster than one, and the table says how much the second one costs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_service import fill_store, multipart, process_cpu_seconds  # noqa: E402
from models.checkpoint import read_checkpoint_info  # noqa: E402
from service.embedder import load_embedder  # noqa: E402
from service.postgres_store import PostgresStore  # noqa: E402
from service.store import NewEntry  # noqa: E402
from tests.pg_support import PostgresCluster  # noqa: E402
from tests.service_support import ServiceProcess, jpeg, make_checkpoint, person_crop, seed_onnx_cache  # noqa: E402


def request(conn: http.client.HTTPConnection, method: str, path: str, body=None, content_type=None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
    response = conn.getresponse()
    return response.status, response.read()


def position(conn: http.client.HTTPConnection) -> int:
    return json.loads(request(conn, "GET", "/readyz")[1])["log_position"]


def enrollment(identity: str, person: int) -> tuple[bytes, str]:
    body, content_type = multipart({"image": jpeg(person_crop(person % 8, person))})
    boundary = content_type.split("boundary=")[1]
    field = f'--{boundary}\r\nContent-Disposition: form-data; name="identity"\r\n\r\n{identity}\r\n'.encode()
    return field + body, content_type


def propagation_lag(a: ServiceProcess, b: ServiceProcess, probes: int, rate: float) -> list[float]:
    stop = threading.Event()

    def background(service: ServiceProcess, tag: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
        n = 0
        while not stop.is_set():
            started = time.perf_counter()
            status, _ = request(conn, "POST", "/gallery", *enrollment(f"{tag}-{n}", n))
            assert status == 201, status
            n += 1
            stop.wait(max(0.0, 1 / rate - (time.perf_counter() - started)))

    load = [threading.Thread(target=background, args=(s, s.data_dir.name)) for s in (a, b)]
    for t in load:
        t.start()
    ca = http.client.HTTPConnection("127.0.0.1", a.port, timeout=60)
    cb = http.client.HTTPConnection("127.0.0.1", b.port, timeout=60)
    lags = []
    try:
        for n in range(probes):
            status, _ = request(ca, "POST", "/gallery", *enrollment(f"probe-{n}", n))
            acked = time.perf_counter()
            assert status == 201, status
            target = position(ca)  # A covers its own write when it answers (read-your-writes)
            while position(cb) < target:
                time.sleep(0.001)
            lags.append(time.perf_counter() - acked)
            time.sleep(0.05)
    finally:
        stop.set()
        for t in load:
            t.join()
    return lags


def throughput(services: list[ServiceProcess], clients: int, seconds: float, path_for) -> dict:
    """Clients spread round-robin over the services, back to back; requests/s and server CPU."""
    counts = [0] * clients
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        service = services[i % len(services)]
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
        method, path, body, content_type = path_for(service, conn)
        barrier.wait()
        while not stop.is_set():
            status, _ = request(conn, method, path, body, content_type)
            assert status == 200, status
            counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    time.sleep(1.0)  # warm-up
    cpu0 = sum(process_cpu_seconds(s.proc.pid) for s in services)
    before, t0 = sum(counts), time.perf_counter()
    time.sleep(seconds)
    n, elapsed = sum(counts) - before, time.perf_counter() - t0
    cpu = sum(process_cpu_seconds(s.proc.pid) for s in services) - cpu0
    stop.set()
    for t in threads:
        t.join()
    return {"rate": n / elapsed, "server_ms": cpu / n * 1000}


def store_writes(url: str, dim: int, threads: int, seconds: float) -> float:
    """One-entry add_entries transactions per second from ``threads`` threads, each its own store."""
    vector = np.ones(dim, np.float32) / np.sqrt(dim)
    counts = [0] * threads
    stop = threading.Event()

    def writer(i: int) -> None:
        store = PostgresStore(url)
        while not stop.is_set():
            store.add_entries(f"writer{i}-{counts[i]}", [NewEntry(vector)], "bench")
            counts[i] += 1
        store.close()

    pool = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / seconds


def embed_request(service, conn):
    body, content_type = multipart({"image": jpeg(person_crop(0))})
    return "POST", "/embed", body, content_type


def query_request(service, conn):
    body, content_type = multipart({"image": jpeg(person_crop(1))})
    embedding_id = json.loads(request(conn, "POST", "/embed", body, content_type)[1])["embeddings"][0]["embedding_id"]
    return "GET", f"/query?embedding_id={embedding_id}&k=10", None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="default: an untrained HA-CNN")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--rate", type=float, default=5.0, help="background enrollments/s on each replica")
    parser.add_argument("--parts", default="writes,throughput,lag", help="which measurements, comma-separated")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    tmp = Path(tempfile.mkdtemp(prefix="reid-bench-replicas-"))
    checkpoint = args.checkpoint or make_checkpoint(tmp / "hacnn.safetensors")
    info = read_checkpoint_info(checkpoint)
    load_embedder(checkpoint, device="cpu", backend="onnx", data_dir=tmp / "template")  # the ONNX export, once
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", file=sys.stderr)

    with PostgresCluster() as cluster:
        def replica(name: str, url: str) -> ServiceProcess:
            (tmp / name).mkdir()
            seed_onnx_cache(tmp / "template", tmp / name)
            return ServiceProcess(checkpoint, tmp / name, database_url=url, device="cpu", log_level="warning")

        writes = {n: store_writes(cluster.create_database(), info.embedding_dim, n, args.seconds)
                  for n in (1, 4) if "writes" in parts}
        url = cluster.create_database()
        fill_store(PostgresStore(url), info.fingerprint, info.embedding_dim, args.gallery)
        one, two, lags = {}, {}, []
        a = replica("a", url).start()
        try:
            if "throughput" in parts:
                one = {"embed": throughput([a], args.clients, args.seconds, embed_request),
                       "query": throughput([a], args.clients, args.seconds, query_request)}
            b = replica("b", url).start()
            try:
                if "throughput" in parts:
                    two = {"embed": throughput([a, b], args.clients, args.seconds, embed_request),
                           "query": throughput([a, b], args.clients, args.seconds, query_request)}
                if "lag" in parts:
                    lags = sorted(propagation_lag(a, b, args.probes, args.rate))
            finally:
                b.stop()
        finally:
            a.stop()

    if writes:
        print(f"\n| store writes (PostgreSQL {cluster.version} on this machine, fsync on) | transactions/s |\n|---|---|")
        for n, rate in writes.items():
            print(f"| one-entry enrollments, {n} thread(s) | {rate:.0f} |")
    if lags:
        ms = [lag * 1000 for lag in lags]
        print(f"\n| propagation A -> B, {args.probes} probes, {args.rate:g}+{args.rate:g} enrollments/s background"
              " | p50 | p99 | max |\n|---|---|---|---|")
        print(f"| 201 on A to B's index covering it | {statistics.median(ms):.1f} ms | "
              f"{ms[int(0.99 * (len(ms) - 1))]:.1f} ms | {ms[-1]:.1f} ms |")
    if not one:
        return
    print(f"\n| {args.clients} clients, gallery {args.gallery:,} | one replica | two replicas | two : one |"
          "\n|---|---|---|---|")
    for kind, label in (("embed", "/embed, 1 crop per request (img/s)"), ("query", "GET /query, exact, k=10 (req/s)")):
        print(f"| {label} | {one[kind]['rate']:.0f} | {two[kind]['rate']:.0f} | "
              f"{two[kind]['rate'] / one[kind]['rate']:.2f} |")
        print(f"| {label.split(',')[0]}: server CPU ms per request | {one[kind]['server_ms']:.2f} | "
              f"{two[kind]['server_ms']:.2f} | |")


if __name__ == "__main__":
    main()
