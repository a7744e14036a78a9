"""``tiny_cnn``: a seeded, ~10k-parameter CNN for fast tests of everything built on backbones.

Why this shape: it has every block kind MobileNetV2 has (dense and depthwise conv weights, BatchNorm
scales/shifts and running statistics) plus a conv bias, so composer, merging and linearisation code is
exercised on all of them in milliseconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._init import seeded
from .registry import BackboneSpec, register_backbone, require_random_init

__all__ = ["TinyCNN"]


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()
    )


class TinyCNN(nn.Module):
    """conv-BN-ReLU (stride 2) -> depthwise conv-BN-ReLU -> 1x1 conv with bias -> conv-BN-ReLU -> avg pool."""

    def __init__(self, width: int = 16, seed: int | None = None) -> None:
        super().__init__()
        self.feature_dim = 2 * width
        with seeded(seed):
            self.features = nn.Sequential(
                _conv_bn_relu(3, width, stride=2),
                _conv_bn_relu(width, width, groups=width),
                nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=True), nn.ReLU()),
                _conv_bn_relu(2 * width, 2 * width, stride=2),
            )
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):  # non-trivial affine params, so they matter in tests
                    nn.init.uniform_(m.weight, 0.5, 1.5)
                    nn.init.uniform_(m.bias, -0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


def build_tiny_cnn(*, pretrained: bool = True, seed: int | None = 0, width: int = 16) -> TinyCNN:
    """Registry factory for ``tiny_cnn``; random init only."""
    require_random_init("tiny_cnn", pretrained)
    return TinyCNN(width=width, seed=seed)


register_backbone(
    "tiny_cnn",
    build_tiny_cnn,
    BackboneSpec(name="tiny_cnn", feature_dim=32, resolution=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
)
