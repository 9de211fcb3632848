"""ResNet-50 with a BNNeck head for re-identification ("bag of tricks", Luo et al. 2019).

The backbone's modules sit at the top level of the model with torchvision's names
(``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a torchvision ``resnet50`` ImageNet
state dict loads unchanged (its ``fc.*`` is dropped: the head replaces it).
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50ReID(nn.Module):
    """ResNet-50 + BNNeck. Eval mode returns the BN-neck output (2048-d, not normalised).

    Train mode returns ``{"embedding", "features": [pre-BN feature], "logits": [logits]}``:
    the triplet loss uses the pre-BN feature, cross-entropy the classifier on the BN output.
    """

    arch = "resnet50"

    def __init__(self, num_classes: int = 0, last_stride: int = 1, input_size: tuple[int, int] = (256, 128)):
        super().__init__()
        self.config = {"last_stride": last_stride, "input_size": list(input_size)}
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.embedding_dim = 2048

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in_channels = 64
        self.layer1 = self._make_layer(64, 3, stride=1)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.layer4 = self._make_layer(512, 3, stride=last_stride)

        self.bottleneck = nn.BatchNorm1d(self.embedding_dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift, so the BN output stays centred
        if num_classes > 0:
            self.classifier = nn.Linear(self.embedding_dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_channels = planes * Bottleneck.expansion
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [Bottleneck(self._in_channels, planes, stride, downsample)]
        self._in_channels = out_channels
        layers += [Bottleneck(out_channels, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def backbone_state_dict_keys(self) -> list[str]:
        """Names a torchvision ``resnet50`` state dict shares with this model."""
        return [k for k in self.state_dict() if not k.startswith(("bottleneck.", "classifier."))]

    def load_imagenet_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ``resnet50`` state dict; its ``fc`` is ignored, anything else must match."""
        backbone = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        expected = set(self.backbone_state_dict_keys())
        missing = sorted(expected - backbone.keys())
        unexpected = sorted(backbone.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"not a torchvision resnet50 state dict: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        own = self.state_dict()
        for k, v in backbone.items():
            if own[k].shape != v.shape:
                raise ValueError(f"shape mismatch for {k}: file has {tuple(v.shape)}, model {tuple(own[k].shape)}")
        self.load_state_dict(backbone, strict=False)

    def load_imagenet_weights(self, path: str | os.PathLike) -> None:
        """Load a torchvision ``resnet50`` state dict from a local file: safetensors or ``torch.save``.

        ``torch.save`` files are read with ``weights_only=True``: tensors only, no arbitrary pickles.
        Every problem is a ValueError whose message starts with the file name.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        try:
            state = safetensors.torch.load_file(str(path))
        except Exception:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: neither a safetensors nor a torch.save state dict file ({e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: does not hold a flat state dict (name -> tensor)")
        try:
            self.load_imagenet_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def forward(self, x: torch.Tensor):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feature = F.adaptive_avg_pool2d(x, 1).flatten(1)
        embedding = self.bottleneck(feature)
        if not self.training:
            return embedding
        out = {"embedding": embedding, "features": [feature]}
        if self.num_classes > 0:
            out["logits"] = [self.classifier(embedding)]
        return out
