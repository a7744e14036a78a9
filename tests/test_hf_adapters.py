"""PEFT LoRA adapters as LoRA task vectors: equal to peft's own merge_and_unload, or refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import bert, gpt2, lora_adapter, save
from safetensors.torch import load_file, save_file

from taskvec.cli import main
from taskvec.hf.adapters import AdapterError, load_adapter
from taskvec.vectors import LoraTaskVector, load_task_vector

# peft and transformers 5 warn about their own deprecated internals on every model built or loaded.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _max_diff(model, oracle) -> float:
    mine, theirs = model.state_dict(), oracle.state_dict()
    return max(float((mine[k] - theirs[k]).abs().max()) for k in theirs)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = bert(0)
    return model, save(model, tmp_path_factory.mktemp("base") / "bert", shard="20KB")


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"]),
        dict(r=4, lora_alpha=8, target_modules=["query", "key", "dense"], use_rslora=True),
        dict(r=4, lora_alpha=8, target_modules=["query", "value"],
             rank_pattern={"layer.1.attention.self.query": 2}, alpha_pattern={"value": 3}),
    ],
    ids=["plain+embedding", "rslora", "rank_alpha_pattern"],
)
def test_adapter_equals_peft_merge(base, tmp_path, config):
    model, base_dir = base
    oracle = lora_adapter(model, tmp_path / "adapter", **config)
    vector = load_adapter(tmp_path / "adapter", base_dir)
    assert isinstance(vector, LoraTaskVector)
    merged = vector.apply_to(model)
    assert _max_diff(merged, oracle) <= 1e-6
    if "rank_pattern" in config:
        assert vector.rank["encoder.layer.1.attention.self.query.weight"] == 2
        assert vector.rank["encoder.layer.0.attention.self.query.weight"] == 4
    # the same from a module instead of a directory, and through the CLI
    again = load_adapter(tmp_path / "adapter", model)
    assert again.base_fingerprint == vector.base_fingerprint
    out = tmp_path / "lora.safetensors"
    assert main(["vector", "make", str(base_dir), str(tmp_path / "adapter"), "-o", str(out)]) == 0
    assert _max_diff(load_task_vector(out).apply_to(model), oracle) <= 1e-6
    assert main(["vector", "info", str(out)]) == 0


def test_fan_in_fan_out_gpt2(tmp_path):
    model = gpt2(0)
    base_dir = save(model, tmp_path / "gpt2")
    oracle = lora_adapter(model, tmp_path / "adapter", r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"],
                          fan_in_fan_out=True)
    vector = load_adapter(tmp_path / "adapter", base_dir)
    assert vector.shapes["h.0.attn.c_attn.weight"] == (32, 96)  # Conv1D: (in, out)
    assert _max_diff(vector.apply_to(model), oracle) <= 1e-6


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (dict(target_modules=["query"], use_dora=True), "lora_magnitude_vector"),
        (dict(target_modules=["query"], modules_to_save=["pooler.dense"]), "pooler.dense"),
        (dict(target_modules=["query"], bias="lora_only"), "base_layer.bias"),
    ],
    ids=["dora", "modules_to_save", "bias"],
)
def test_unrepresentable_adapters_are_refused_by_name(base, tmp_path, config, named):
    model, base_dir = base
    lora_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, **config)
    with pytest.raises(AdapterError, match=named):
        load_adapter(tmp_path / "adapter", base_dir)
    out = tmp_path / "lora.safetensors"
    assert main(["vector", "make", str(base_dir), str(tmp_path / "adapter"), "-o", str(out)]) == 2
    assert not out.exists()


def test_unknown_key_is_refused_by_name(base, tmp_path):
    model, base_dir = base
    lora_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["query"])
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.encoder.layer.0.attention.self.query.lora_X.weight"] = torch.zeros(2)
    save_file(tensors, str(file))
    with pytest.raises(AdapterError, match="lora_X"):
        load_adapter(tmp_path / "adapter", base_dir)


def test_adapter_for_another_base_is_refused(base, tmp_path):
    _, base_dir = base
    other = bert(0, hidden_size=48, intermediate_size=96)
    lora_adapter(other, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["query"])
    with pytest.raises(AdapterError, match="another base") as info:
        load_adapter(tmp_path / "adapter", base_dir)
    assert str(base_dir) in str(info.value)
    # a declared base name that differs from the one the user names
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "org/other-model"
    config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="org/other-model"):
        load_adapter(tmp_path / "adapter", other, base_model_name_or_path="org/my-model")
