"""Raw images/s of every serving backend and precision on this CPU, same run, same models.

    python bench/bench_backends.py [--archs hacnn resnet50] [--batch 32] [--seconds 5]

Untrained paper-width networks (HA-CNN 160x64; ResNet-50 256x128, last stride 1), run through
the service's own backends (service/backends.py): torch fp32, ONNX Runtime fp32, OpenVINO
fp32, and OpenVINO bf16 where this CPU has native bf16. One pass at a time on all cores.
Prints the CPU with its flags and each figure's ratio to ONNX Runtime fp32, the old default.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_models import time_batches  # noqa: E402
from models import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from models.hardware import cpu_info  # noqa: E402
from service.backends import cached_onnx_export, onnx_backend, openvino_backend, torch_backend  # noqa: E402

MODELS = {"hacnn": ({}, (160, 64)), "resnet50": ({"last_stride": 1}, (256, 128))}


def candidates(has_bf16: bool) -> list[tuple[str, str]]:
    return [("onnx", "fp32"), ("torch", "fp32"), ("openvino", "fp32"), *([("openvino", "bf16")] if has_bf16 else [])]


def backend(name: str, precision: str, model, info, data_dir: Path, threads: int):
    if name == "torch":
        return torch_backend(model, info, "cpu", precision)
    path = cached_onnx_export(model, info, data_dir)
    return onnx_backend(path, info, threads) if name == "onnx" else openvino_backend(path, info, precision, 1, threads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per backend")
    args = p.parse_args(argv)
    cpu, threads = cpu_info(), os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"CPU: {cpu.summary()}, {threads} cores; batch {args.batch}, one pass on all cores")
    print("| model | backend | precision | img/s | x ONNX Runtime fp32 | min cosine to torch fp32 |")
    print("|---|---|---|---|---|---|")
    tmp = Path(tempfile.mkdtemp(prefix="reid-backends-"))
    for arch in args.archs:
        config, size = MODELS[arch]
        torch.manual_seed(0)
        save_checkpoint(build_model(arch, input_size=list(size), **config).eval(), tmp / f"{arch}.safetensors")
        model, info = load_checkpoint(tmp / f"{arch}.safetensors")
        pixels = np.random.default_rng(0).integers(0, 256, (args.batch, *size, 3), dtype=np.uint8)
        reference = torch_backend(model, info, "cpu", "fp32")(pixels)
        rates = {}
        for name, precision in candidates(cpu.has_bf16):
            run = backend(name, precision, model, info, tmp, threads)
            cosine = float(np.min(np.sum(run(pixels) * reference, axis=1)))
            wall, _ = time_batches(lambda run=run: run(pixels), args.seconds, warmup=2)
            rates[name, precision] = args.batch / wall
            ratio = rates[name, precision] / rates["onnx", "fp32"] if ("onnx", "fp32") in rates else float("nan")
            print(f"| {arch} {size[0]}x{size[1]} | {name} | {precision} | {rates[name, precision]:.0f} | "
                  f"{ratio:.2f} | {cosine:.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
