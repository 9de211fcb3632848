"""Start-up measurements of the model on this machine, before the service turns ready.

- Warm-up: a pass of the largest batch on every worker at once, so that the backend's memory
  pools grow now to what the heaviest load needs (HA-CNN, ONNX Runtime, batch 32 x 2 workers:
  +300 MB) and not at the first overload: resident memory at start is memory under any load.
- The batch size: the batcher's largest batch is the one, up to REID_MAX_BATCH_SIZE, that the
  model runs fastest per image here. Under overload every pass is a full batch; on a 2-core
  CPU a pass of 32 crops runs ~7% fewer images per second than one of 8 (and needs 4x the
  memory), while on a GPU bigger batches are faster.
- The throughput at that batch: where the admission bound starts from (admission.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.embedder import Embedder

log = logging.getLogger(__name__)

ROUNDS = 3  # timed rounds per batch size; the best one counts (the others met a busy core)
NEAR_BEST = 0.97  # a smaller batch within 3% of the best is taken: less memory, shorter passes


@dataclass(frozen=True)
class Calibration:
    batch_size: int
    throughput: float  # images per second, every worker running passes of batch_size
    rates: dict[int, float]  # images per second by batch size tried


def side_by_side(embed: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, workers: int) -> float:
    """Seconds for ``workers`` passes over ``pixels`` run at once, as the batcher's workers do."""
    passes = [threading.Thread(target=embed, args=(pixels,)) for _ in range(workers)]
    started = time.perf_counter()
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join()
    return time.perf_counter() - started


def images_per_second(embed: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, workers: int) -> float:
    """Images/s of ``workers`` passes over ``pixels`` side by side, the best of ROUNDS."""
    best = min(side_by_side(embed, pixels, workers) for _ in range(ROUNDS))
    return workers * len(pixels) / best


def candidate_batches(max_batch: int) -> list[int]:
    return sorted({max(1, max_batch // 4), max(1, max_batch // 2), max_batch})


def calibrate(embedder: Embedder, max_batch: int) -> Calibration:
    h, w = embedder.info.input_size
    workers = embedder.workers
    pixels = np.random.default_rng(0).integers(0, 256, (max_batch, h, w, 3), dtype=np.uint8)
    side_by_side(embedder.embed, pixels, workers)  # warm-up at the largest batch
    rates = {}
    for batch in candidate_batches(max_batch):
        rates[batch] = images_per_second(embedder.embed, pixels[:batch], workers)
    fastest = max(rates.values())
    batch = min(b for b, rate in rates.items() if rate >= NEAR_BEST * fastest)
    log.info("model: %s images/s by batch size; batches of up to %d (REID_MAX_BATCH_SIZE %d)",
             ", ".join(f"{b}: {rate:.0f}" for b, rate in rates.items()), batch, max_batch)
    return Calibration(batch_size=batch, throughput=rates[batch], rates=rates)
