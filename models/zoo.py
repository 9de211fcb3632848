"""Model zoo: ``build_model(name, num_classes=..., **config)`` and the embedding entry point."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.hacnn import HACNN
from models.resnet import ResNet50ReID

# ImageNet statistics: both archs are trained on inputs normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_REGISTRY: dict[str, type[nn.Module]] = {"hacnn": HACNN, "resnet50": ResNet50ReID}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int = 0, **config) -> nn.Module:
    """Build a network by name. ``num_classes=0`` gives the serving network (no classifiers).

    Every model exposes ``arch``, ``config`` (its constructor arguments, JSON-able),
    ``embedding_dim`` and ``input_size`` (H, W), so that it describes itself in a checkpoint.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_models())}") from None
    try:
        return cls(num_classes=num_classes, **config)
    except TypeError as e:
        raise ValueError(f"bad config for {name}: {e}") from None


@torch.inference_mode()
def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W normalised images -> N x D L2-normalised embeddings (model in eval mode)."""
    if model.training:
        raise RuntimeError("embed() needs the model in eval mode")
    return F.normalize(model(images).float(), dim=1)
