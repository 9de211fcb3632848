"""HA-CNN: Harmonious Attention CNN (Li, Zhu, Gong, CVPR 2018), written from the paper.

Layout (input 160x64):

    stem 3x3/2 (32 ch)                                   80x32
    global stage l = Inception-A -> Inception-B (/2) -> Harmonious Attention
        widths 128 / 256 / 384                           40x16, 20x8, 10x4
    local branch: T=4 streams; at stage l each stream crops a horizontal region of the
        global branch's *input* to stage l (the stem output for l=1) at the translation
        the stage's hard attention predicted, adds it to its own previous output
        (cross-attention interaction) and runs an Inception-B shared by all streams.
    global: GAP -> fc 512;  local: GAP per stream, concatenate -> fc 512
    embedding = [global 512 | local 512] = 1024-d

Region crops keep the aspect of a horizontal stripe (1/T of the height, full width), so
a crop of the stage-l input has exactly the size of the local stream's stage-(l-1) output
and no resizing is needed. The crop grid is built by hand from the predicted
translations (the scale is fixed), then sampled with ``grid_sample``: this avoids
``affine_grid``, whose ONNX export has a history of trouble, and exports with opset 16+.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import ConvBNReLU


class InceptionA(nn.Module):
    """Four parallel streams at stride 1, each out/4 channels, concatenated."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 4
        self.stream1 = nn.Sequential(ConvBNReLU(in_channels, mid, 1), ConvBNReLU(mid, mid, 3, padding=1))
        self.stream2 = nn.Sequential(
            ConvBNReLU(in_channels, mid, 1), ConvBNReLU(mid, mid, 3, padding=1), ConvBNReLU(mid, mid, 3, padding=1)
        )
        self.stream3 = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), ConvBNReLU(in_channels, mid, 1))
        self.stream4 = ConvBNReLU(in_channels, mid, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.stream1(x), self.stream2(x), self.stream3(x), self.stream4(x)], dim=1)


class InceptionB(nn.Module):
    """Reduction block: three streams at stride 2 (two conv, one max-pool), concatenated."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 4
        self.stream1 = nn.Sequential(ConvBNReLU(in_channels, mid, 1), ConvBNReLU(mid, mid, 3, stride=2, padding=1))
        self.stream2 = nn.Sequential(
            ConvBNReLU(in_channels, mid, 1),
            ConvBNReLU(mid, mid, 3, padding=1),
            ConvBNReLU(mid, mid, 3, stride=2, padding=1),
        )
        self.stream3 = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), ConvBNReLU(in_channels, mid * 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.stream1(x), self.stream2(x), self.stream3(x)], dim=1)


class SpatialAttention(nn.Module):
    """Cross-channel mean -> 3x3/2 conv -> bilinear back to h x w -> 1x1 conv: one map per image."""

    def __init__(self):
        super().__init__()
        self.conv1 = ConvBNReLU(1, 1, 3, stride=2, padding=1)
        self.conv2 = ConvBNReLU(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x.mean(dim=1, keepdim=True))
        y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.conv2(y)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: GAP -> 1x1 conv (c/r) -> 1x1 conv (c)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.squeeze = ConvBNReLU(channels, channels // reduction, 1)
        self.excite = ConvBNReLU(channels // reduction, channels, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.excite(self.squeeze(pooled))


class HarmoniousAttention(nn.Module):
    """Soft (spatial x channel, fused by 1x1 conv + sigmoid) and hard (T region translations) attention."""

    def __init__(self, channels: int, num_regions: int):
        super().__init__()
        self.num_regions = num_regions
        self.spatial = SpatialAttention()
        self.channel = ChannelAttention(channels)
        self.fuse = ConvBNReLU(channels, channels, 1)
        self.hard = nn.Linear(channels, 2 * num_regions)
        # Start from evenly spaced horizontal stripes: no x shift, y centres spread over [-1, 1].
        nn.init.zeros_(self.hard.weight)
        centres = torch.linspace(-1 + 1 / num_regions, 1 - 1 / num_regions, num_regions)
        with torch.no_grad():
            self.hard.bias.copy_(torch.stack([torch.zeros(num_regions), centres], dim=1).flatten())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = F.adaptive_avg_pool2d(x, 1)
        # Sigmoid of a ReLU output lies in [0.5, 1): attention re-weights, never zeroes, a feature.
        soft = torch.sigmoid(self.fuse(self.spatial(x) * self.channel(pooled)))
        translations = torch.tanh(self.hard(pooled.flatten(1))).view(-1, self.num_regions, 2)
        return soft, translations


def crop_regions(x: torch.Tensor, translations: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear crops of fixed scale (1/T of the height, full width) at predicted translations.

    x: N x C x H x W; translations: N x T x 2 (tx, ty) in normalised [-1, 1] coordinates.
    Returns (T*N) x C x h x w, region-major, so one shared-weight block processes all streams.
    """
    n, t = translations.shape[:2]
    h, w = out_size
    # Pixel centres of the output in [-1, 1] (align_corners=False convention).
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    tx = translations[..., 0].transpose(0, 1).reshape(t * n, 1, 1)
    ty = translations[..., 1].transpose(0, 1).reshape(t * n, 1, 1)
    grid_x = (xs.view(1, 1, w) + tx).expand(t * n, h, w)
    grid_y = (ys.view(1, h, 1) / t + ty).expand(t * n, h, w)
    grid = torch.stack([grid_x, grid_y], dim=-1)
    source = x.repeat(t, 1, 1, 1)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class HACNN(nn.Module):
    """Harmonious Attention CNN. Eval mode returns the 1024-d embedding (not normalised).

    Train mode returns ``{"embedding", "features": [global, local], "logits": [global, local]}``;
    classifiers exist only when ``num_classes > 0``.
    """

    arch = "hacnn"

    def __init__(
        self,
        num_classes: int = 0,
        widths: tuple[int, int, int] = (128, 256, 384),
        stem_channels: int = 32,
        feature_dim: int = 512,
        num_regions: int = 4,
        input_size: tuple[int, int] = (160, 64),
    ):
        super().__init__()
        self.config = {
            "widths": list(widths),
            "stem_channels": stem_channels,
            "feature_dim": feature_dim,
            "num_regions": num_regions,
            "input_size": list(input_size),
        }
        self.num_classes = num_classes
        self.num_regions = num_regions
        self.input_size = tuple(input_size)
        self.embedding_dim = 2 * feature_dim

        self.stem = ConvBNReLU(3, stem_channels, 3, stride=2, padding=1)
        ins = [stem_channels, *widths[:-1]]
        self.global_stages = nn.ModuleList(
            nn.Sequential(InceptionA(i, o), InceptionB(o, o)) for i, o in zip(ins, widths)
        )
        self.attentions = nn.ModuleList(HarmoniousAttention(o, num_regions) for o in widths)
        self.local_stages = nn.ModuleList(InceptionB(i, o) for i, o in zip(ins, widths))
        self.global_fc = nn.Sequential(
            nn.Linear(widths[-1], feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)
        )
        self.local_fc = nn.Sequential(
            nn.Linear(widths[-1] * num_regions, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)
        )
        if num_classes > 0:
            self.classifier_global = nn.Linear(feature_dim, num_classes)
            self.classifier_local = nn.Linear(feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.out_features != 2 * self.num_regions:
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        n = x.shape[0]
        t = self.num_regions
        x = self.stem(x)
        local = None
        for stage, attention, local_stage in zip(self.global_stages, self.attentions, self.local_stages):
            stage_input = x
            x = stage(stage_input)
            soft, translations = attention(x)
            x = x * soft
            h, w = stage_input.shape[2:]
            crops = crop_regions(stage_input, translations, ((h + t - 1) // t, w))
            local = local_stage(crops if local is None else crops + local)
        global_feature = self.global_fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        pooled = F.adaptive_avg_pool2d(local, 1).flatten(1)  # (T*N) x C, region-major
        local_feature = self.local_fc(pooled.view(t, n, -1).transpose(0, 1).reshape(n, -1))
        embedding = torch.cat([global_feature, local_feature], dim=1)
        if not self.training:
            return embedding
        out = {"embedding": embedding, "features": [global_feature, local_feature]}
        if self.num_classes > 0:
            out["logits"] = [self.classifier_global(global_feature), self.classifier_local(local_feature)]
        return out
