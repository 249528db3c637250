"""Dense-prediction models for the dense suite: a shared MobileNetV2 hypercolumn encoder and small per-task decoders.

Encoder: MobileNetV2 `features.0` ... `features.13` (ImageNet weights; stride 16), whose activations after blocks 3
(24 channels, stride 4), 6 (32, stride 8) and 13 (96, stride 16) are upsampled to stride 4 and concatenated: one
[B, 152, H/4, W/4] map, so every merge method, the adaptive trainer and Surgery's feature adapter see a single
tensor. The upsampling and concatenation have no parameters; the merged tensors are MobileNetV2's own.

Decoder (the task-specific layer): 1x1 conv -> ReLU -> 3x3 conv -> ReLU -> 1x1 conv -> bilinear upsampling to the
input size. Segmentation returns class logits, depth a [B, 1, H, W] map, normals unit vectors [B, 3, H, W].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symerge.models.mobilenet import channels_last, load_imagenet_mobilenet_v2, mobilenet_v2_features

TAPS = (3, 6, 13)
"""Indices of `features` whose outputs form the hypercolumn (strides 4, 8, 16)."""
TAP_CHANNELS = (24, 32, 96)
DENSE_KINDS = ("segmentation", "depth", "normals")


class MobileNetV2Hypercolumn(nn.Module):
    """Images [B, 3, H, W] -> hypercolumn features [B, 152, H/4, W/4]. Keys stay `features.0` ... `features.13`."""

    feature_dim = sum(TAP_CHANNELS)

    def __init__(self, features: nn.Sequential | None = None):
        super().__init__()
        features = features if features is not None else mobilenet_v2_features()
        self.features = nn.Sequential(*list(features)[: TAPS[-1] + 1])

    def forward(self, x: Tensor) -> Tensor:
        taps = []
        h = channels_last(x)
        for index, block in enumerate(self.features):
            h = block(h)
            if index in TAPS:
                taps.append(h)
        size = taps[0].shape[-2:]
        return torch.cat([taps[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                                      for t in taps[1:]], dim=1)


class DenseDecoder(nn.Module):
    """Per-task decoder; `kind` decides the output: logits, a depth map, or unit normals."""

    def __init__(self, in_channels: int, out_channels: int, kind: str, hidden: int = 64, upsample: int = 4,
                 output_bias: float = 0.0):
        super().__init__()
        if kind not in DENSE_KINDS:
            raise ValueError(f"decoder kind must be one of {DENSE_KINDS}, got '{kind}'")
        self.kind, self.upsample = kind, upsample
        self.reduce = nn.Conv2d(in_channels, hidden, 1)
        self.mix = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, out_channels, 1)
        nn.init.constant_(self.out.bias, output_bias)

    def forward(self, features: Tensor) -> Tensor:
        h = F.relu(self.mix(F.relu(self.reduce(features))))
        y = F.interpolate(self.out(h), scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return F.normalize(y, dim=1) if self.kind == "normals" else y.contiguous()


def decoder_for(kind: str, num_classes: int, seed: int, in_channels: int = MobileNetV2Hypercolumn.feature_dim,
                mean_depth: float = 5.0, hidden: int = 64) -> DenseDecoder:
    """A freshly initialised (seeded) decoder for one dense task."""
    torch.manual_seed(seed)
    out = {"segmentation": num_classes, "depth": 1, "normals": 3}[kind]
    return DenseDecoder(in_channels, out, kind, hidden=hidden, output_bias=mean_depth if kind == "depth" else 0.0)


def load_dense_encoder(path: str | Path | None = None) -> MobileNetV2Hypercolumn:
    """The pretrained hypercolumn encoder (ImageNet MobileNetV2 blocks 0-13), eval mode."""
    return MobileNetV2Hypercolumn(load_imagenet_mobilenet_v2(path).features).eval()
