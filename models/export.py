"""ONNX export of a serving network: images in, L2-normalised embeddings out."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# grid_sample (HA-CNN's hard-attention crop) needs opset 16 or later.
ONNX_OPSET = 17


class NormalizedEmbedding(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(images), dim=1)


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = ONNX_OPSET) -> None:
    """Export with a dynamic batch axis; input ``images`` (N x 3 x H x W), output ``embeddings``."""
    model = model.eval()
    height, width = model.input_size
    example = torch.zeros(2, 3, height, width)
    torch.onnx.export(
        NormalizedEmbedding(model).eval(),
        (example,),
        str(path),
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
