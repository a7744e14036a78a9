"""Backbones and their registry: MobileNetV2 (ImageNet weights offline), a small ViT, and tiny test models.

Importing this package registers every built-in backbone; pick one with :func:`build_backbone`.
"""

from . import hf, mobilenet_v2, tiny, vit  # noqa: F401  (registration side effects)
from .mobilenet_v2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MobileNetV2,
    MobileNetV2Features,
    PretrainedWeightsError,
    imagenet_weights_path,
    load_imagenet_weights,
)
from .registry import (
    BackboneSpec,
    PretrainedUnavailableError,
    available_backbones,
    build_backbone,
    register_backbone,
)
from .tiny import TinyCNN
from .vit import CLIP_MEAN, CLIP_STD, VisionTransformer

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "MobileNetV2",
    "MobileNetV2Features",
    "PretrainedUnavailableError",
    "PretrainedWeightsError",
    "TinyCNN",
    "VisionTransformer",
    "available_backbones",
    "build_backbone",
    "imagenet_weights_path",
    "load_imagenet_weights",
    "register_backbone",
]
