"""LoRA fine-tuning with peft: the right modules get adapters, training lowers the loss, and the saved
adapter directory merges (peft's merge_and_unload) to exactly the delta the trained factors define."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from taskvec.io import load_state_dict
from taskvec.lora_train import (
    LoraSpec,
    adapter_parameter_count,
    lora_target_modules,
    merged_delta,
    resolve_targets,
    save_adapter,
    train_lora,
)
from taskvec.models.tiny import TinyCNN
from taskvec.models.vit import VisionTransformer
from taskvec.train import Loader, TrainConfig
from taskvec.vectors import LoraTaskVector, fingerprint, parameter_blocks


def _vit() -> VisionTransformer:
    return VisionTransformer(img_size=8, patch_size=4, dim=16, depth=2, heads=2, mlp_ratio=2.0, seed=0).eval()


def _regression_task(model: nn.Module, shape, outputs: int, seed: int = 0):
    """Inputs and targets from a random linear readout of a *shifted* model: something to learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, *shape, generator=g)
    with torch.no_grad():
        y = model(x) + 0.5 * torch.randn(16, outputs, generator=g)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    return batches, Loader(lambda _g: batches, steps=len(batches))


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_target_sets_on_vit_and_cnn():
    vit = _vit()
    attention = lora_target_modules(vit, "attention")
    mlp = lora_target_modules(vit, "mlp")
    assert attention == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert mlp == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert sorted(lora_target_modules(vit, "both")) == sorted(attention + mlp)  # no patch embedding, no head
    cnn = TinyCNN(seed=0)
    assert lora_target_modules(cnn, "conv1x1") == ["features.2.0"]
    with pytest.raises(ValueError, match="match no module of TinyCNN"):
        lora_target_modules(cnn, "attention")
    with pytest.raises(KeyError, match="nope"):
        lora_target_modules(cnn, ["nope"])


def test_auto_targets_fit_the_architecture():
    """`auto` (the recipes' default) is attention + MLP on a transformer and the 1x1 convolutions on a CNN."""
    vit, cnn = _vit(), TinyCNN(seed=0)
    assert resolve_targets(vit, "auto") == "both" and resolve_targets(cnn, "auto") == "conv1x1"
    assert lora_target_modules(vit, "auto") == lora_target_modules(vit, "both")
    assert lora_target_modules(cnn, "auto") == ["features.2.0"]
    assert resolve_targets(cnn, "mlp") == "mlp"  # a named set is left as asked
    with pytest.raises(ValueError, match="neither"):
        resolve_targets(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), "auto")


def _factor_delta(peft_model: nn.Module, module: str, shape: torch.Size, scale: float) -> torch.Tensor:
    """Independent oracle: scale * B @ A from the trained peft layer's factor weights."""
    layer = peft_model.get_submodule(f"base_model.model.{module}")
    a = layer.lora_A["default"].weight.detach().reshape(layer.lora_A["default"].weight.shape[0], -1)
    b = layer.lora_B["default"].weight.detach().reshape(layer.lora_B["default"].weight.shape[0], -1)
    return (scale * (b @ a)).reshape(shape)


@pytest.mark.parametrize("targets", ["attention", "mlp", "both"])
def test_vit_adapter_round_trip(tmp_path, targets):
    vit = _vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    batches, loader = _regression_task(vit, (3, 8, 8), 16)
    spec = LoraSpec(rank=2, alpha=4.0, targets=targets)
    config = TrainConfig(epochs=6, lr=2e-2, train_mode=False, progress=False, select_initial=False, warmup_fraction=0)
    run = train_lora(vit, mse, loader, spec, config)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # the caller's model is untouched
    losses = [record.loss for record in run.result.history]
    assert losses[-1] < losses[0]
    assert run.info["trainable"] == adapter_parameter_count(run.model) == sum(
        2 * (vit.get_submodule(m).in_features + vit.get_submodule(m).out_features) for m in run.targets)

    out = save_adapter(run, tmp_path / "adapter", vit, name="toy")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    record = json.loads((out / "taskvec.json").read_text())
    blocks = parameter_blocks(vit)
    assert record["base_fingerprint"] == fingerprint({f"{m}.weight": blocks[f"{m}.weight"] for m in run.targets})
    config_json = json.loads((out / "adapter_config.json").read_text())
    assert config_json["r"] == 2 and config_json["lora_alpha"] == 4.0

    delta = merged_delta(vit, out)
    assert sorted(delta) == sorted(f"{m}.weight" for m in run.targets)  # only adapted weights change
    for module in run.targets:
        expected = _factor_delta(run.model, module, blocks[f"{module}.weight"].shape, spec.scale)
        assert float(expected.abs().max()) > 0  # training moved B away from its zero init
        assert torch.allclose(delta[f"{module}.weight"], expected, atol=1e-6)
    # the existing PEFT-key reader sees the same delta, so a bank of these adapters composes exactly
    adapter = load_state_dict(out / "adapter_model.safetensors")
    lora = LoraTaskVector.from_peft_state_dict(adapter, vit, alpha=4.0, rank=2)
    assert sorted(lora.names) == sorted(delta)
    for name in lora.names:
        assert torch.allclose(lora.dense_block(name), delta[name], atol=1e-6)
    # and the merged network computes what the adapter-wrapped network computes
    merged = vit.__class__(img_size=8, patch_size=4, dim=16, depth=2, heads=2, mlp_ratio=2.0, seed=0).eval()
    with torch.no_grad():
        for name, param in merged.named_parameters():
            param.add_(delta.get(name, torch.zeros_like(param)))
        assert torch.allclose(merged(batches[0][0]), run.model(batches[0][0]), atol=1e-5)

    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_adapter(run, out, vit)


def test_cnn_pointwise_adapter(tmp_path):
    cnn = TinyCNN(seed=0).eval()
    _, loader = _regression_task(cnn, (3, 16, 16), 32, seed=1)
    spec = LoraSpec(rank=3, targets="conv1x1")
    config = TrainConfig(epochs=4, lr=2e-2, train_mode=False, progress=False, select_initial=False)
    run = train_lora(cnn, mse, loader, spec, config)
    running = cnn.features[0][1].running_mean.clone()
    out = save_adapter(run, tmp_path / "cnn", cnn)
    delta = merged_delta(cnn, out)
    assert list(delta) == ["features.2.0.weight"]
    expected = _factor_delta(run.model, "features.2.0", cnn.features[2][0].weight.shape, spec.scale)
    assert float(expected.abs().max()) > 0
    assert torch.allclose(delta["features.2.0.weight"], expected, atol=1e-6)
    assert torch.equal(run.model.get_submodule("base_model.model.features.0.1").running_mean, running)  # eval mode


def test_spec_validation():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSpec(rank=0)
    assert LoraSpec(rank=8).scale == 1.0 and LoraSpec(rank=8, alpha=16).scale == 2.0
