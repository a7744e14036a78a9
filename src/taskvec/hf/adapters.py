"""PEFT LoRA adapter directories as :class:`~taskvec.vectors.LoraTaskVector`, exactly or not at all.

Why so strict: a task vector that silently drops part of an adapter (a DoRA magnitude, a fully trained
``modules_to_save`` copy, a trained bias) composes into a different model than the one that was trained.
So everything the factor form ``scale * B @ A`` cannot hold is refused, naming the key.

What is translated: PEFT module names to the base's parameter names, the scale ``lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with rsLoRA) with ``rank_pattern`` / ``alpha_pattern`` resolved the way PEFT
resolves them, and the transposed layouts (``fan_in_fan_out`` Conv1D weights, embedding LoRA), which are
stored by swapping and transposing the factors so that ``B @ A`` is the delta itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taskvec.io import CheckpointError, PathLike, load_state_dict
from taskvec.vectors import LoraTaskVector, fingerprint, parameter_blocks

PREFIX = "base_model.model."
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
#: Config switches whose adapters are not a plain ``scale * B @ A`` on an unchanged base.
_UNSUPPORTED_SWITCHES = (
    "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens",
    "use_bdlora", "megatron_config", "lora_bias",
)
#: Initialisations that also rewrite the base weights, so the adapter is relative to another base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterError(CheckpointError):
    """A PEFT adapter taskvec cannot represent exactly, or one made for another base."""


def read_adapter_config(adapter_dir: PathLike) -> dict[str, Any]:
    file = Path(adapter_dir) / "adapter_config.json"
    if not file.is_file():
        raise AdapterError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{file}: not readable JSON ({err})") from err
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are task vectors")
    return config


def _adapter_weights(adapter_dir: Path) -> dict[str, Tensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return load_state_dict(adapter_dir / name)  # .bin goes through weights_only
    raise AdapterError(f"{adapter_dir}: holds neither adapter_model.safetensors nor adapter_model.bin")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first pattern that matches the module name
    as a whole or as a dotted suffix wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _check_config(config: Mapping[str, Any], weights: Mapping[str, Tensor], where: Path) -> None:
    if config.get("use_dora"):
        keys = [k for k in weights if "lora_magnitude_vector" in k] or ["use_dora"]
        raise AdapterError(
            f"{where}: DoRA adapter (magnitude vectors {keys[:3]}): its weight change is not B @ A and cannot "
            "be a LoRA task vector"
        )
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{where}: modules_to_save {config['modules_to_save']} are fully trained copies, not LoRA factors; "
            "make a dense task vector from the merged model instead"
        )
    if config.get("bias", "none") != "none":
        keys = [k for k in weights if k.endswith(".bias")]
        raise AdapterError(
            f"{where}: bias={config['bias']!r} trains biases ({keys[:3]}), which LoRA factors cannot hold"
        )
    switches = [key for key in _UNSUPPORTED_SWITCHES if config.get(key) not in (None, False, [], {}, 0)]
    if switches:
        raise AdapterError(f"{where}: adapter uses {switches}, which taskvec cannot represent as B @ A factors")
    init = str(config.get("init_lora_weights", "")).lower()
    if any(init.startswith(kind) for kind in _BASE_CHANGING_INITS):
        raise AdapterError(f"{where}: init_lora_weights={init!r} also changes the base weights; convert it first")


def _group(weights: Mapping[str, Tensor], where: Path) -> dict[str, dict[str, Any]]:
    """{module name: {"A": tensor, "B": tensor, "embedding": bool}}; unknown keys refused by name."""
    modules: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for key, tensor in weights.items():
        for suffix, (factor, embedding) in _FACTOR_SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix(PREFIX)
                entry = modules.setdefault(module, {"embedding": embedding})
                entry[factor] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        hint = ""
        if any("magnitude" in k for k in unknown):
            hint = " (DoRA magnitude vectors)"
        elif any(k.endswith(".bias") for k in unknown):
            hint = " (trained biases)"
        raise AdapterError(f"{where}: keys that are not LoRA factors{hint}: {sorted(unknown)[:5]}")
    for module, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            missing = "lora_B" if "B" not in entry else "lora_A"
            raise AdapterError(f"{where}: module '{module}' has no {missing} factor")
    if not modules:
        raise AdapterError(f"{where}: adapter holds no LoRA factors")
    return modules


def _factors(entry: Mapping[str, Any], transpose: bool) -> tuple[Tensor, Tensor]:
    """(A, B) with ``B @ A`` the delta in the base weight's own layout (flattened past dim 0)."""
    a, b = entry["A"], entry["B"]
    if b.dim() > 2:
        if any(size != 1 for size in b.shape[2:]):
            raise ValueError(f"lora_B has kernel {tuple(b.shape[2:])}; only 1x1 up-projections are plain products")
        b = b.reshape(b.shape[0], b.shape[1])
    a = a.reshape(a.shape[0], -1)
    if transpose:  # delta = (B @ A)^T = A^T @ B^T: swap roles
        return b.T.contiguous(), a.T.contiguous()
    return a, b


def _base_blocks(base: PathLike | nn.Module | Mapping[str, Tensor]) -> tuple[Mapping[str, Tensor], str]:
    if isinstance(base, nn.Module):
        return parameter_blocks(base), type(base).__name__
    if isinstance(base, Mapping):
        return base, "base state dict"
    from taskvec.hf.checkpoints import open_weights

    return open_weights(base), str(base)


def load_adapter(
    adapter_dir: PathLike,
    base: PathLike | nn.Module | Mapping[str, Tensor],
    *,
    name: str = "",
    base_model_name_or_path: str | None = None,
) -> LoraTaskVector:
    """A PEFT LoRA adapter directory as a :class:`LoraTaskVector` on ``base`` (a model directory or file,
    a module, or a state dict). ``base_model_name_or_path``, when given, must match the adapter's own."""
    where = Path(adapter_dir)
    config = read_adapter_config(where)
    declared = config.get("base_model_name_or_path")
    if base_model_name_or_path is not None and declared and declared != base_model_name_or_path:
        raise AdapterError(
            f"{where}: adapter was made for base '{declared}', not '{base_model_name_or_path}'"
        )
    weights = _adapter_weights(where)
    _check_config(config, weights, where)
    modules = _group(weights, where)
    blocks, base_label = _base_blocks(base)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    scales: dict[str, float] = {}
    shapes: dict[str, torch.Size] = {}
    for module, entry in modules.items():
        target = f"{module}.weight"
        if target not in blocks:
            raise AdapterError(
                f"{where}: module '{module}' has no weight '{target}' in base {base_label}: "
                "the adapter was made for another base"
            )
        shape = blocks.shape(target) if hasattr(blocks, "shape") else blocks[target].shape  # type: ignore[union-attr]
        transpose = bool(entry["embedding"] or config.get("fan_in_fan_out"))
        try:
            a, b = _factors(entry, transpose)
        except ValueError as err:
            raise AdapterError(f"{where}: module '{module}': {err}") from err
        fan_out, fan_in = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
        if b.shape[0] != fan_out or a.shape[1] != fan_in:
            raise AdapterError(
                f"{where}: module '{module}' gives a {b.shape[0]}x{a.shape[1]} delta but base {base_label} has "
                f"'{target}' of shape {tuple(shape)}: the adapter was made for another base"
            )
        rank = a.shape[0]
        expected_rank = int(pattern_value(rank_pattern, module, config.get("r", rank)))
        if rank != expected_rank:
            raise AdapterError(f"{where}: module '{module}' has rank {rank} but the config says r={expected_rank}")
        alpha = float(pattern_value(alpha_pattern, module, config.get("lora_alpha", rank)))
        scales[target] = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[target] = (a, b)
        shapes[target] = torch.Size(shape)
    names = list(factors)
    meta = {
        "name": name or where.name,
        "base_name": str(declared or base_label),
        "base_fingerprint": fingerprint({key: blocks[key] for key in names}),
        "source": "peft",
        "adapter_path": str(where),
        "use_rslora": str(bool(config.get("use_rslora"))),
    }
    try:
        return LoraTaskVector(factors, shapes, scales, metadata=meta)
    except ValueError as err:
        raise AdapterError(f"{where}: {err}") from err
