"""Which backend and precision serve this checkpoint on this machine: measured, never assumed.

The candidates follow from the settings and the hardware; a reduced precision is offered
only where the processor has it natively (an emulated bf16 is slower than fp32). When there
is more than one candidate, or one that is not fp32, each is measured on a fixed calibration
batch: the smallest cosine between its embeddings and the fp32 torch reference's, and its
images/s. The fastest that stays within REID_MIN_COSINE wins. The measurements are cached as
JSON under the data dir, per checkpoint fingerprint and machine, so the next start skips them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.hardware import CpuInfo
from service.calibration import images_per_second
from service.errors import StartupError

log = logging.getLogger(__name__)

DEFAULT_MIN_COSINE = 0.999  # bf16 kept >= 0.9993 on the trained demo model (issue 14)
CALIBRATION_IMAGES = 16
CALIBRATION_SEED = 14
CACHE_DIR = "backends"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    backend: str  # torch, onnx, openvino
    precision: str  # fp32, fp16, bf16

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass(frozen=True)
class Trial:
    """One candidate measured on the calibration batch."""

    backend: str
    precision: str
    min_cosine: float  # smallest cosine to the fp32 torch embedding of the same image
    images_per_s: float

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.backend, self.precision)


@dataclass(frozen=True)
class BackendCheck:
    """What start-up measured and chose (for logs, /readyz and metrics)."""

    chosen: Trial
    required_min_cosine: float
    trials: tuple[Trial, ...]
    from_cache: bool


def candidates(backend: str, precision: str, device: str, cpu: CpuInfo, cuda_bf16: bool = False) -> list[Candidate]:
    """What may serve, most wanted first. StartupError when the settings ask for what cannot run here."""
    if device == "cuda":
        if backend not in ("auto", "torch"):
            raise StartupError(f"backend '{backend}' runs on CPU only here; use backend torch (or auto) with device cuda")
        if precision == "bf16" and not cuda_bf16:
            raise StartupError("precision bf16 requested but this GPU has no bf16 support (use fp16, fp32 or auto)")
        wanted = ["fp16", "fp32"] if precision == "auto" else [precision]
        return [Candidate("torch", p) for p in wanted]
    if precision == "fp16":
        raise StartupError("precision fp16 is for CUDA only; on CPU use fp32, bf16 or auto")
    if precision == "bf16" and not cpu.has_bf16:
        raise StartupError(
            f"precision bf16 requested but this CPU has no native bf16 (avx512_bf16 or amx_bf16): {cpu.summary()}; "
            "use fp32 or auto"
        )
    if precision == "bf16" and backend in ("torch", "onnx"):
        raise StartupError(f"backend '{backend}' serves fp32 only on CPU; bf16 needs backend openvino (or auto)")
    bf16 = [Candidate("openvino", "bf16")] if cpu.has_bf16 else []
    options = {
        "auto": [*bf16, Candidate("openvino", "fp32"), Candidate("onnx", "fp32")],
        "openvino": [*bf16, Candidate("openvino", "fp32")],
        "onnx": [Candidate("onnx", "fp32")],
        "torch": [Candidate("torch", "fp32")],
    }[backend]
    return [c for c in options if precision in ("auto", c.precision)]


def needs_check(options: list[Candidate]) -> bool:
    """A single fp32 candidate is the reference itself: nothing to choose or check."""
    return len(options) > 1 or options[0].precision != "fp32"


def choose(trials: list[Trial], required_min_cosine: float) -> Trial:
    """The fastest trial whose embeddings stay within the tolerance; StartupError if none does."""
    passed = [t for t in trials if t.min_cosine >= required_min_cosine]
    if not passed:
        worst = ", ".join(f"{t.backend} {t.precision}: {t.min_cosine:.5f}" for t in trials)
        raise StartupError(
            f"no backend/precision keeps the embeddings within REID_MIN_COSINE {required_min_cosine} of fp32 ({worst})"
        )
    return max(passed, key=lambda t: t.images_per_s)


def calibration_pixels(input_size: tuple[int, int], n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """N x H x W x 3 uint8, the same every start: seeded coarse colour fields, smoothly upsampled
    (natural images are smooth; white noise would exercise the model far from its use)."""
    height, width = input_size
    rng = np.random.default_rng(CALIBRATION_SEED)
    coarse = rng.integers(0, 256, (n, 8, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((width, height), Image.BICUBIC)) for c in coarse])


def min_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    """Smallest cosine between matching rows (both are unit vectors)."""
    return float(np.min(np.sum(vectors.astype(np.float64) * reference, axis=1)))


def measure(candidate: Candidate, run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray,
            reference: np.ndarray, workers: int) -> Trial:
    cosine = min_cosine(run(pixels), reference)  # also the warm-up pass
    trial = Trial(candidate.backend, candidate.precision, cosine, images_per_second(run, pixels, workers))
    log.info("backend check: %s: min cosine to fp32 %.5f, %.0f images/s", candidate, trial.min_cosine,
             trial.images_per_s)
    return trial


# -- the cache ------------------------------------------------------------------------------


def cache_path(data_dir: Path, fingerprint: str, machine_key: str) -> Path:
    return Path(data_dir) / CACHE_DIR / f"{fingerprint}-{machine_key}.json"


def read_trials(path: Path, conditions: dict) -> dict[Candidate, Trial]:
    """Trials cached at ``path`` under the same conditions (fingerprint, machine, parallelism); else none."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if body.get("conditions") != conditions:
        return {}
    try:
        trials = [Trial(**t) for t in body["trials"]]
    except (KeyError, TypeError):
        return {}
    return {t.candidate: t for t in trials}


def write_trials(path: Path, conditions: dict, trials: list[Trial]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"conditions": conditions, "trials": [asdict(t) for t in trials]}, indent=1))
    os.replace(tmp, path)


def check_backends(
    options: list[Candidate], build: Callable[[Candidate], Callable], reference: Callable[[np.ndarray], np.ndarray],
    input_size: tuple[int, int], workers: int, required_min_cosine: float, cache: Path, conditions: dict,
) -> BackendCheck:
    """Measure the candidates not measured before here (cache), choose, remember."""
    cached = read_trials(cache, conditions)
    missing = [c for c in options if c not in cached]
    if missing:
        pixels = calibration_pixels(input_size)
        expected = reference(pixels)
        for candidate in missing:
            cached[candidate] = measure(candidate, build(candidate), pixels, expected, workers)
        write_trials(cache, conditions, list(cached.values()))
    trials = tuple(cached[c] for c in options)
    chosen = choose(list(trials), required_min_cosine)
    failed = [str(t.candidate) for t in trials if t.min_cosine < required_min_cosine]
    log.info(
        "backend %s chosen%s: %.0f images/s, min cosine to fp32 %.5f >= %s%s", chosen.candidate,
        " (measured earlier, " + str(cache) + ")" if not missing else "", chosen.images_per_s, chosen.min_cosine,
        required_min_cosine, f"; failed the accuracy check: {', '.join(failed)}" if failed else "",
    )
    return BackendCheck(chosen, required_min_cosine, trials, from_cache=not missing)
