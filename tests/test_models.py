"""Backbones and their registry: names, shapes, seeding, and behaviour under torch.func transforms."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from taskvec.models import (
    BackboneSpec,
    MobileNetV2,
    MobileNetV2Features,
    PretrainedUnavailableError,
    available_backbones,
    build_backbone,
    register_backbone,
)
from taskvec.models.vit import attention

ALL = ["mobilenet_v2", "tiny_cnn", "tiny_vit", "vit_small"]
# Inputs kept small: these tests check structure and maths, not accuracy.
RES = {"mobilenet_v2": 32, "tiny_cnn": 16, "tiny_vit": 16, "vit_small": 32}


def _random(name: str, seed: int = 0) -> tuple[nn.Module, BackboneSpec]:
    return build_backbone(name, pretrained=False, seed=seed)


def _images(name: str, batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 3, RES[name], RES[name], generator=g).to(dtype)


def _with_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BatchNorm buffers non-default values, so swapping buffers is actually tested."""
    model.train()
    with torch.no_grad():
        model(x * 2 + 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------- registry


def test_registry_lists_builtin_backbones() -> None:
    assert set(ALL) <= set(available_backbones())
    assert available_backbones() == sorted(available_backbones())


def test_unknown_backbone_names_the_available_ones() -> None:
    with pytest.raises(KeyError, match="mobilenet_v2"):
        build_backbone("resnet9000")


def test_register_rejects_a_second_factory_but_allows_reregistering() -> None:
    spec = BackboneSpec("tiny_cnn", 32, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny_cnn", lambda **kw: nn.Identity(), spec)
    with pytest.raises(ValueError, match="does not match"):
        register_backbone("other_name", lambda **kw: nn.Identity(), spec)
    from taskvec.models import tiny

    register_backbone("tiny_cnn", tiny.build_tiny_cnn, spec)  # identical: a no-op, e.g. on module reload


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_vit", "vit_small"])
def test_random_only_backbones_refuse_pretrained(name: str) -> None:
    with pytest.raises(PretrainedUnavailableError, match="pretrained=False"):
        build_backbone(name)  # pretrained=True is the default


def test_spec_follows_architecture_kwargs() -> None:
    model, spec = build_backbone("vit_small", pretrained=False, dim=64, heads=2, depth=1, img_size=48)
    assert (spec.feature_dim, spec.resolution) == (64, 48)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 64)
    assert build_backbone("vit_small", pretrained=False)[1].feature_dim == 192  # registry untouched


@pytest.mark.parametrize("name", ALL)
def test_output_shape_eval_mode_and_spec(name: str) -> None:
    model, spec = _random(name)
    assert isinstance(spec, BackboneSpec) and spec.name == name
    assert not model.training
    assert len(spec.mean) == len(spec.std) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.feature_dim = 1  # type: ignore[misc]
    out = model(_images(name, batch=3))
    assert out.shape == (3, spec.feature_dim)
    assert torch.isfinite(out).all()


# -------------------------------------------------------------------------------------- architecture


def test_mobilenet_v2_full_network_counts() -> None:
    """torchvision's MobileNetV2: 3,504,872 parameters in 158 tensors, 314 state-dict entries."""
    net = MobileNetV2().eval()
    assert sum(p.numel() for p in net.parameters()) == 3_504_872
    assert len(list(net.parameters())) == 158
    assert len(net.state_dict()) == 314
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert net.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1280)


def test_mobilenet_v2_backbone_is_the_full_net_without_classifier() -> None:
    full_names = set(MobileNetV2().state_dict())
    backbone, _ = _random("mobilenet_v2")
    names = set(backbone.state_dict())
    assert names <= full_names
    assert names == {n for n in full_names if not n.startswith("classifier.")}
    params = dict(backbone.named_parameters())
    assert all(n.startswith("features.") for n in params)
    assert len(params) == 156 and sum(p.numel() for p in params.values()) == 2_223_872
    assert not any(isinstance(m, nn.Linear) for m in backbone.modules())
    # first and last tensors exactly as torchvision names them
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.18.1.bias"} <= set(params)


def test_mobilenet_v2_backbone_equals_full_forward_features() -> None:
    full = MobileNetV2(seed=5).eval()
    backbone = MobileNetV2Features(seed=5).eval()
    backbone.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone(x), full.forward_features(x))


@pytest.mark.parametrize("name", ALL)
def test_backbones_carry_no_head(name: str) -> None:
    model, spec = _random(name)
    names = [n for n, _ in model.named_parameters()]
    assert not any(part in n.split(".") for n in names for part in ("classifier", "head", "fc"))
    # the last parameterised op has feature_dim outputs, not a class count
    last = [p for p in model.parameters()][-1]
    assert last.shape[0] == spec.feature_dim


def test_tiny_models_are_tiny_and_varied() -> None:
    cnn, _ = _random("tiny_cnn")
    vit, _ = _random("tiny_vit")
    assert sum(p.numel() for p in cnn.parameters()) < 50_000
    assert sum(p.numel() for p in vit.parameters()) < 50_000
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs), "needs a depthwise conv"
    assert any(c.bias is not None for c in convs), "needs a conv bias"
    assert any(isinstance(m, nn.BatchNorm2d) for m in cnn.modules())


def test_vit_small_size() -> None:
    model, spec = _random("vit_small")
    assert sum(p.numel() for p in model.parameters()) == 2_691_648
    assert spec.feature_dim == 192 and spec.resolution == 32


def test_vit_other_resolution_interpolates_position_grid() -> None:
    model, _ = _random("tiny_vit")
    x = torch.randn(2, 3, 24, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 32)
    out.pow(2).sum().backward()  # (a plain sum after LayerNorm has zero gradient)
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 3, 18, 16))


def test_attention_fast_and_math_kernels_agree() -> None:
    q, k, v = torch.randn(3, 2, 3, 17, 8).unbind(0)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), ref)


# ------------------------------------------------------------------------------------------- seeding


@pytest.mark.parametrize("name", ALL)
def test_seeded_construction_is_reproducible_and_leaves_global_rng(name: str) -> None:
    state = torch.get_rng_state()
    a, _ = _random(name, seed=7)
    b, _ = _random(name, seed=7)
    c, _ = _random(name, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


# ---------------------------------------------------------------------------------- torch.func transforms


@pytest.mark.parametrize("name", ALL)
def test_functional_call_with_swapped_weights_matches_loading_them(name: str) -> None:
    x = _images(name)
    a, _ = _random(name, seed=0)
    b = _with_running_stats(_random(name, seed=1)[0], x)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    swapped = {**dict(b.named_parameters()), **dict(b.named_buffers())}
    with torch.no_grad():
        out = functional_call(a, swapped, (x,))
        expected = b(x)
        a.load_state_dict(b.state_dict())
        loaded = a(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, loaded)
    # functional_call left the module's own tensors alone
    a.load_state_dict(before)
    assert not torch.allclose(functional_call(a, swapped, (x,)), a(x))


@pytest.mark.parametrize("name", ALL)
def test_jvp_agrees_with_reverse_mode_and_finite_differences(name: str) -> None:
    """Linearised task vectors need jvp through the backbone: check it two independent ways, in float64."""
    model, _ = _random(name)
    model = _with_running_stats(model, _images(name)).double()
    x = _images(name, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(11)
    tangents = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 1e-2 for k, v in params.items()}

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, p, (x,))

    primal, tangent = jvp(f, (params,), (tangents,))
    torch.testing.assert_close(primal, model(x))
    assert tangent.abs().max() > 1e-6
    # dot-product test: <u, J t> == <J^T u, t>, exact even at ReLU kinks
    u = torch.randn(primal.shape, generator=g, dtype=primal.dtype)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad((f(leaves) * u).sum(), list(leaves.values()))
    vjp_dot = sum((gr * tangents[k]).sum() for k, gr in zip(leaves, grads, strict=True))
    torch.testing.assert_close((tangent * u).sum(), vjp_dot, rtol=1e-9, atol=1e-12)
    # central finite differences (tiny step, so hardly any ReLU6 kink is crossed)
    eps = 1e-6
    with torch.no_grad():
        plus = f({k: v + eps * tangents[k] for k, v in params.items()})
        minus = f({k: v - eps * tangents[k] for k, v in params.items()})
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_vit"])
def test_vmap_over_parameter_sets_matches_a_loop(name: str) -> None:
    """Sample-specific composition runs one parameter set per sample with vmap over functional_call."""
    model, _ = _random(name)
    x = _images(name, batch=3)
    sets = [dict(_random(name, seed=s)[0].named_parameters()) for s in range(3)]
    stacked = {k: torch.stack([s[k].detach() for s in sets]) for k in sets[0]}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    out = vmap(one)(stacked, x)
    with torch.no_grad():
        ref = torch.stack([functional_call(model, sets[i], (x[i : i + 1],))[0] for i in range(3)])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name: str) -> None:
    model, _ = _random(name)
    model(_images(name)).pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
