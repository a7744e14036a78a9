"""The negation control rule and normalisation-affine tuning (BatchNorm and LayerNorm)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_base
from torch import nn

from taskvec.control import control_kept, default_control, negation_score
from taskvec.norm_tuning import norm_affine_model, norm_sgd
from taskvec.train import TrainConfig, fit


def test_control_rule_orders_states():
    assert control_kept(0.72, 0.80, 0.9)  # 72/100 against 0.9 x 80/100, rounding allowed
    assert not control_kept(0.70, 0.80, 0.9)
    kept_low, kept_high = negation_score(0.1, 0.9, 0.9), negation_score(0.4, 0.9, 0.9)
    lost = negation_score(0.0, 0.5, 0.9)
    assert kept_low > kept_high > lost  # the lowest target among states that keep the control, then the rest
    assert default_control("a", "a", "b") == "b" and default_control("c", "a", "b") == "a"
    with pytest.raises(ValueError, match="fraction"):
        control_kept(0.5, 0.5, 1.5)
    with pytest.raises(ValueError, match="differ"):
        default_control("a", "b", "b")


def test_norm_affine_tuning_trains_only_bn_and_ln_affines():
    base = make_base()  # conv, BatchNorm2d, depthwise conv, LayerNorm, linear
    model = norm_affine_model(base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bn.weight", "bn.bias", "norm.weight", "norm.bias"}
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    fit(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), [(x, y)],
        TrainConfig(epochs=2, lr=0.1, train_mode=False, progress=False), optimizer_factory=norm_sgd(0.1))
    state, original = dict(model.named_parameters()), dict(base.named_parameters())
    for name in state:
        assert torch.equal(state[name], original[name]) != (name in trainable), name  # only the affines moved
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name])  # running statistics frozen
    with pytest.raises(ValueError, match="no normalisation layer"):
        norm_affine_model(nn.Linear(3, 2))
