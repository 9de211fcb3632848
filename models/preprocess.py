"""Image -> network input, the one definition training's evaluation and the service share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def resize_pixels(image: Image.Image, input_size: Sequence[int]) -> np.ndarray:
    """RGB, bilinear resize to input_size (H, W): H x W x 3 uint8, what the service batches."""
    height, width = input_size
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image)


def normalize_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 per channel: (x/255 - mean) / std == x * scale - offset. Every
    backend normalises with these, so all compute the same float32 values."""
    std_ = np.asarray(std, dtype=np.float32)
    return 1.0 / (255.0 * std_), np.asarray(mean, dtype=np.float32) / std_


def normalize_pixels(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """... x H x W x 3 uint8 -> ... x 3 x H x W float32, (x/255 - mean) / std.

    Works on one image or a batch; the result is a channels-first view of a fresh array
    (np.ascontiguousarray where a backend needs contiguous memory)."""
    scale, offset = normalize_constants(mean, std)
    x = np.asarray(pixels).astype(np.float32)  # a fresh, writable array
    x *= scale
    x -= offset
    return np.moveaxis(x, -1, -3)


def normalize_array(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """H x W x 3 uint8 pixels -> 3 x H x W float tensor, (x/255 - mean) / std."""
    return torch.from_numpy(np.ascontiguousarray(normalize_pixels(pixels, mean, std)))


def resize_normalize(
    image: Image.Image, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RGB, bilinear resize to input_size (H, W), scale to [0, 1], normalise: a 3 x H x W float tensor."""
    return normalize_array(resize_pixels(image, input_size), mean, std)
