"""What this processor can do, read once from the operating system, never assumed.

Used by the service (which backend and precision to run) and by training (bf16 autocast).
Only the CPU's own flags count: a CPU without native bf16 emulates it, slower than fp32.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Native bf16 matrix instructions: AVX-512 BF16 (recent EPYC and Xeon) and AMX (Xeon 4th gen on).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def has_bf16(self) -> bool:
        return bool(self.flags & BF16_FLAGS)

    @property
    def has_amx(self) -> bool:
        return "amx_tile" in self.flags

    def summary(self) -> str:
        """The model and the flags that matter here, for logs and benchmark tables."""
        shown = [f for f in REPORTED_FLAGS if f in self.flags]
        return f"{self.model} ({', '.join(shown) or 'no AVX2'})"

    def key(self) -> str:
        """Short stable id of this processor kind: a cached per-machine choice is keyed by it."""
        text = self.model + "|" + ",".join(sorted(self.flags & set(REPORTED_FLAGS)))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())  # the first processor's line wins
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    return CpuInfo(model=model, flags=frozenset(fields.get("flags", "").split()))


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.is_file() else ""
    return parse_cpuinfo(text)
