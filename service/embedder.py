"""The model behind the service: one checkpoint, run by ONNX Runtime (CPU) or torch (CPU or CUDA).

Every backend takes N x H x W x 3 uint8 pixels, already resized to the checkpoint's input
size, normalises them as the checkpoint says (on the model's device: a quarter of the bytes
to move to a GPU, and off the event loop) and returns N x D float32 L2-normalised
embeddings. The batcher calls a backend from at most ``workers`` threads at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import CheckpointInfo, load_checkpoint
from models.preprocess import normalize_constants, normalize_pixels

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The service cannot start as configured; the message is one line for the operator."""


def resolve_device(requested: str, cuda_available: bool) -> str:
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise StartupError("device 'cuda' requested but no CUDA device is available (use --device cpu or auto)")
    return requested


def resolve_backend(requested: str, device: str) -> str:
    if requested == "auto":
        return "torch" if device == "cuda" else "onnx"
    if requested == "onnx" and device == "cuda":
        raise StartupError("backend 'onnx' runs on CPU only here; use backend torch (or auto) with device cuda")
    return requested


MAX_AUTO_WORKERS = 8


def plan_parallelism(backend: str, device: str, workers: int, threads: int, cores: int) -> tuple[int, int]:
    """(forward passes run side by side, threads each uses); 0 asks for the default.

    ONNX Runtime on CPU: one single-threaded pass per core. Measured on 2 cores (docs/service.md),
    two 1-thread passes give 15-25% more images/s than one 2-thread pass, and twice as much
    while other Python threads take CPU: a split pass waits at every layer for its slowest
    thread. torch: one pass (on CUDA the GPU is the parallelism; on CPU torch's thread pool)."""
    cores = max(1, cores)
    if workers == 0:
        workers = min(cores, MAX_AUTO_WORKERS) if backend == "onnx" else 1
    if threads == 0:
        threads = 1 if device == "cuda" else max(1, cores // workers)
    return workers, threads


@dataclass
class Embedder:
    info: CheckpointInfo
    backend: str
    device: str
    run: object  # callable: np.ndarray (N,H,W,3) uint8 -> np.ndarray (N,D) float32
    workers: int = 1  # forward passes the backend may run at once (from as many threads)

    @property
    def model_name(self) -> str:
        return self.info.model_name

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 at the input size -> N x D unit vectors."""
        return self.run(pixels)


def _torch_runner(model: torch.nn.Module, info: CheckpointInfo, device: str):
    half = device == "cuda"  # fp16 on GPU: tensor cores, half the memory traffic
    if half:
        model = model.half()
    model = model.to(device).eval()
    scale, offset = (
        torch.from_numpy(c).view(1, 3, 1, 1).to(device) for c in normalize_constants(info.mean, info.std)
    )

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().mul_(scale).sub_(offset)
        if half:
            x = x.half()
        return F.normalize(model(x).float(), dim=1).cpu().numpy()

    return run


def onnx_cache_path(data_dir: Path, info: CheckpointInfo) -> Path:
    return Path(data_dir) / "onnx" / f"{info.arch}-{info.fingerprint}.onnx"


def _onnx_runner(model: torch.nn.Module, info: CheckpointInfo, data_dir: Path, threads: int):
    import onnxruntime as ort

    from models.export import export_onnx

    path = onnx_cache_path(data_dir, info)
    if not path.is_file():
        log.info("exporting %s to ONNX at %s (once per checkpoint)", info.model_name, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        export_onnx(model, tmp)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache file
    else:
        log.info("reusing ONNX export %s", path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(pixels: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(normalize_pixels(pixels, info.mean, info.std))
        (out,) = session.run(["embeddings"], {"images": images})
        return out.astype(np.float32, copy=False)

    return run


def load_embedder(
    checkpoint: Path, *, device: str = "auto", backend: str = "auto", data_dir: Path = Path("data"),
    workers: int = 0, threads: int = 0,
) -> Embedder:
    """Load the checkpoint and its backend. CheckpointError / StartupError carry a one-line reason."""
    device = resolve_device(device, torch.cuda.is_available())
    backend = resolve_backend(backend, device)
    workers, threads = plan_parallelism(backend, device, workers, threads, os.cpu_count() or 1)
    model, info = load_checkpoint(checkpoint, device="cpu")
    if backend == "onnx":
        run = _onnx_runner(model, info, data_dir, threads)
    else:
        if device == "cpu":
            torch.set_num_threads(threads)
        run = _torch_runner(model, info, device)
    log.info("model %s (%s, dim %d) on %s via %s, %d pass(es) at once x %d thread(s)",
             info.model_name, info.arch, info.embedding_dim, device, backend, workers, threads)
    return Embedder(info=info, backend=backend, device=device, run=run, workers=workers)
