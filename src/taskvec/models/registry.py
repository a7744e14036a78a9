"""Backbone registry: one name -> a factory and the facts callers need to feed it (size, normalisation).

Why a registry: recipes, benchmarks and the CLI pick a backbone by name, and the composer needs to know
the feature width and input normalisation without importing every architecture module itself.

A backbone maps float images ``(B, 3, H, W)``, normalised with ``spec.mean``/``spec.std``, to features
``(B, spec.feature_dim)``. Its parameters are exactly the blocks task vectors are made of, so it never
carries a classifier head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["BackboneSpec", "available_backbones", "build_backbone", "register_backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a registered backbone.

    ``resolution`` is the default input size for CPU work with this backbone (not necessarily the size it
    was pre-trained at); ``mean``/``std`` are the per-channel normalisation its inputs expect.
    """

    name: str
    feature_dim: int
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], BackboneSpec]] = {}


def register_backbone(name: str, factory: Callable[..., nn.Module], spec: BackboneSpec) -> None:
    """Register ``factory(pretrained=..., **kwargs) -> nn.Module`` under ``name``.

    Registering the same factory and spec again is a no-op (so re-importing a module is harmless);
    registering a different one under a taken name raises, so two modules cannot silently shadow each
    other.
    """
    if spec.name != name:
        raise ValueError(f"spec.name {spec.name!r} does not match the registered name {name!r}")
    if len(spec.mean) != 3 or len(spec.std) != 3:
        raise ValueError(f"{name}: mean and std need 3 channels, got {spec.mean} and {spec.std}")
    old = _REGISTRY.get(name)
    if old is not None:
        old_factory, old_spec = old
        same_factory = old_factory is factory or (
            getattr(old_factory, "__module__", None) == getattr(factory, "__module__", None)
            and getattr(old_factory, "__qualname__", None) == getattr(factory, "__qualname__", None)
        )
        if not (same_factory and old_spec == spec):
            raise ValueError(f"backbone {name!r} is already registered with another factory or spec")
    _REGISTRY[name] = (factory, spec)


def available_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def build_backbone(name: str, *, pretrained: bool = True, **kwargs) -> tuple[nn.Module, BackboneSpec]:
    """Build a registered backbone in eval mode and return it with its spec.

    ``kwargs`` go to the factory (e.g. ``seed`` for random init, architecture sizes). When they change
    the architecture, the returned spec follows the module: a module attribute ``feature_dim`` or
    ``default_resolution`` overrides the registered value. Eval mode because task vectors are
    fine-tuned with BatchNorm statistics frozen; call ``.train()`` yourself if you want otherwise.
    """
    try:
        factory, spec = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; available: {available_backbones()}") from None
    model = factory(pretrained=pretrained, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory for {name!r} returned {type(model).__name__}, not an nn.Module")
    updates: dict[str, int] = {}
    for attr, field in (("feature_dim", "feature_dim"), ("default_resolution", "resolution")):
        value = getattr(model, attr, None)
        if isinstance(value, int) and value != getattr(spec, field):
            updates[field] = value
    if updates:
        spec = dataclasses.replace(spec, **updates)
    return model.eval(), spec


class PretrainedUnavailableError(RuntimeError):
    """Asked for pretrained weights of a backbone that has none offline."""


def require_random_init(name: str, pretrained: bool) -> None:
    """Fail clearly when ``pretrained=True`` is asked of a backbone that only has random init."""
    if pretrained:
        raise PretrainedUnavailableError(
            f"backbone {name!r} has no pretrained weights available offline; build it with random init: "
            f"build_backbone({name!r}, pretrained=False, seed=0)"
        )
