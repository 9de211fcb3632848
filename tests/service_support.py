"""Helpers for the service tests: a real small checkpoint, synthetic person crops, and a real
`python -m service` subprocess on a free loopback port."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw

from models import build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 90

# Clothing colours far apart from each other, so that even an untrained network separates them.
PALETTE = [
    ((220, 30, 30), (30, 30, 120)), ((30, 180, 40), (200, 200, 200)), ((30, 60, 220), (90, 60, 20)),
    ((240, 220, 30), (20, 20, 20)), ((200, 40, 200), (40, 160, 160)), ((250, 140, 20), (60, 60, 60)),
    ((20, 20, 20), (230, 230, 230)), ((120, 80, 200), (220, 120, 140)),
]


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(build_model("hacnn").eval(), path)
    return path


def person_crop(identity: int, view: int = 0, size: tuple[int, int] = (64, 128)) -> Image.Image:
    """A pedestrian-ish crop: background, head, shirt and trousers in the identity's colours, a
    pattern per identity, and a per-view shift and noise."""
    rng = np.random.default_rng(1000 * identity + view)
    shirt, trousers = PALETTE[identity % len(PALETTE)]
    w, h = 64, 128
    image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(90, 140, 3)))
    draw = ImageDraw.Draw(image)
    dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
    draw.ellipse((24 + dx, 4 + dy, 40 + dx, 22 + dy), fill=(225, 185, 150))
    draw.rectangle((16 + dx, 22 + dy, 48 + dx, 70 + dy), fill=shirt)
    if identity % 3 == 1:  # stripes
        for y in range(26, 70, 8):
            draw.rectangle((16 + dx, y + dy, 48 + dx, y + 3 + dy), fill=trousers)
    draw.rectangle((18 + dx, 70 + dy, 31 + dx, 122 + dy), fill=trousers)
    draw.rectangle((33 + dx, 70 + dy, 46 + dx, 122 + dy), fill=trousers)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return image if size == (w, h) else image.resize(size, Image.BILINEAR)


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def files(*images: bytes, name: str = "crop.jpg") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}-{name}", data, "image/jpeg")) for i, data in enumerate(images)]


def metric_value(metrics_text: str, sample: str) -> float:
    """One sample of /metrics, e.g. 'reid_images_dropped_total' or 'reid_requests_shed_total{reason="overloaded"}'."""
    for line in metrics_text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(sample)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_onnx_cache(template: Path, data_dir: Path) -> None:
    """Copy an earlier ONNX export so each server start skips exporting again."""
    if (template / "onnx").is_dir() and not (data_dir / "onnx").exists():
        shutil.copytree(template / "onnx", data_dir / "onnx")


class ServiceProcess:
    """`python -m service` in a subprocess; logs go to a file beside the data dir."""

    def __init__(self, checkpoint: Path, data_dir: Path, log_level: str = "warning", **env_settings):
        self.checkpoint, self.data_dir, self.log_level = checkpoint, data_dir, log_level
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
        self.env.update({f"REID_{k.upper()}": str(v) for k, v in env_settings.items()})
        self.log_path = data_dir.parent / f"{data_dir.name}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        return self.launch().wait_ready()

    def launch(self) -> "ServiceProcess":
        """Start the process without waiting for it to be ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--checkpoint", str(self.checkpoint), "--data-dir", str(self.data_dir),
             "--port", str(self.port), "--log-level", self.log_level],
            cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self) -> "ServiceProcess":
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"service not ready after {READY_TIMEOUT_S}s: {self.log()}")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kwargs})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def metric(self, sample: str) -> float:
        return metric_value(httpx.get(f"{self.url}/metrics", timeout=10).text, sample)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or power cut of the process."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc is None:
            return  # never launched
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


class EnrollmentsUntilKilled:
    """Three clients enrolling identities of 1-3 crops into ``service`` until it is killed.

    ``run()`` starts them, kills the process (SIGKILL, requests in flight) once six
    enrollments were acknowledged, and joins them. What a crash test then checks against the
    store: every acknowledged identity whole, and nothing written that was not attempted."""

    def __init__(self, service: "ServiceProcess", camera: str | None = None):
        self.service, self.camera = service, camera
        self.attempted: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self.refused: list[str] = []
        self._enough, self._stop = threading.Event(), threading.Event()

    def _enrol(self, worker: int) -> None:
        data = {"camera": self.camera} if self.camera else {}
        with self.service.client(timeout=30) as c:
            for n in range(1000):
                if self._stop.is_set():
                    return
                identity, count = f"w{worker}-{n}", 1 + n % 3
                self.attempted[identity] = count
                try:
                    r = c.post("/gallery", data={"identity": identity, **data},
                               files=files(*[jpeg(person_crop(n % 8, v)) for v in range(count)]))
                except httpx.TransportError:
                    return  # the process died under this request
                if r.status_code != 201:
                    self.refused.append(r.text)
                    return
                self.acked[identity] = count
                if len(self.acked) >= 6:
                    self._enough.set()

    def run(self) -> None:
        workers = [threading.Thread(target=self._enrol, args=(w,)) for w in range(3)]
        for w in workers:
            w.start()
        try:
            assert self._enough.wait(120), self.service.log()
        finally:
            self.service.kill()  # with requests in flight
            self._stop.set()
            for w in workers:
                w.join()
        assert not self.refused, self.refused

    def check(self, stored: dict[str, int]) -> None:
        """Nothing acknowledged lost or changed; nothing partially written."""
        for identity, count in self.acked.items():
            assert stored.get(identity) == count, f"acknowledged {identity} lost or changed"
        for identity, count in stored.items():
            assert count == self.attempted[identity], f"{identity} partially written"
