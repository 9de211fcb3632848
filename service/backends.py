"""The three ways to run a checkpoint: torch (CPU or CUDA), ONNX Runtime and OpenVINO (CPU).

Every backend takes N x H x W x 3 uint8 pixels, already resized to the checkpoint's input
size, normalises them as the checkpoint says (on the model's device: a quarter of the bytes
to move to a GPU, and off the event loop) and returns N x D float32 L2-normalised
embeddings. The batcher calls a backend from at most ``workers`` threads at once. ONNX
Runtime and OpenVINO read the same ONNX export, written once per checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from models import CheckpointInfo
from models.preprocess import normalize_constants, normalize_pixels

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


class InferenceBackend(Protocol):
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 at the input size -> N x D float32 unit vectors."""
        ...


def torch_backend(model: torch.nn.Module, info: CheckpointInfo, device: str, precision: str) -> InferenceBackend:
    dtype = TORCH_DTYPES[precision]
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)  # the fp32 model stays: it is the accuracy reference
    model = model.to(device).eval()
    scale, offset = (
        torch.from_numpy(c).view(1, 3, 1, 1).to(device) for c in normalize_constants(info.mean, info.std)
    )

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().mul_(scale).sub_(offset).to(dtype)
        return F.normalize(model(x).float(), dim=1).cpu().numpy()

    return run


def onnx_cache_path(data_dir: Path, info: CheckpointInfo) -> Path:
    return Path(data_dir) / "onnx" / f"{info.arch}-{info.fingerprint}.onnx"


def cached_onnx_export(model: torch.nn.Module, info: CheckpointInfo, data_dir: Path) -> Path:
    """The checkpoint's ONNX export under the data dir, written on the first use only."""
    from models.export import export_onnx

    path = onnx_cache_path(data_dir, info)
    if path.is_file():
        log.info("reusing ONNX export %s", path)
        return path
    log.info("exporting %s to ONNX at %s (once per checkpoint)", info.model_name, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    export_onnx(model.to("cpu").eval(), tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache file
    return path


def onnx_backend(path: Path, info: CheckpointInfo, threads: int) -> InferenceBackend:
    import onnxruntime as ort

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


def openvino_backend(path: Path, info: CheckpointInfo, precision: str, workers: int, threads: int) -> InferenceBackend:
    """OpenVINO on the CPU: one stream per worker thread (as ONNX Runtime's one session pass
    per core), each thread with its own infer request."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
        "NUM_STREAMS": str(workers),
        "INFERENCE_NUM_THREADS": workers * threads,
    })
    requests = threading.local()

    def run(pixels: np.ndarray) -> np.ndarray:
        request = getattr(requests, "request", None)
        if request is None:
            request = requests.request = compiled.create_infer_request()
        images = np.ascontiguousarray(normalize_pixels(pixels, info.mean, info.std))
        out = request.infer({"images": images})
        return np.array(out[compiled.output("embeddings")], dtype=np.float32)

    return run
