"""Image -> network input, the one definition training's evaluation and the service share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def resize_normalize(
    image: Image.Image, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RGB, bilinear resize to input_size (H, W), scale to [0, 1], normalise: a 3 x H x W float tensor."""
    height, width = input_size
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return normalize_array(np.asarray(image), mean, std)


def normalize_array(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """H x W x 3 uint8 pixels -> 3 x H x W float tensor, (x/255 - mean) / std."""
    pixels = np.ascontiguousarray(pixels)
    if not pixels.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only memory
        pixels = pixels.copy()
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)
