"""--precision: which number format a training run computes in, decided from the hardware."""

import pytest
import torch

from models.hardware import CpuInfo
from training.precision import PrecisionError, autocast, resolve_precision

AVX2_ONLY = CpuInfo("AMD EPYC (test)", frozenset({"avx2", "fma"}))
ZEN4 = CpuInfo("AMD EPYC 9004 (test)", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE_RAPIDS = CpuInfo("Intel Xeon (test)", frozenset({"avx512f", "amx_tile", "amx_bf16"}))


def test_auto_is_fp32_on_a_cpu_without_native_bf16():
    assert resolve_precision("auto", "cpu", AVX2_ONLY) == "fp32"


@pytest.mark.parametrize("cpu", [ZEN4, SAPPHIRE_RAPIDS])
def test_auto_is_bf16_on_a_cpu_with_avx512_bf16_or_amx(cpu):
    assert resolve_precision("auto", "cpu", cpu) == "bf16"


def test_fp32_is_always_fp32():
    assert resolve_precision("fp32", "cpu", ZEN4) == "fp32"
    assert resolve_precision("fp32", "cuda", ZEN4, cuda_bf16=True) == "fp32"


def test_explicit_bf16_on_a_cpu_without_it_runs_emulated_with_a_warning():
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_precision("bf16", "cpu", AVX2_ONLY) == "bf16"


def test_cuda_takes_bf16_where_supported_else_the_fp16_amp_unless_turned_off():
    assert resolve_precision("auto", "cuda", AVX2_ONLY, cuda_bf16=True) == "bf16"
    assert resolve_precision("auto", "cuda", AVX2_ONLY, cuda_bf16=False) == "fp16"
    assert resolve_precision("auto", "cuda", AVX2_ONLY, cuda_bf16=False, amp=False) == "fp32"
    with pytest.raises(PrecisionError, match="no bf16 support"):
        resolve_precision("bf16", "cuda", ZEN4, cuda_bf16=False)


def test_unknown_precision_is_refused():
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu", ZEN4)


def test_bf16_autocast_computes_convolutions_in_bf16_and_fp32_does_not():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with autocast("bf16", "cpu"):
        assert conv(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert conv(x).dtype == torch.float32
