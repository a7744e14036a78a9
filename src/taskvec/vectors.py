"""Task vectors: the weight difference between a fine-tuned and a pre-trained network.

A task vector holds one tensor per *parameter block* (every floating-point weight, bias and norm
scale/shift). Buffers such as BatchNorm running statistics are not blocks: fine-tune with them frozen,
so that the vector is a pure parameter difference. Each vector remembers a fingerprint of the base it
was made on, and refuses to be applied to, or combined with, a vector from another base.

Two storage forms share one interface (``names``, ``shapes``, ``dense_block``):
:class:`TaskVector` (dense deltas) and :class:`LoraTaskVector` (``scale * B @ A`` factors per block).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from taskvec.io import CheckpointError, PathLike, atomic_save_safetensors, load_state_dict

if TYPE_CHECKING:
    from taskvec.quantize import QuantizedTaskVector

FORMAT_VERSION = "1"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_FINGERPRINT_SAMPLES = 256


class BaseMismatchError(ValueError):
    """A task vector meets a base model (or another vector) it was not made from."""


# ----------------------------------------------------------------------------------------------
# Parameter blocks and fingerprints
# ----------------------------------------------------------------------------------------------


def parameter_blocks(model: nn.Module) -> dict[str, Tensor]:
    """The model's floating-point parameters by name: the blocks a task vector is made of."""
    return {
        name: param
        for name, param in model.named_parameters()
        if torch.is_floating_point(param)
    }


def _is_block_key(name: str, tensor: Tensor) -> bool:
    return torch.is_floating_point(tensor) and not name.endswith(BUFFER_SUFFIXES)


def fingerprint(blocks: Mapping[str, Tensor]) -> str:
    """A short digest of a base model's blocks: names, shapes and a strided sample of values.

    Values are rounded to bfloat16 before hashing, so one base stored in fp32 or bf16 gives the same
    print; a different base (another checkpoint, other fine-tuning) gives another.
    """
    digest = hashlib.sha256()
    for name in sorted(blocks):
        tensor = blocks[name].detach()
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].to("cpu", torch.float32).to(torch.bfloat16)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _describe(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _check_same_keys(expected: Iterable[str], actual: Iterable[str], what: str) -> None:
    expected, actual = set(expected), set(actual)
    missing, extra = expected - actual, actual - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if extra:
            parts.append(f"unexpected keys: {_describe(extra)}")
        raise CheckpointError(f"{what}: {'; '.join(parts)}")


def _check_finite(name: str, tensor: Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{what}: block '{name}' has {bad} NaN/Inf values")


def _meta_json(meta: Mapping[str, str], key: str, path: PathLike, kind: type | tuple[type, ...]) -> Any:
    """A JSON-valued metadata entry, or a :class:`CheckpointError` naming the file and the key."""
    if key not in meta:
        raise CheckpointError(f"{path}: metadata lacks the key '{key}'")
    try:
        value = json.loads(meta[key])
    except ValueError as err:
        raise CheckpointError(f"{path}: metadata '{key}' is not valid JSON ({err})") from err
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: metadata '{key}' holds a {type(value).__name__}, expected {kind}")
    return value


# ----------------------------------------------------------------------------------------------
# Shared behaviour of both storage forms
# ----------------------------------------------------------------------------------------------


class _VectorBase:
    """What every task vector offers: names, shapes, metadata, a dense view per block."""

    metadata: dict[str, str]

    @property
    def names(self) -> list[str]:
        raise NotImplementedError

    @property
    def shapes(self) -> dict[str, torch.Size]:
        raise NotImplementedError

    def dense_block(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.metadata.get("name", "")

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("base_fingerprint") or None

    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def check_base(self, model_or_blocks: nn.Module | Mapping[str, Tensor]) -> None:
        """Raise :class:`BaseMismatchError` unless the base has this vector's blocks and fingerprint."""
        blocks = (
            parameter_blocks(model_or_blocks)
            if isinstance(model_or_blocks, nn.Module)
            else dict(model_or_blocks)
        )
        missing = set(self.names) - set(blocks)
        if missing:
            raise BaseMismatchError(f"task vector '{self.name}': base model lacks blocks {_describe(missing)}")
        for key in self.names:
            if tuple(blocks[key].shape) != tuple(self.shapes[key]):
                raise BaseMismatchError(
                    f"task vector '{self.name}': block '{key}' has shape {tuple(self.shapes[key])}, "
                    f"base has {tuple(blocks[key].shape)}"
                )
        expected = self.base_fingerprint
        if expected is not None:
            actual = fingerprint({key: blocks[key] for key in self._fingerprint_names()})
            if actual != expected:
                raise BaseMismatchError(
                    f"task vector '{self.name}' was made on base "
                    f"'{self.metadata.get('base_name', '?')}' (fingerprint {expected}); this base has "
                    f"fingerprint {actual}. Pass check_base=False only if you are sure."
                )

    def content_fingerprint(self) -> str:
        """A short digest of this vector's own values (names, shapes, a strided sample), storage-dtype blind.

        Why: a coefficients file records which vectors, in which order, its rows scale.
        """
        raise NotImplementedError

    def _fingerprint_names(self) -> list[str]:
        stored = self.metadata.get("fingerprint_blocks")
        return json.loads(stored) if stored else self.names

    def apply_to(self, model: nn.Module, scale: float = 1.0, *, check_base: bool = True) -> nn.Module:
        """A new model with ``theta_0 + scale * tau``; ``model`` itself is left untouched."""
        if check_base:
            self.check_base(model)
        merged = copy.deepcopy(model)
        params = dict(merged.named_parameters())
        with torch.no_grad():
            for key in self.names:
                param = params[key]
                param.add_(self.dense_block(key, torch.float32).to(param.device, param.dtype), alpha=scale)
        return merged


# ----------------------------------------------------------------------------------------------
# Dense task vectors
# ----------------------------------------------------------------------------------------------


class TaskVector(_VectorBase):
    """A dense task vector: ``{block name: theta_ft - theta_0}`` plus string metadata.

    Arithmetic (``+``, ``-``, unary ``-``, scalar ``*`` and ``/``, ``sum()``) is computed in fp32 and
    returned in the left operand's storage dtype; it refuses operands made on different bases.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        metadata: Mapping[str, str] | None = None,
        check_finite: bool = True,
    ) -> None:
        if not tensors:
            raise ValueError("a task vector needs at least one block; got none")
        what = f"task vector '{(metadata or {}).get('name', '')}'"
        for key, value in tensors.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{what}: block '{key}' is a {type(value).__name__}, not a tensor")
            if not torch.is_floating_point(value):
                raise TypeError(f"{what}: block '{key}' has dtype {value.dtype}; blocks are floating point")
            if check_finite:
                _check_finite(key, value, what)
        self.tensors: dict[str, Tensor] = {key: value.detach() for key, value in tensors.items()}
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_state_dicts(
        cls,
        base: Mapping[str, Tensor],
        finetuned: Mapping[str, Tensor],
        *,
        names: Iterable[str] | None = None,
        name: str = "",
        base_name: str = "",
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> TaskVector:
        """``finetuned - base`` over the parameter blocks.

        ``names`` lists the blocks; by default every floating-point entry except BatchNorm-style
        running statistics. Buffers that differ between the two are ignored with a warning.
        """
        if not base:
            raise CheckpointError("base state dict is empty")
        block_names = list(names) if names is not None else [k for k, v in base.items() if _is_block_key(k, v)]
        absent = [key for key in block_names if key not in base]
        if absent:
            raise CheckpointError(f"base: missing keys: {_describe(absent)}")
        # Every block must be in the fine-tuned checkpoint, and it may hold nothing the base lacks.
        missing = [key for key in block_names if key not in finetuned]
        extra = [key for key in finetuned if key not in base]
        if missing or extra:
            _check_same_keys(
                block_names, [k for k in block_names if k in finetuned] + extra, "fine-tuned checkpoint vs base"
            )
        deltas: dict[str, Tensor] = {}
        for key in block_names:
            b, f = base[key], finetuned[key]
            if b.shape != f.shape:
                raise CheckpointError(
                    f"block '{key}': base shape {tuple(b.shape)} but fine-tuned shape {tuple(f.shape)}"
                )
            if not (torch.is_floating_point(b) and torch.is_floating_point(f)):
                raise CheckpointError(f"block '{key}': dtypes {b.dtype}/{f.dtype} are not floating point")
            _check_finite(key, b, "base checkpoint")
            _check_finite(key, f, "fine-tuned checkpoint")
            delta = f.to(torch.float32) - b.to(torch.float32)
            deltas[key] = delta.to(dtype or f.dtype)
        changed_buffers = [
            k
            for k in base
            if k not in deltas and k in finetuned and base[k].shape == finetuned[k].shape
            and not torch.equal(base[k], finetuned[k])
        ]
        if changed_buffers:
            warnings.warn(
                f"buffers differ between base and fine-tuned model and are not part of the task vector: "
                f"{_describe(changed_buffers)}. Fine-tune with them frozen (e.g. BatchNorm in eval mode).",
                stacklevel=2,
            )
        meta = {
            "format": FORMAT_VERSION,
            "kind": "dense",
            "name": name,
            "base_name": base_name,
            "base_fingerprint": fingerprint({k: base[k] for k in block_names}),
        }
        meta.update(metadata or {})
        return cls(deltas, metadata=meta)

    @classmethod
    def from_models(
        cls,
        base: nn.Module,
        finetuned: nn.Module,
        *,
        name: str = "",
        base_name: str = "",
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> TaskVector:
        """``finetuned - base`` over ``base``'s floating-point parameters."""
        names = list(parameter_blocks(base))
        return cls.from_state_dicts(
            base.state_dict(),
            finetuned.state_dict(),
            names=names,
            name=name,
            base_name=base_name,
            dtype=dtype,
            metadata=metadata,
        )

    @classmethod
    def from_checkpoints(
        cls,
        base_path: PathLike,
        finetuned_path: PathLike,
        *,
        name: str = "",
        base_name: str = "",
        dtype: torch.dtype | None = None,
        allow_pickle: bool = False,
    ) -> TaskVector:
        """From two checkpoint files (safetensors, or ``.pt``/``.bin`` read with ``weights_only``) or two
        Hugging Face model directories (sharded or not), whose configs must agree on architecture."""
        from taskvec.hf.checkpoints import check_same_architecture

        check_same_architecture(base_path, finetuned_path)
        base = load_state_dict(base_path, allow_pickle=allow_pickle)
        finetuned = load_state_dict(finetuned_path, allow_pickle=allow_pickle)
        for path, state in ((base_path, base), (finetuned_path, finetuned)):
            for key, value in state.items():
                if _is_block_key(key, value):
                    _check_finite(key, value, f"{'base' if path is base_path else 'fine-tuned'} checkpoint {path}")
        try:
            return cls.from_state_dicts(
                base, finetuned, name=name, base_name=base_name or Path(base_path).name, dtype=dtype
            )
        except CheckpointError as err:
            raise CheckpointError(f"{finetuned_path} vs {base_path}: {err}") from err

    # -- views ---------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {key: value.shape for key, value in self.tensors.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def content_fingerprint(self) -> str:
        return fingerprint(self.tensors)

    def dense_block(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        tensor = self.tensors[name]
        return tensor if dtype is None else tensor.to(dtype)

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return (
            f"TaskVector(name={self.name!r}, blocks={len(self)}, numel={self.numel():,}, "
            f"dtype={self.dtype}, base={self.base_fingerprint})"
        )

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> TaskVector:
        """A copy in another storage dtype and/or on another device (metadata kept)."""
        moved = {key: value.to(device=device, dtype=dtype) for key, value in self.tensors.items()}
        return TaskVector(moved, metadata=self.metadata, check_finite=False)

    # -- arithmetic ----------------------------------------------------------------------------

    def _combine_metadata(self, other: TaskVector, symbol: str) -> dict[str, str]:
        if self.names != other.names and set(self.names) != set(other.names):
            _check_same_keys(self.names, other.names, f"'{self.name}' {symbol} '{other.name}'")
        for key, value in self.tensors.items():  # no broadcasting: (4, 1) + (4, 4) is an error, not (4, 4)
            if value.shape != other.tensors[key].shape:
                raise ValueError(
                    f"'{self.name}' {symbol} '{other.name}': block '{key}' has shape {tuple(value.shape)} "
                    f"vs {tuple(other.tensors[key].shape)}"
                )
        mine, theirs = self.base_fingerprint, other.base_fingerprint
        if mine and theirs and mine != theirs:
            raise BaseMismatchError(
                f"cannot combine '{self.name}' (base {mine}) with '{other.name}' (base {theirs}): "
                "task vectors from different base models"
            )
        meta = {k: v for k, v in self.metadata.items() if k in ("format", "kind", "base_name", "base_fingerprint")}
        meta["base_fingerprint"] = mine or theirs or ""
        meta["name"] = f"({self.name} {symbol} {other.name})"
        return meta

    def _zip(self, other: TaskVector, op, symbol: str) -> TaskVector:
        meta = self._combine_metadata(other, symbol)
        out = {
            key: op(value.to(torch.float32), other.tensors[key].to(value.device, torch.float32)).to(value.dtype)
            for key, value in self.tensors.items()
        }
        return TaskVector(out, metadata=meta, check_finite=False)

    def __add__(self, other: TaskVector | int | float) -> TaskVector:
        if isinstance(other, int | float) and other == 0:
            return self
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._zip(other, torch.add, "+")

    def __radd__(self, other: TaskVector | int | float) -> TaskVector:
        # sum() starts from 0.
        if isinstance(other, int | float) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._zip(other, torch.sub, "-")

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __mul__(self, scalar: float) -> TaskVector:
        if isinstance(scalar, Tensor) and scalar.numel() == 1:
            scalar = float(scalar)
        if not isinstance(scalar, int | float):
            return NotImplemented
        out = {key: (value.to(torch.float32) * scalar).to(value.dtype) for key, value in self.tensors.items()}
        meta = dict(self.metadata, name=f"{scalar:g}*{self.name}" if self.name else "")
        return TaskVector(out, metadata=meta, check_finite=False)

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, int | float):
            return NotImplemented
        return self * (1.0 / scalar)

    def dot(self, other: TaskVector) -> float:
        """Inner product over all blocks, accumulated in float64."""
        self._combine_metadata(other, "·")
        return float(
            sum(
                torch.sum(v.to(torch.float64) * other.tensors[k].to(v.device, torch.float64))
                for k, v in self.tensors.items()
            )
        )

    def norm(self) -> float:
        return math.sqrt(sum(float(torch.sum(v.to(torch.float64) ** 2)) for v in self.tensors.values()))

    def cosine(self, other: TaskVector) -> float:
        denominator = self.norm() * other.norm()
        if denominator == 0:
            raise ValueError(f"cosine similarity of a zero task vector ('{self.name}' or '{other.name}')")
        return self.dot(other) / denominator

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: PathLike, *, dtype: torch.dtype | None = None) -> Path:
        """Write as safetensors (atomically), with keys, dtype and base fingerprint in the metadata."""
        tensors = {key: value.to(dtype) if dtype else value for key, value in self.tensors.items()}
        meta = dict(self.metadata)
        meta.update(
            format=FORMAT_VERSION,
            kind="dense",
            dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."),
            blocks=str(len(tensors)),
            order=json.dumps(list(tensors)),  # safetensors sorts keys; keep the model's block order
        )
        return atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: PathLike, *, device: torch.device | str = "cpu") -> TaskVector:
        from taskvec.io import read_safetensors_metadata

        meta = read_safetensors_metadata(path)
        if meta.get("kind") == "lora":
            raise CheckpointError(f"{path}: holds a LoRA task vector; load it with LoraTaskVector.load")
        tensors = load_state_dict(path)
        if "order" in meta:
            order = _meta_json(meta, "order", path, list)
            meta.pop("order")
            if sorted(map(str, order)) != sorted(tensors):
                raise CheckpointError(f"{path}: metadata 'order' lists other blocks than the file holds")
            tensors = {key: tensors[key] for key in order}
        stored = str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None
        if "dtype" in meta and stored is not None and meta["dtype"] != stored:
            raise CheckpointError(f"{path}: metadata 'dtype' says {meta['dtype']!r}, the tensors are {stored}")
        try:
            vector = cls(tensors, metadata=meta)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: {err}") from err
        return vector.to(device=device) if str(device) != "cpu" else vector


# ----------------------------------------------------------------------------------------------
# LoRA task vectors
# ----------------------------------------------------------------------------------------------


class LoraTaskVector(_VectorBase):
    """A task vector stored as low-rank factors: ``tau[name] = scale * (B @ A).reshape(shape)``.

    ``A`` is (r, fan_in) and ``B`` is (fan_out, r); conv weights flatten their kernel into fan_in.
    The composer contracts these factors directly, so composing several LoRA vectors never forms
    products between different adapters.
    """

    def __init__(
        self,
        factors: Mapping[str, tuple[Tensor, Tensor]],
        shapes: Mapping[str, Iterable[int]],
        scales: Mapping[str, float] | float = 1.0,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not factors:
            raise ValueError("a LoRA task vector needs at least one block; got none")
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self._shapes: dict[str, torch.Size] = {}
        self.scales: dict[str, float] = {}
        for key, (a, b) in factors.items():
            if key not in shapes:
                raise ValueError(f"LoRA block '{key}': no target shape given")
            shape = torch.Size(shapes[key])
            fan_out, fan_in = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"LoRA block '{key}': A {tuple(a.shape)} and B {tuple(b.shape)} are not (r, in) and (out, r)"
                )
            if b.shape[0] != fan_out or a.shape[1] != fan_in:
                raise ValueError(
                    f"LoRA block '{key}': B @ A is {b.shape[0]}x{a.shape[1]} but the block {tuple(shape)} "
                    f"needs {fan_out}x{fan_in}"
                )
            _check_finite(key + ".lora_A", a, "LoRA task vector")
            _check_finite(key + ".lora_B", b, "LoRA task vector")
            self.factors[key] = (a.detach(), b.detach())
            self._shapes[key] = shape
            self.scales[key] = float(scales[key] if isinstance(scales, Mapping) else scales)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.metadata.setdefault("kind", "lora")

    @property
    def names(self) -> list[str]:
        return list(self.factors)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    @property
    def rank(self) -> dict[str, int]:
        return {key: a.shape[0] for key, (a, _) in self.factors.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.factors.values()))[0].dtype

    def __len__(self) -> int:
        return len(self.factors)

    def norm(self) -> float:
        """Frobenius norm of the dense delta, from the factors: ||s B A||^2 = s^2 <B^T B, A A^T>."""
        total = 0.0
        for key, (a, b) in self.factors.items():
            a64, b64 = a.to(torch.float64), b.to(torch.float64)
            total += self.scales[key] ** 2 * float(torch.sum((b64.T @ b64) * (a64 @ a64.T)))
        return math.sqrt(max(total, 0.0))

    def content_fingerprint(self) -> str:
        return fingerprint({f"{key}.lora_{ab}": t * (self.scales[key] if ab == "B" else 1.0)
                            for key, (a, b) in self.factors.items() for ab, t in (("A", a), ("B", b))})

    def storage_numel(self) -> int:
        """Numbers actually stored (the factors), as opposed to :meth:`numel` of the dense delta."""
        return sum(a.numel() + b.numel() for a, b in self.factors.values())

    def dense_block(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        a, b = self.factors[name]
        dense = (b.to(torch.float32) @ a.to(torch.float32)) * self.scales[name]
        return dense.reshape(self._shapes[name]).to(dtype or a.dtype)

    def to_dense(self) -> TaskVector:
        meta = dict(self.metadata, kind="dense")
        return TaskVector({key: self.dense_block(key) for key in self.names}, metadata=meta)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoraTaskVector:
        moved = {
            key: (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
            for key, (a, b) in self.factors.items()
        }
        return LoraTaskVector(moved, self._shapes, self.scales, metadata=self.metadata)

    def __mul__(self, scalar: float) -> LoraTaskVector:
        if not isinstance(scalar, int | float):
            return NotImplemented
        scales = {key: value * scalar for key, value in self.scales.items()}
        return LoraTaskVector(self.factors, self._shapes, scales, metadata=self.metadata)

    __rmul__ = __mul__

    def __neg__(self) -> LoraTaskVector:
        return self * -1.0

    def __repr__(self) -> str:
        return (
            f"LoraTaskVector(name={self.name!r}, blocks={len(self.factors)}, stored={self.storage_numel():,}, "
            f"dtype={self.dtype}, base={self.base_fingerprint})"
        )

    def save(self, path: PathLike) -> Path:
        tensors: dict[str, Tensor] = {}
        for key, (a, b) in self.factors.items():
            tensors[f"{key}.lora_A"] = a
            tensors[f"{key}.lora_B"] = b
        meta = dict(self.metadata)
        meta.update(
            format=FORMAT_VERSION,
            kind="lora",
            shapes=json.dumps({k: list(v) for k, v in self._shapes.items()}),
            scales=json.dumps(self.scales),
        )
        return atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: PathLike) -> LoraTaskVector:
        from taskvec.io import read_safetensors_metadata

        meta = read_safetensors_metadata(path)
        if meta.get("kind") != "lora" or "shapes" not in meta:
            raise CheckpointError(f"{path}: not a taskvec LoRA task vector (metadata kind={meta.get('kind')!r})")
        tensors = load_state_dict(path)
        shapes = _meta_json(meta, "shapes", path, dict)
        scales = _meta_json(meta, "scales", path, (dict, int, float))
        if isinstance(scales, dict) and set(scales) != set(shapes):
            raise CheckpointError(f"{path}: metadata 'scales' and 'shapes' name different blocks")
        bad = [k for k, v in shapes.items() if not (isinstance(v, list) and all(isinstance(d, int) for d in v))]
        if bad:
            raise CheckpointError(f"{path}: metadata 'shapes' entry for {bad[0]!r} is not a list of ints")
        factors = {}
        for key in shapes:
            try:
                factors[key] = (tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"])
            except KeyError as err:
                raise CheckpointError(f"{path}: missing factor {err.args[0]}") from err
        unused = sorted(set(tensors) - {f"{k}.lora_{ab}" for k in shapes for ab in "AB"})
        if unused:
            raise CheckpointError(f"{path}: tensors {unused[:3]} are not factors of any block in metadata 'shapes'")
        rest = {k: v for k, v in meta.items() if k not in ("shapes", "scales")}
        try:
            return cls(factors, shapes, scales, metadata=rest)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: {err}") from err

    @classmethod
    def from_peft_state_dict(
        cls,
        adapter: Mapping[str, Tensor],
        base: nn.Module,
        *,
        alpha: float,
        rank: int,
        prefix: str = "base_model.model.",
        name: str = "",
    ) -> LoraTaskVector:
        """Read PEFT-style keys (``<prefix><module>.lora_A.weight``) against ``base``'s blocks."""
        blocks = parameter_blocks(base)
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        for key, tensor in adapter.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix(prefix).split(".lora_A.")[0]
            target = f"{module}.weight"
            b_key = key.replace(".lora_A.", ".lora_B.")
            if target not in blocks:
                raise CheckpointError(f"adapter key '{key}': base model has no block '{target}'")
            if b_key not in adapter:
                raise CheckpointError(f"adapter key '{key}': its partner '{b_key}' is missing")
            factors[target] = (tensor.reshape(tensor.shape[0], -1), adapter[b_key].reshape(adapter[b_key].shape[0], -1))
        if not factors:
            raise CheckpointError("adapter state dict has no '.lora_A.' keys")
        shapes = {key: blocks[key].shape for key in factors}
        meta = {"name": name, "base_fingerprint": fingerprint({k: blocks[k] for k in factors})}
        return cls(factors, shapes, alpha / rank, metadata=meta)


AnyTaskVector = TaskVector | LoraTaskVector


def load_task_vector(path: PathLike) -> AnyTaskVector | QuantizedTaskVector:
    """Load any storage form from a taskvec safetensors file (dense, LoRA or quantised), by its metadata kind."""
    from taskvec.io import read_safetensors_metadata

    kind = read_safetensors_metadata(path).get("kind")
    if kind == "lora":
        return LoraTaskVector.load(path)
    if kind == "quantized":
        from taskvec.quantize import QuantizedTaskVector  # quantize imports this module: load it on use

        return QuantizedTaskVector.load(path)
    return TaskVector.load(path)
