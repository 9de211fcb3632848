"""Which number format a training run computes in: ``--precision auto|fp32|bf16``.

auto takes bf16 autocast only where the hardware multiplies bf16 natively (a CPU with
AVX-512 BF16 or AMX, a GPU with bf16), because elsewhere bf16 is emulated and slower than
fp32. On a CUDA GPU without bf16, auto keeps the fp16 mixed precision (with a gradient
scaler) that training always used there. Weights, optimiser state and evaluation stay fp32.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from models.hardware import CpuInfo

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision this device cannot run."""


def resolve_precision(asked: str, device_type: str, cpu: CpuInfo, cuda_bf16: bool = False, amp: bool = True) -> str:
    """'fp32', 'bf16' or 'fp16' for ``--precision asked`` on ``device_type`` ('cpu' or 'cuda').

    ``cpu`` is this machine's CpuInfo (models.hardware.cpu_info()), ``cuda_bf16`` whether the
    GPU supports bf16; ``amp`` False (``--no-amp``) makes auto fp32 on CUDA. An explicit bf16
    on a CPU without native bf16 runs emulated, with a warning (it is for measuring, not speed).
    """
    if asked not in PRECISIONS:
        raise PrecisionError(f"unknown precision {asked!r}: use {', '.join(PRECISIONS)}")
    if asked == "fp32":
        return "fp32"
    if device_type == "cuda":
        if asked == "bf16":
            if not cuda_bf16:
                raise PrecisionError("--precision bf16: this GPU has no bf16 support (use auto or fp32)")
            return "bf16"
        if not amp:
            return "fp32"
        return "bf16" if cuda_bf16 else "fp16"
    if asked == "bf16":
        if not cpu.has_bf16:
            warnings.warn(
                f"--precision bf16 on {cpu.model}, which has no native bf16 (avx512_bf16/amx_bf16): "
                "it runs emulated, usually slower than fp32",
                stacklevel=2,
            )
        return "bf16"
    return "bf16" if cpu.has_bf16 else "fp32"


def autocast(precision: str, device_type: str):
    """The forward pass's context: autocast to the precision's dtype, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])
