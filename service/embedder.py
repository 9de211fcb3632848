"""The model behind the service: one checkpoint, run by the backend and precision chosen for this machine.

The backends (torch, ONNX Runtime, OpenVINO) are in service/backends.py; which one serves, and
at which precision, is settled here from the settings, the hardware and, where there is a
choice, a measurement (service/backend_choice.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import CheckpointInfo, load_checkpoint
from models.hardware import CpuInfo, cpu_info
from service.backend_choice import (
    DEFAULT_MIN_COSINE, BackendCheck, Candidate, cache_path, candidates, check_backends, needs_check,
)
from service.backends import (
    InferenceBackend, cached_onnx_export, onnx_backend, onnx_cache_path, openvino_backend, torch_backend,
)
from service.errors import StartupError

__all__ = ["Embedder", "StartupError", "load_embedder", "onnx_cache_path", "plan_parallelism", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(requested: str, cuda_available: bool) -> str:
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise StartupError("device 'cuda' requested but no CUDA device is available (use --device cpu or auto)")
    return requested


MAX_AUTO_WORKERS = 8


def plan_parallelism(backend: str, device: str, workers: int, threads: int, cores: int) -> tuple[int, int]:
    """(forward passes run side by side, threads each uses); 0 asks for the default.

    ONNX Runtime and OpenVINO on CPU: one single-threaded pass per core. Measured on 2 cores (docs/service.md),
    two 1-thread passes give 15-25% more images/s than one 2-thread pass, and twice as much
    while other Python threads take CPU: a split pass waits at every layer for its slowest
    thread. torch: one pass (on CUDA the GPU is the parallelism; on CPU torch's thread pool)."""
    cores = max(1, cores)
    if workers == 0:
        workers = min(cores, MAX_AUTO_WORKERS) if backend in ("onnx", "openvino") else 1
    if threads == 0:
        threads = 1 if device == "cuda" else max(1, cores // workers)
    return workers, threads


@dataclass
class Embedder:
    info: CheckpointInfo
    backend: str
    device: str
    run: InferenceBackend
    workers: int = 1  # forward passes the backend may run at once (from as many threads)
    precision: str = "fp32"
    check: BackendCheck | None = None  # the accuracy and speed check behind the choice, when there was one

    @property
    def model_name(self) -> str:
        return self.info.model_name

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 at the input size -> N x D unit vectors."""
        return self.run(pixels)


def machine_key(device: str, cpu: CpuInfo) -> str:
    """What a cached backend choice is valid for: the CPU kind, or the GPU model on CUDA."""
    if device == "cuda":
        return "cuda-" + hashlib.sha256(torch.cuda.get_device_name().encode()).hexdigest()[:12]
    return cpu.key()


def load_embedder(
    checkpoint: Path, *, device: str = "auto", backend: str = "auto", precision: str = "auto",
    data_dir: Path = Path("data"), workers: int = 0, threads: int = 0, min_cosine: float = DEFAULT_MIN_COSINE,
    cpu: CpuInfo | None = None,
) -> Embedder:
    """Load the checkpoint and the backend that serves it. CheckpointError / StartupError carry a
    one-line reason. ``cpu``: this machine's processor (default: read from the OS)."""
    cpu = cpu or cpu_info()
    device = resolve_device(device, torch.cuda.is_available())
    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    options = candidates(backend, precision, device, cpu, cuda_bf16)
    workers, threads = plan_parallelism(options[0].backend, device, workers, threads, os.cpu_count() or 1)
    if device == "cpu":
        torch.set_num_threads(threads)  # torch serves, or computes the reference
    model, info = load_checkpoint(checkpoint, device="cpu")
    built: dict[Candidate, InferenceBackend] = {}

    def build(candidate: Candidate) -> InferenceBackend:
        if candidate not in built:
            built[candidate] = _build_backend(candidate, model, info, device, data_dir, workers, threads)
        return built[candidate]

    check = None
    chosen = options[0]
    if needs_check(options):
        conditions = {"fingerprint": info.fingerprint, "machine": machine_key(device, cpu), "workers": workers,
                      "threads": threads}
        check = check_backends(
            options, build, torch_backend(model, info, device, "fp32"), info.input_size, workers, min_cosine,
            cache_path(data_dir, info.fingerprint, conditions["machine"]), conditions,
        )
        chosen = check.chosen.candidate
    run = build(chosen)
    log.info("model %s (%s, dim %d) on %s via %s %s, %d pass(es) at once x %d thread(s); %s",
             info.model_name, info.arch, info.embedding_dim, device, chosen.backend, chosen.precision, workers,
             threads, cpu.summary() if device == "cpu" else torch.cuda.get_device_name())
    return Embedder(info=info, backend=chosen.backend, device=device, run=run, workers=workers,
                    precision=chosen.precision, check=check)


def _build_backend(candidate: Candidate, model: torch.nn.Module, info: CheckpointInfo, device: str, data_dir: Path,
                   workers: int, threads: int) -> InferenceBackend:
    if candidate.backend == "torch":
        return torch_backend(model, info, device, candidate.precision)
    path = cached_onnx_export(model, info, data_dir)
    if candidate.backend == "onnx":
        return onnx_backend(path, info, threads)
    return openvino_backend(path, info, candidate.precision, workers, threads)
