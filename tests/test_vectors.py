from __future__ import annotations

import math
import pickle

import pytest
import torch
from conftest import make_bank, make_base, perturbed
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from taskvec.io import CheckpointError, load_state_dict
from taskvec.vectors import (
    BaseMismatchError,
    LoraTaskVector,
    TaskVector,
    fingerprint,
    load_task_vector,
    parameter_blocks,
)


def _vector(seed: int, dtype: torch.dtype = torch.float32) -> TaskVector:
    generator = torch.Generator().manual_seed(seed)
    tensors = {"a.weight": torch.randn(3, 4, generator=generator), "a.bias": torch.randn(3, generator=generator)}
    return TaskVector({k: v.to(dtype) for k, v in tensors.items()}, metadata={"base_fingerprint": "f00d"})


def _close(x: TaskVector, y: TaskVector, atol: float = 1e-5) -> bool:
    return x.names == y.names and all(torch.allclose(x[k].float(), y[k].float(), atol=atol) for k in x.names)


def test_blocks_are_parameters_not_buffers(base):
    vector = TaskVector.from_models(base, perturbed(base, 0), name="t")
    assert set(vector.names) == set(parameter_blocks(base))
    assert not any(name.endswith(("running_mean", "running_var", "num_batches_tracked")) for name in vector.names)
    assert vector.numel() == sum(p.numel() for p in base.parameters())


def test_difference_is_finetuned_minus_base(base):
    finetuned = perturbed(base, 1)
    vector = TaskVector.from_models(base, finetuned)
    for name, param in finetuned.named_parameters():
        assert torch.allclose(vector[name], param - dict(base.named_parameters())[name])


def test_changed_buffers_warn(base):
    finetuned = perturbed(base, 1)
    finetuned.bn.running_mean.add_(1.0)
    with pytest.warns(UserWarning, match="running_mean"):
        TaskVector.from_models(base, finetuned)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 10_000), st.floats(-4, 4))
def test_arithmetic_laws(s1, s2, s3, alpha):
    a, b, c = _vector(s1), _vector(s2), _vector(s3)
    assert _close(a + b, b + a)
    assert _close((a + b) + c, a + (b + c), atol=1e-4)
    assert _close(a - a, a * 0.0)
    assert _close(-a.__neg__(), a)
    assert _close(2 * a, a + a)
    assert _close(alpha * a, a * alpha)
    assert _close(alpha * (a + b), alpha * a + alpha * b, atol=1e-4)
    assert _close(sum([a, b, c]), a + b + c, atol=1e-4)
    assert _close(a / 2.0, a * 0.5)
    assert math.isclose(a.dot(a), a.norm() ** 2, rel_tol=1e-9)
    assert math.isclose(a.dot(b), b.dot(a), rel_tol=1e-12)
    assert -1.0 - 1e-9 <= a.cosine(b) <= 1.0 + 1e-9
    assert math.isclose(a.cosine(3.0 * a), 1.0, rel_tol=1e-6)


def test_low_precision_storage_computes_in_fp32():
    a = _vector(1, torch.bfloat16)
    assert a.dtype == torch.bfloat16
    doubled = a + a
    assert doubled.dtype == torch.bfloat16
    assert torch.equal(doubled["a.weight"], (a["a.weight"].float() * 2).to(torch.bfloat16))
    assert a.to(torch.float32).dtype == torch.float32
    assert math.isclose(a.norm(), a.to(torch.float32).norm(), rel_tol=1e-9)


def test_save_load_round_trip(tmp_path, base, bank):
    path = bank[0].save(tmp_path / "t.safetensors")
    loaded = TaskVector.load(path)
    assert _close(loaded, bank[0], atol=0)
    assert loaded.base_fingerprint == bank[0].base_fingerprint == fingerprint(parameter_blocks(base))
    assert loaded.name == "task0"
    half = TaskVector.load(bank[0].save(tmp_path / "h.safetensors", dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert isinstance(load_task_vector(path), TaskVector)


def test_apply_to_returns_new_model_and_leaves_input(base, images):
    finetuned = perturbed(base, 2)
    vector = TaskVector.from_models(base, finetuned)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    applied = vector.apply_to(base)
    assert applied is not base
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert torch.allclose(applied(images), finetuned(images), atol=1e-5)
    assert torch.allclose(vector.apply_to(base, 0.0)(images), base(images))


def test_vector_from_one_base_refused_on_another(bank):
    other = make_base(seed=1)
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        bank[0].apply_to(other)
    foreign = make_bank(other, 1)[0]
    with pytest.raises(BaseMismatchError, match="different base"):
        _ = bank[0] + foreign
    bank[0].apply_to(other, check_base=False)  # explicit opt-out works


def test_fingerprint_survives_bf16_base(base):
    blocks = parameter_blocks(base)
    assert fingerprint(blocks) == fingerprint({k: v.to(torch.bfloat16) for k, v in blocks.items()})


def test_from_checkpoints_pt_and_safetensors(tmp_path, base):
    finetuned = perturbed(base, 3)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    save_file({k: v.contiguous() for k, v in finetuned.state_dict().items()}, tmp_path / "ft.safetensors")
    vector = TaskVector.from_checkpoints(tmp_path / "base.pt", tmp_path / "ft.safetensors", name="x")
    reference = TaskVector.from_models(base, finetuned)
    assert _close(vector, reference, atol=0)


def test_missing_and_extra_keys_named(base):
    state = base.state_dict()
    finetuned = dict(perturbed(base, 0).state_dict())
    finetuned.pop("fc.bias")
    finetuned["extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"missing keys: fc\.bias.*unexpected keys: extra\.weight"):
        TaskVector.from_state_dicts(state, finetuned)


def test_shape_mismatch_named(base):
    finetuned = dict(perturbed(base, 0).state_dict())
    finetuned["fc.weight"] = torch.zeros(7, 8)
    with pytest.raises(CheckpointError, match=r"fc\.weight.*\(5, 8\).*\(7, 8\)"):
        TaskVector.from_state_dicts(base.state_dict(), finetuned)


def test_non_float_block_refused():
    with pytest.raises(TypeError, match="'a' has dtype torch.int64"):
        TaskVector({"a": torch.arange(3)})


def test_nan_and_inf_refused(base):
    finetuned = dict(perturbed(base, 0).state_dict())
    finetuned["conv.weight"] = finetuned["conv.weight"].clone()
    finetuned["conv.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"conv\.weight.*NaN"):
        TaskVector.from_state_dicts(base.state_dict(), finetuned)
    with pytest.raises(ValueError, match="'b' has 1 NaN/Inf"):
        TaskVector({"b": torch.tensor([1.0, float("inf")])})


def test_truncated_and_non_tensor_files(tmp_path, bank):
    path = bank[0].save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        TaskVector.load(truncated)
    text = tmp_path / "notes.pt"
    torch.save({"weight": torch.zeros(2), "note": "hello"}, text)
    with pytest.raises(CheckpointError, match=r"notes\.pt.*not tensors.*note"):
        load_state_dict(text)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.bin"):
        load_state_dict(garbage)
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "absent.safetensors")


class _Custom:
    pass


def test_full_pickle_needs_opt_in(tmp_path):
    path = tmp_path / "pickled.pt"
    with path.open("wb") as handle:
        pickle.dump({"w": torch.zeros(2), "obj": _Custom()}, handle)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_state_dict(path)


def test_empty_vector_refused():
    with pytest.raises(ValueError, match="at least one block"):
        TaskVector({})


def test_lora_dense_block_and_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 12, generator=generator), torch.randn(4, 2, generator=generator)
    lora = LoraTaskVector({"conv.weight": (a, b)}, {"conv.weight": (4, 3, 2, 2)}, 0.5, metadata={"name": "l"})
    assert torch.allclose(lora.dense_block("conv.weight"), 0.5 * (b @ a).reshape(4, 3, 2, 2))
    assert lora.storage_numel() == a.numel() + b.numel()
    loaded = load_task_vector(lora.save(tmp_path / "l.safetensors"))
    assert isinstance(loaded, LoraTaskVector)
    assert torch.equal(loaded.dense_block("conv.weight"), lora.dense_block("conv.weight"))
    assert torch.allclose((-lora).dense_block("conv.weight"), -lora.dense_block("conv.weight"))
    with pytest.raises(ValueError, match=r"B @ A is 4x12 but the block \(5, 3, 2, 2\)"):
        LoraTaskVector({"conv.weight": (a, b)}, {"conv.weight": (5, 3, 2, 2)})


def test_lora_from_peft_keys(base):
    generator = torch.Generator().manual_seed(0)
    adapter = {
        "base_model.model.fc.lora_A.weight": torch.randn(2, 8, generator=generator),
        "base_model.model.fc.lora_B.weight": torch.randn(5, 2, generator=generator),
    }
    lora = LoraTaskVector.from_peft_state_dict(adapter, base, alpha=4, rank=2)
    assert lora.names == ["fc.weight"]
    assert torch.allclose(
        lora.dense_block("fc.weight"),
        2.0 * adapter["base_model.model.fc.lora_B.weight"] @ adapter["base_model.model.fc.lora_A.weight"],
    )
    lora.check_base(base)
