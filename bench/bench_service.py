"""End-to-end service benchmark (run by hand, not a test).

1. /embed throughput with C concurrent clients sending single crops, against the raw model
   throughput measured in the same run: the best of one pass on all cores and one
   single-threaded pass per core (on CUDA: one pass), at batch 1, 8 and the max batch size;
   the reference is the best at a batch the C clients can fill (<= C). The ratio says how
   much of the model's speed survives HTTP, decoding and micro-batching. CPU time per image
   (server and load generator) says what the rest costs: on a CPU-only machine it comes out
   of the same cores as the model, which caps the ratio at model / (model + rest).
2. /query latency (p50/p95) at gallery sizes 1k/10k/100k, the store filled directly with
   random normalised vectors.

    python bench/bench_service.py [--checkpoint F] [--device cpu|cuda] [--clients 8] [--seconds 15]
                                  [--sizes 1000,10000,100000]

Prints a markdown table. Absolute numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.embedder import load_embedder  # noqa: E402
from service.sqlite_store import SQLiteStore  # noqa: E402
from service.store import GalleryStore, NewEntry  # noqa: E402
from tests.service_support import ServiceProcess, jpeg, make_checkpoint, person_crop  # noqa: E402


def multipart(fields: dict[str, bytes], filename: str = "crop.jpg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def raw_throughput(checkpoint: Path, data_dir: Path, backend: str, batch: int, seconds: float,
                   workers: int, threads: int, device: str = "cpu") -> tuple[float, float]:
    """(images/s, CPU ms per image) with `workers` threads each running `threads`-thread passes."""
    embedder = load_embedder(checkpoint, device=device, backend=backend, data_dir=data_dir,
                             workers=workers, threads=threads)
    h, w = embedder.info.input_size
    # uint8 pixels, as the batcher hands them over: normalisation is part of the measured pass.
    images = np.random.default_rng(0).integers(0, 256, size=(batch, h, w, 3), dtype=np.uint8)
    embedder.embed(images)  # warm-up
    counts = [0] * workers
    stop = threading.Event()

    def work(i: int) -> None:
        while not stop.is_set():
            embedder.embed(images)
            counts[i] += batch

    pool = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    cpu0, start = time.process_time(), time.perf_counter()
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    done, elapsed = sum(counts), time.perf_counter() - start
    return done / elapsed, (time.process_time() - cpu0) / done * 1000


def raw_grid(checkpoint: Path, data_dir: Path, backend: str, max_batch: int, seconds: float, device: str) -> dict:
    """Throughput of every (passes at once, threads each, batch) layout worth trying on this machine."""
    cores = os.cpu_count() or 1
    if device == "cuda":
        layouts = [(1, 1)]  # as the service runs it: one pass at a time on the GPU
    else:
        layouts = [(1, cores)] + ([(cores, 1)] if backend == "onnx" and cores > 1 else [])
    return {
        (workers, threads, batch): raw_throughput(checkpoint, data_dir, backend, batch, seconds, workers, threads, device)
        for workers, threads in layouts for batch in sorted({1, 8, max_batch})
    }


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def embed_throughput(port: int, clients: int, seconds: float, server_pid: int | None = None) -> dict:
    """Each client: its own keep-alive connection, one crop per request, back to back.

    Returns images/s, latencies, and CPU ms per image of the server and of this load generator."""
    body, content_type = multipart({"image": jpeg(person_crop(0))})
    counts = [0] * clients
    latencies: list[float] = []
    stop = threading.Event()
    start_barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start_barrier.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            conn.request("POST", "/embed", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            latencies.append(time.perf_counter() - t0)
            counts[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start_barrier.wait()
    time.sleep(1.0)  # warm-up
    server0 = process_cpu_seconds(server_pid) if server_pid else 0.0
    before, t0, client0 = sum(counts), time.perf_counter(), time.process_time()
    time.sleep(seconds)
    n, elapsed, client_cpu = sum(counts) - before, time.perf_counter() - t0, time.process_time() - client0
    server_cpu = process_cpu_seconds(server_pid) - server0 if server_pid else float("nan")
    stop.set()
    for t in threads:
        t.join()
    return {"rate": n / elapsed, "latencies": latencies,
            "server_ms": server_cpu / n * 1000, "client_ms": client_cpu / n * 1000}


def fill_store(store: GalleryStore, fingerprint: str, dim: int, size: int, per_identity: int = 10) -> None:
    """``size`` random unit vectors, ``per_identity`` per identity, cameras 0-5; closes the store."""
    rng = np.random.default_rng(size)
    for chunk in range(0, size, 10_000):
        groups = []
        for first in range(chunk, min(size, chunk + 10_000), per_identity):
            vectors = rng.normal(size=(per_identity, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            groups.append((f"id{first // per_identity}", [NewEntry(v, first % 6) for v in vectors]))
        store.add_groups(groups, fingerprint)
    store.close()


def query_latency(port: int, n: int, k: int = 10) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body, content_type = multipart({"image": jpeg(person_crop(1))})
    conn.request("POST", "/embed", body=body, headers={"Content-Type": content_type})
    import json

    embedding_id = json.loads(conn.getresponse().read())["embeddings"][0]["embedding_id"]
    results = {}
    for label, path in (("get", f"/query?embedding_id={embedding_id}&k={k}"),
                        ("get_filtered", f"/query?embedding_id={embedding_id}&k={k}&exclude_camera=0")):
        times = []
        for i in range(n + 5):
            t0 = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            if i >= 5:
                times.append(time.perf_counter() - t0)
        times.sort()
        results[f"{label}_p50"] = statistics.median(times) * 1000
        results[f"{label}_p95"] = times[int(0.95 * (len(times) - 1))] * 1000
    times = []
    for i in range(n // 2 + 3):
        t0 = time.perf_counter()
        conn.request("POST", f"/query?k={k}", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    times.sort()
    results["post_p50"] = statistics.median(times) * 1000
    results["post_p95"] = times[int(0.95 * (len(times) - 1))] * 1000
    conn.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="default: an untrained HA-CNN")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx", "openvino", "torch"],
                        help="auto: onnx on cpu, torch (fp16) on cuda, as the service picks")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--index", default="auto", choices=["auto", "flat", "hnsw", "ivf"],
                        help="index kinds and recall: bench/bench_gallery.py")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="reid-bench-"))
    checkpoint = args.checkpoint or make_checkpoint(tmp / "hacnn.safetensors")
    from service.embedder import load_embedder

    # The backend auto picks here (its check measured once, cached in the probe's data dir).
    args.backend = load_embedder(checkpoint, device=args.device, backend=args.backend, data_dir=tmp / "probe").backend
    settings = dict(device=args.device, backend=args.backend, max_batch_size=args.max_batch_size, max_batch_wait_ms=args.max_batch_wait_ms,
                    log_level="warning", index=args.index)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
          file=sys.stderr)

    if not args.skip_throughput:
        data = tmp / "throughput"
        cores = os.cpu_count() or 1
        grid = raw_grid(checkpoint, data, args.backend, args.max_batch_size, args.seconds / 3, args.device)
        # C clients sending one crop each can fill a batch of at most C: the reference is the best
        # layout at such a batch (on a GPU, batch 32 would be out of any single-crop load's reach).
        reachable = [layout for layout in grid if layout[2] <= args.clients]
        best = max(reachable, key=lambda layout: grid[layout][0])
        with ServiceProcess(checkpoint, data, **settings) as service:
            e2e = embed_throughput(service.port, args.clients, args.seconds, service.proc.pid)
            import httpx

            metrics = httpx.get(f"{service.url}/metrics").text
        # The best layout again after the HTTP run: the mean evens out drift in machine load.
        again = raw_throughput(checkpoint, data, args.backend, best[2], args.seconds / 3, best[0], best[1],
                               args.device)
        raw, raw_ms = (grid[best][0] + again[0]) / 2, (grid[best][1] + again[1]) / 2
        count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("reid_batch_size_count")))
        total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("reid_batch_size_sum")))
        latencies = sorted(e2e["latencies"])
        where = f"{args.backend}, {args.device}, {cores} cores"
        print(f"\n| raw model ({where}): passes at once x threads each | batch | img/s |"
              "\n|---|---|---|")
        for (workers, threads, batch), (rate, _) in grid.items():
            print(f"| {workers} x {threads} | {batch} | {rate:.0f} |")
        rest_ms = e2e["server_ms"] + e2e["client_ms"] - raw_ms
        print(f"\n| measure ({where}) | value |\n|---|---|")
        print(f"| raw model, best layout at batch <= {args.clients} ({best[0]} x {best[1]}, batch {best[2]}) | {raw:.0f} img/s |")
        print(f"| /embed, {args.clients} clients x 1 crop | {e2e['rate']:.0f} img/s |")
        print(f"| ratio /embed : raw | {e2e['rate'] / raw:.0%} |")
        print(f"| mean batch size served | {total / count:.1f} |")
        print(f"| /embed latency p50 / p95 | {statistics.median(latencies) * 1000:.1f} / "
              f"{latencies[int(0.95 * (len(latencies) - 1))] * 1000:.1f} ms |")
        print(f"| CPU per image: raw model | {raw_ms:.2f} ms |")
        print(f"| CPU per image: service / load generator | {e2e['server_ms']:.2f} / {e2e['client_ms']:.2f} ms |")
        print(f"| CPU per image beyond the model (HTTP, decode, batching, client) | {rest_ms:.2f} ms |")
        print(f"| ceiling on {cores} shared cores, model / (model + rest) | {raw_ms / (raw_ms + rest_ms):.0%} |")

    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        from models.checkpoint import read_checkpoint_info

        info = read_checkpoint_info(checkpoint)
        print(f"\n| gallery size ({args.index}) | GET /query p50 | p95 | GET, exclude_camera p50 | p95 |"
              " POST /query (embed + search) p50 | p95 |\n|---|---|---|---|---|---|---|")
        for size in sizes:
            data = tmp / f"gallery-{size}"
            data.mkdir()
            if (tmp / "throughput" / "onnx").is_dir():
                import shutil

                shutil.copytree(tmp / "throughput" / "onnx", data / "onnx")
            fill_store(SQLiteStore(data / "gallery.sqlite3"), info.fingerprint, info.embedding_dim, size,
                       per_identity=max(10, size // 1000))
            with ServiceProcess(checkpoint, data, **settings) as service:
                r = query_latency(service.port, args.queries)
            print(f"| {size:,} | {r['get_p50']:.1f} ms | {r['get_p95']:.1f} ms | {r['get_filtered_p50']:.1f} ms |"
                  f" {r['get_filtered_p95']:.1f} ms | {r['post_p50']:.1f} ms | {r['post_p95']:.1f} ms |")


if __name__ == "__main__":
    main()
