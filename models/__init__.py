"""Networks (HA-CNN, ResNet-50 + BNNeck, MGAT) and the serving-checkpoint format."""

from models.checkpoint import CheckpointError, CheckpointInfo, fingerprint, load_checkpoint, save_checkpoint
from models.zoo import IMAGENET_MEAN, IMAGENET_STD, build_model, embed, list_models

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_model",
    "embed",
    "fingerprint",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
]
