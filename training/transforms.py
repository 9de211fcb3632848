"""Training augmentation on already-resized uint8 pixels, with numpy and torch only.

Evaluation never goes through here: it uses ``models.preprocess.resize_normalize``, the
function the service calls, so that a trained model is measured on the inputs it will see.
Randomness comes from torch's global generator, which DataLoader seeds per worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from models.preprocess import normalize_array


def random_flip(pixels: np.ndarray, p: float = 0.5) -> np.ndarray:
    return pixels[:, ::-1] if torch.rand(()) < p else pixels


def pad_random_crop(pixels: np.ndarray, pad: int) -> np.ndarray:
    """Zero-pad every side by ``pad`` pixels, then crop the original size at a random offset."""
    if pad <= 0:
        return pixels
    h, w = pixels.shape[:2]
    padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)))
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    return padded[top : top + h, left : left + w]


def random_erase(
    x: torch.Tensor, p: float = 0.5, area=(0.02, 0.4), aspect=(0.3, 3.3), value: float = 0.0, attempts: int = 10
) -> torch.Tensor:
    """Random erasing (Zhong et al.): blank one random rectangle of a normalised 3 x H x W tensor.

    ``value`` 0 in normalised space is the dataset mean colour, as in the "bag of tricks" baseline.
    """
    if torch.rand(()) >= p:
        return x
    _, h, w = x.shape
    for _ in range(attempts):
        target = float(torch.empty(()).uniform_(*area)) * h * w
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(aspect[0]), math.log(aspect[1]))))
        eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, ()))
            left = int(torch.randint(0, w - ew + 1, ()))
            x[:, top : top + eh, left : left + ew] = value
            return x
    return x


@dataclass
class TrainTransform:
    """flip -> pad-and-crop -> normalise -> random erasing, on pixels at the input size."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    flip_p: float = 0.5
    pad: int = 10
    erase_p: float = 0.5

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        pixels = pad_random_crop(random_flip(pixels, self.flip_p), self.pad)
        x = normalize_array(pixels, self.mean, self.std)
        return random_erase(x, self.erase_p) if self.erase_p > 0 else x
