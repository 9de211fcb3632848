"""Inference speed of the re-id networks on this CPU: torch eager vs ONNX Runtime, plus FLOPs.

    python bench/bench_models.py                 # both archs, batch 1 and 32, writes docs/models.md
    python bench/bench_models.py --archs hacnn --batches 32 --seconds 5 --no-write

Throughput is images per second from the median time of one batch, measured after warm-up
on random inputs (speed does not depend on the pixel values). FLOPs come from
torch.utils.flop_counter.FlopCounterMode, which counts a multiply-add as 2 FLOPs and counts
only convolutions and matrix products (no BatchNorm, ReLU, pooling or grid_sample: those are
a few percent here). For HA-CNN it also tries the cheap torch CPU speed-ups (channels_last,
BatchNorm folded into the convs, TorchScript freeze + optimize_for_inference).

The fp32 peak is threads x 64 FLOP/cycle (AVX-512, two FMA pipes) x the core clock, which
a tiny C probe measures (a VM's /proc/cpuinfo shows only the nominal clock); a large sgemm
and convolution give the practical ceiling next to it.

Other processes sharing the cores distort the wall-clock figures: the load average before
and after is printed with the table; run it on a quiet machine. The "images per
CPU-second" column, taken with --threads 1, stays meaningful on a busy one.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from models import build_model, list_models  # noqa: E402
from models.export import export_onnx  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Zen 5 has two 512-bit FMA pipes: 2 x 16 fp32 lanes x 2 FLOPs (multiply + add) per cycle.
FP32_FLOPS_PER_CYCLE_AVX512 = 64


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if found:
            return found.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def nominal_ghz() -> float | None:
    try:
        found = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M)
        return float(found.group(1)) / 1e3 if found else None
    except OSError:
        return None


# A chain of dependent integer adds runs at one add per cycle on any x86 core: adds per
# second of thread CPU time is the clock the core really runs at (a VM's /proc/cpuinfo
# shows the nominal one; boost can be far higher). Thread CPU time ignores other load.
CLOCK_PROBE = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b;
    long n = 1000000000L;
    unsigned long x = 0;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    for (long i = 0; i < n; i += 8)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                         "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    printf("%f\n", n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9) / 1e9 + 0 * x);
    return 0;
}
"""


def measured_ghz() -> float | None:
    """The core clock from CLOCK_PROBE, or None without a C compiler or on a non-x86 machine."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "clock.c", Path(tmp) / "clock"
        src.write_text(CLOCK_PROBE)
        try:
            subprocess.run(["cc", "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
            runs = [float(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout) for _ in range(3)]
        except (OSError, subprocess.CalledProcessError, ValueError):
            return None
    return statistics.median(runs)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def flops_per_image(model: nn.Module) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, *model.input_size))
    return counter.get_total_flops()


def measured_peak_gflops(seconds: float, use_cpu_time: bool) -> float:
    """Best fp32 GFLOP/s of large dense kernels (an MKL sgemm, a oneDNN 3x3 conv): the practical ceiling."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x, w = torch.randn(1, 256, 64, 64), torch.randn(256, 256, 3, 3)
    kernels = [
        (lambda: torch.mm(a, b), 2 * 2048**3),
        (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 256 * 256 * 9 * 64 * 64),
    ]
    best = 0.0
    with torch.inference_mode():
        for run, flops in kernels:
            wall, cpu = time_batches(run, seconds / 2, warmup=2)
            best = max(best, flops / (cpu if use_cpu_time else wall))
    return best / 1e9


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every Conv2d/Linear followed by its BatchNorm (inside a Sequential) merged into one layer."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            layer, norm = seq[i], seq[i + 1]
            if isinstance(layer, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(layer, norm), nn.Identity()
            elif isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
                seq[i], seq[i + 1] = fuse_linear_bn_eval(layer, norm), nn.Identity()
    return model


def time_batches(run, seconds: float, warmup: int) -> tuple[float, float]:
    """(median wall seconds, mean process CPU seconds) of one call, after ``warmup`` calls; >= 3 timed calls.

    With one thread the CPU time barely depends on other processes sharing the cores (the
    wall time does), so it is the figure to compare on a busy machine.
    """
    for _ in range(warmup):
        run()
    times = []
    start, cpu_start = time.perf_counter(), time.process_time()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times), (time.process_time() - cpu_start) / len(times)


def torch_runner(model: nn.Module, images: torch.Tensor, channels_last: bool = False):
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            model(images)

    return run


def torchscript_runner(model: nn.Module, images: torch.Tensor):
    with torch.no_grad():
        traced = torch.jit.trace(model, images[:2], check_trace=False)
        optimized = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

    def run():
        with torch.no_grad():
            optimized(images)

    return run


def ort_runner(onnx_path: str, images: torch.Tensor, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}
    return lambda: session.run(None, feed)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Images/s of the re-id networks on this CPU (torch eager vs ONNX Runtime) and FLOPs per image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--archs", nargs="+", default=list_models(), choices=list_models())
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="batch sizes to time")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (at least 3 batches)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before each measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and ONNX Runtime")
    p.add_argument("--no-variants", action="store_true", help="skip HA-CNN's torch speed-up variants")
    p.add_argument(
        "--ghz",
        type=float,
        default=None,
        help="core clock for the fp32 peak (threads x 64 FLOP/cycle x GHz); default: measured with a small C "
        "probe (needs cc), else /proc/cpuinfo's nominal clock",
    )
    p.add_argument("--no-write", action="store_true", help=f"print the table only; do not update {DOC}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads < 1 or any(b < 1 for b in args.batches):
        print("error: --threads and --batches must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    load_before = load_average()
    if args.ghz:
        ghz, clock_source = args.ghz, "given with --ghz"
    elif (ghz := measured_ghz()) is not None:
        clock_source = "measured by a dependent-add probe"
    else:
        ghz, clock_source = nominal_ghz(), "nominal, from /proc/cpuinfo"
    peak = args.threads * FP32_FLOPS_PER_CYCLE_AVX512 * ghz if ghz else None

    plans = []  # (arch, backend, batch)
    for arch in args.archs:
        for batch in args.batches:
            plans += [(arch, "torch eager", batch), (arch, "ONNX Runtime", batch)]
            if arch == "hacnn" and not args.no_variants:
                plans += [
                    (arch, "torch channels_last", batch),
                    (arch, "torch BN folded", batch),
                    (arch, "torch BN folded + channels_last", batch),
                    (arch, "TorchScript freeze + optimize_for_inference", batch),
                ]

    practical_peak = measured_peak_gflops(args.seconds, use_cpu_time=args.threads == 1)
    rows, flops, params = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        models, onnx_paths = {}, {}
        for arch in args.archs:
            torch.manual_seed(0)
            models[arch] = build_model(arch).eval()
            flops[arch] = flops_per_image(models[arch])
            params[arch] = sum(p.numel() for p in models[arch].parameters())
            onnx_paths[arch] = os.path.join(tmp, f"{arch}.onnx")
            export_onnx(models[arch], onnx_paths[arch])
        for arch, backend, batch in tqdm(plans, desc="benchmark", unit="run"):
            model = models[arch]
            images = torch.randn(batch, 3, *model.input_size)
            if backend == "torch eager":
                run = torch_runner(model, images)
            elif backend == "ONNX Runtime":
                run = ort_runner(onnx_paths[arch], images, args.threads)
            elif backend == "torch channels_last":
                run = torch_runner(copy.deepcopy(model), images, channels_last=True)
            elif backend == "torch BN folded":
                run = torch_runner(fold_batchnorm(model), images)
            elif backend == "torch BN folded + channels_last":
                run = torch_runner(fold_batchnorm(model), images, channels_last=True)
            else:
                run = torchscript_runner(model, images)
            rows.append((arch, backend, batch, *time_batches(run, args.seconds, args.warmup)))
    load_after = load_average()

    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads used; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}.",
        f"Load average (1, 5, 15 min) before: {load_before}; after: {load_after}.",
        "Command: `" + " ".join(["python bench/bench_models.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "",
        "| arch | params | GFLOPs/image | backend | batch | images/s | ms/batch | GFLOP/s | % of fp32 peak "
        "| images per CPU-second |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, backend, batch, seconds, cpu_seconds in rows:
        rate = batch / seconds
        gflops = rate * flops[arch] / 1e9
        share = f"{100 * gflops / peak:.0f}%" if peak else "?"
        lines.append(
            f"| {arch} | {params[arch] / 1e6:.2f}M | {flops[arch] / 1e9:.2f} | {backend} | {batch} | "
            f"{rate:.1f} | {1e3 * seconds:.1f} | {gflops:.1f} | {share} | {batch / cpu_seconds:.1f} |"
        )
    lines.append("")
    if peak:
        lines.append(
            f"fp32 peak: {peak:.0f} GFLOP/s = {args.threads} cores x {FP32_FLOPS_PER_CYCLE_AVX512} "
            f"FLOP/cycle (AVX-512, two FMA pipes) x {ghz:.2f} GHz ({clock_source})."
        )
    lines.append(
        f"Measured ceiling on the same threads (best of a 2048^3 sgemm and a 256-channel 3x3 conv"
        f"{', per CPU-second' if args.threads == 1 else ''}): {practical_peak:.0f} GFLOP/s."
    )
    lines.append("FLOPs: FlopCounterMode, a multiply-add counted as 2 FLOPs; convolutions and matrix products only.")
    lines.append(
        "images per CPU-second: batch / process CPU time per batch; with --threads 1 it is robust to other load "
        "(with more threads it also counts threads spinning while they wait)."
    )
    table = "\n".join(lines)
    print(table)

    if not args.no_write:
        write_section(DOC, table)
        print(f"\nwrote the table into {DOC}", file=sys.stderr)
    return 0


def write_section(doc: Path, table: str) -> None:
    """Replace the text between the bench markers in ``doc`` (or append a marked section)."""
    block = f"{BEGIN}\n{table}\n{END}"
    text = doc.read_text() if doc.exists() else "# Models\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## Inference benchmark\n\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
