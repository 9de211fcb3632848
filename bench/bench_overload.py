"""Overload benchmark (run by hand, not a test): what the service does at 1x, 2x, 4x and 8x its capacity.

1. Capacity: C closed-loop clients (keep-alive, one 128x64 JPEG crop per POST /embed, back
   to back) for a while: completed requests per second.
2. Each level: an open-loop load generator sends POST /embed at k x capacity, Poisson
   arrivals from a fixed seed, whatever the answers (a client that backs off would hide
   overload). Latency counts from the scheduled send time, so a slow client cannot hide a
   slow server. Reported: goodput (200s per second, and as a share of capacity), accepted
   (200) p50/p99, shed (503) p99, 504s, other answers, the server's resident memory before
   and after the level and its peak.

The load generator is a separate process (asyncio on uvloop, raw HTTP/1.1 over a pool of
keep-alive connections, request bytes built once) so that its CPU shows up apart from the
server's; on a 2-core machine it still shares the cores with the service.

    python bench/bench_overload.py [--checkpoint F] [--levels 1,2,4,8] [--seconds 20] [--clients 8]
                                   [--env REID_X=Y ...]

Prints a markdown table. Absolute numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.service_support import ServiceProcess, jpeg, make_checkpoint, metric_value, person_crop  # noqa: E402

MAX_CONNECTIONS = 2000


# -- the load generator (its own process) ---------------------------------------------------


def embed_request(port: int) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="crop.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg(person_crop(0)) + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server closes the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers.get("connection", "").lower() == "close"


class Pool:
    def __init__(self, port: int):
        self.port, self.idle, self.open = port, deque(), 0

    async def request(self, payload: bytes, reuse: bool = True) -> int:
        """The answer's status; 0 when the connection failed (a reused one is retried once, on a
        new connection, as HTTP clients do: the server may have closed it while it was idle)."""
        reused = reuse and bool(self.idle)
        if reused:
            reader, writer = self.idle.pop()
        else:
            self.open += 1
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(payload)
            status, close = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            self.open -= 1
            return await self.request(payload, reuse=False) if reused else 0
        if close:
            writer.close()
            self.open -= 1
        else:
            self.idle.append((reader, writer))
        return status


async def open_loop(port: int, rate: float, seconds: float, seed: int) -> list[tuple[float, int, float]]:
    """(scheduled time, status, latency) of every request sent at ``rate`` per second."""
    pool, payload, results = Pool(port), embed_request(port), []
    rng, loop = random.Random(seed), asyncio.get_running_loop()
    in_flight: set[asyncio.Task] = set()

    async def one(scheduled: float) -> None:
        status = await pool.request(payload) if pool.open < MAX_CONNECTIONS or pool.idle else -1
        results.append((scheduled, status, loop.time() - scheduled))

    start = loop.time()
    scheduled = start
    while scheduled - start < seconds:
        scheduled += rng.expovariate(rate)
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    return [(s - start, status, latency) for s, status, latency in results]


async def closed_loop(port: int, clients: int, seconds: float) -> list[tuple[float, int, float]]:
    payload, results = embed_request(port), []
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def client() -> None:
        pool = Pool(port)
        while loop.time() - start < seconds:
            sent = loop.time()
            status = await pool.request(payload)
            results.append((sent - start, status, loop.time() - sent))

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def client_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    cpu0 = time.process_time()
    if args.rate:
        results = asyncio.run(open_loop(args.port, args.rate, args.seconds, args.seed))
    else:
        results = asyncio.run(closed_loop(args.port, args.clients, args.seconds))
    json.dump({"results": results, "cpu_s": time.process_time() - cpu0}, sys.stdout)


# -- the driver -----------------------------------------------------------------------------


def run_client(port: int, seconds: float, rate: float = 0.0, clients: int = 0, seed: int = 0) -> dict:
    command = [sys.executable, __file__, "--client", "--port", str(port), "--seconds", str(seconds),
               "--rate", str(rate), "--clients", str(clients), "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.peak = max(self.peak, rss_mb(self.pid))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results: list, warmup: float, seconds: float) -> dict:
    """Requests scheduled after the warm-up; rates over the measured window."""
    kept = [r for r in results if r[0] >= warmup]
    window = seconds - warmup
    ok = [lat for _, status, lat in kept if status == 200]
    shed = [lat for _, status, lat in kept if status == 503]
    return {
        "sent": len(kept) / window, "goodput": len(ok) / window,
        "ok_p50": percentile(ok, 0.5), "ok_p99": percentile(ok, 0.99), "shed": len(shed) / window,
        "shed_p50": percentile(shed, 0.5), "shed_p99": percentile(shed, 0.99),
        "timeouts": sum(1 for _, s, _ in kept if s == 504),
        "other": ", ".join(f"{status}: {n}" for status, n in sorted(Counter(
            s for _, s, _ in kept if s not in (200, 503, 504)).items())) or "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help="default: an untrained HA-CNN")
    parser.add_argument("--levels", default="1,2,4,8", help="multiples of the measured capacity")
    parser.add_argument("--seconds", type=float, default=20, help="per level (and for the capacity run)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of each level left out of the figures")
    parser.add_argument("--clients", type=int, default=32,
                        help="closed-loop clients that measure capacity (enough to keep the model saturated)")
    parser.add_argument("--env", action="append", default=[], help="REID_X=Y service settings, repeatable")
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="reid-overload-"))
    checkpoint = args.checkpoint or make_checkpoint(tmp / "hacnn.safetensors")
    settings = {k.removeprefix("REID_").lower(): v for k, v in (e.split("=", 1) for e in args.env)}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; service settings: "
          f"{settings or 'defaults'}", file=sys.stderr)
    with ServiceProcess(checkpoint, tmp / "data", **settings) as service:
        pid = service.proc.pid
        metrics = lambda: service.client().get("/metrics").text  # noqa: E731
        limit, rss_ready = metric_value(metrics(), "reid_queue_limit"), rss_mb(pid)
        capacity_run = summarize(run_client(service.port, args.seconds, clients=args.clients)["results"],
                                 args.warmup, args.seconds)
        capacity = capacity_run["goodput"]
        print(f"capacity: {capacity:.0f} req/s with {args.clients} closed-loop clients "
              f"(p50 {capacity_run['ok_p50'] * 1000:.0f} ms); queue bound {limit:.0f} images", file=sys.stderr)
        rows = []
        for level in (float(x) for x in args.levels.split(",")):
            time.sleep(2)  # let the previous level drain
            before, sampler = rss_mb(pid), RssSampler(pid)
            sampler.start()
            run = run_client(service.port, args.seconds, rate=level * capacity, seed=int(level * 10))
            sampler.stop.set()
            sampler.join()
            row = summarize(run["results"], args.warmup, args.seconds)
            row.update(level=level, rss_before=before, rss_after=rss_mb(pid), rss_peak=sampler.peak,
                       client_ms=run["cpu_s"] * 1000 / max(1, len(run["results"])))
            rows.append(row)
            print(f"  {level:g}x done: goodput {row['goodput']:.0f}/s, shed {row['shed']:.0f}/s", file=sys.stderr)
        shed_total = metric_value(metrics(), 'reid_requests_shed_total{reason="overloaded"}')

    print(f"\ncapacity (closed loop, {args.clients} clients): {capacity:.0f} req/s (p50 {capacity_run['ok_p50'] * 1000:.0f}"
          f" ms); queue bound at start {limit:.0f} images; RSS when ready {rss_ready:.0f} MB;"
          f" {shed_total:.0f} requests shed in all\n")
    print("| load | offered | goodput (200/s) | goodput : capacity | accepted p50 | accepted p99 | shed (503/s) |"
          " shed p50 | shed p99 | 504s | other | RSS before / after / peak | client CPU per request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['level']:g}x | {r['sent']:.0f}/s | {r['goodput']:.0f} | {r['goodput'] / capacity:.0%} |"
              f" {r['ok_p50'] * 1000:.0f} ms | {r['ok_p99'] * 1000:.0f} ms | {r['shed']:.0f} |"
              f" {r['shed_p50'] * 1000:.1f} ms | {r['shed_p99'] * 1000:.1f} ms | {r['timeouts']} | {r['other']} |"
              f" {r['rss_before']:.0f} / {r['rss_after']:.0f} / {r['rss_peak']:.0f} MB | {r['client_ms']:.2f} ms |")
    print(f"\n(statistics leave out each level's first {args.warmup:g} s; {args.seconds:g} s per level)")


if __name__ == "__main__":
    main()
