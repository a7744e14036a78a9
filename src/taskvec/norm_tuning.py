"""Normalisation-affine tuning: the Tent / SAR baseline that trains only the scale and shift of the
normalisation layers (BatchNorm, GroupNorm or LayerNorm), a few thousand numbers, as aTLAS's
coefficients are a few hundred. Running statistics stay frozen: train with ``TrainConfig(train_mode=
False)`` so the network stays in eval mode. Tent and SAR use SGD with momentum 0.9
(:func:`norm_sgd`); AdamW moves every small BN scale by the same step and can collapse predictions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def norm_affine_model(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose only trainable parameters are its normalisation layers' affine ones."""
    model = copy.deepcopy(base).requires_grad_(False).eval()
    count = 0
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(param, nn.Parameter):
                    param.requires_grad_(True)
                    count += param.numel()
    if count == 0:
        raise ValueError(f"{type(base).__name__} has no normalisation layer with affine parameters to tune")
    return model


def norm_sgd(lr: float, weight_decay: float = 0.0) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """Tent's and SAR's optimiser, as an ``optimizer_factory`` for :func:`taskvec.train.fit`."""

    def factory(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)

    return factory


_KINDS = {nn.BatchNorm1d: "BN", nn.BatchNorm2d: "BN", nn.BatchNorm3d: "BN", nn.GroupNorm: "GN", nn.LayerNorm: "LN"}


def norm_label(model: nn.Module) -> str:
    """What :func:`norm_affine_model` tunes in ``model``, for tables: ``"BN affine"`` on a CNN,
    ``"LN affine"`` on a transformer (the paper's "LN" row), ``"BN+LN affine"`` when both occur."""
    kinds = {_KINDS[type(m)] for m in model.modules() if type(m) in _KINDS
             and any(isinstance(getattr(m, n, None), nn.Parameter) for n in ("weight", "bias"))}
    if not kinds:
        raise ValueError(f"{type(model).__name__} has no normalisation layer with affine parameters to tune")
    return "+".join(sorted(kinds)) + " affine"
