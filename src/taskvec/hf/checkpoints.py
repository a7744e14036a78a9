"""Hugging Face model directories as checkpoints: single file, sharded with an index, or ``pytorch_model.bin``.

Why a lazy reader: a merge of a large model with many vectors must touch one tensor at a time, so
:class:`ModelWeights` lists names, shapes and dtypes from the file headers and reads a tensor only when
asked. Every failure (no weights, a missing shard, an index naming a missing file) names the path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from taskvec.io import CheckpointError, PathLike, is_safetensors_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")

#: Config fields that say nothing about the architecture: bookkeeping, labels, training-time dropout.
IGNORED_CONFIG_FIELDS = frozenset(
    {
        "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "id2label",
        "label2id", "finetuning_task", "problem_type", "use_cache", "return_dict", "output_hidden_states",
        "output_attentions", "_attn_implementation_autoset", "_commit_hash", "tokenizer_class",
        "task_specific_params", "initializer_range", "initializer_factor", "gradient_checkpointing",
    }
)


def is_adapter_dir(path: PathLike) -> bool:
    """True for a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def read_config(path: PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a model directory, or None for a plain file / a directory without one."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not a readable JSON config ({err})") from err


def _relevant(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in config.items()
        if key not in IGNORED_CONFIG_FIELDS and "dropout" not in key and not key.endswith("_dropout_prob")
    }


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the architecture fields whose values differ (sub-configs compared recursively)."""
    a, b = _relevant(a), _relevant(b)
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            out.extend(config_differences(left, right, f"{prefix}{key}."))
        elif left != right:
            out.append(f"{prefix}{key} ({left!r} vs {right!r})")
    return out


def check_same_architecture(base: PathLike, other: PathLike) -> None:
    """Refuse two model directories whose configs disagree on architecture, naming the fields."""
    left, right = read_config(base), read_config(other)
    if left is None or right is None:
        return
    diff = config_differences(left, right)
    if diff:
        shown = "; ".join(diff[:6]) + (f" (+{len(diff) - 6} more)" if len(diff) > 6 else "")
        raise CheckpointError(f"{other} does not have the architecture of {base}: config fields differ: {shown}")


class ModelWeights(Mapping[str, Tensor]):
    """A read-only, lazy view of a checkpoint's tensors: names, shapes and dtypes without loading.

    ``weights[name]`` reads that one tensor (from its shard for safetensors; ``.bin`` files are loaded
    memory-mapped with ``weights_only``). Iteration follows the files' own order.
    """

    def __init__(self, path: PathLike, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self.files = _weight_files(self.path)
        self._where: dict[str, Path] = {}
        self._shape: dict[str, torch.Size] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._headers: dict[Path, int] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self.metadata: dict[str, str] = {}
        self._last: tuple[tuple[str, int, int], Tensor] | None = None
        self._pickled: dict[Path, dict[str, Tensor]] = {}
        for file in self.files:
            self._scan(file)
        if not self._where:
            raise CheckpointError(f"{self.path}: holds no tensors")
        self._check_index()

    # -- reading headers ---------------------------------------------------------------------------

    def _scan(self, file: Path) -> None:
        if is_safetensors_file(file):
            header, start = read_safetensors_header(file)
            self._headers[file] = start
            for key, entry in header.items():
                if key == "__metadata__":
                    self.metadata.update(entry or {})
                    continue
                self._add(key, file, torch.Size(entry["shape"]), _DTYPES.get(entry["dtype"]))
                self._offsets[key] = (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
            return
        tensors = _load_pickled(file, self.allow_pickle)
        self._pickled[file] = tensors
        for key, value in tensors.items():
            self._add(key, file, value.shape, value.dtype)

    def _add(self, key: str, file: Path, shape: torch.Size, dtype: torch.dtype | None) -> None:
        if key in self._where:
            raise CheckpointError(f"{file}: tensor '{key}' is also in {self._where[key]}")
        if dtype is None:
            raise CheckpointError(f"{file}: tensor '{key}' has a dtype taskvec cannot read")
        self._where[key], self._shape[key], self._dtype[key] = file, shape, dtype

    def _check_index(self) -> None:
        index = _index_file(self.path) if self.path.is_dir() else None
        if index is None:
            return
        weight_map = _read_index(index)
        wrong = [key for key, name in weight_map.items() if self._where.get(key, Path()).name != name]
        if wrong:
            key = wrong[0]
            raise CheckpointError(
                f"{index}: tensor '{key}' is listed in {weight_map[key]} but "
                + (f"found in {self._where[key].name}" if key in self._where else "is in no shard")
                + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else "")
            )

    # -- the Mapping interface -------------------------------------------------------------------

    def __getitem__(self, key: str) -> Tensor:
        shape = self._shape[key]
        return self.rows(key, 0, shape[0] if shape else 1)

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a tensor (its first dimension), reading only their bytes. A 0-d tensor
        counts as one row."""
        shape, dtype = self._shape[key], self._dtype[key]
        if self._last is not None and self._last[0] == (key, start, stop):  # vectors read one base slice in turn
            return self._last[1]
        file = self._where[key]
        if file in self._pickled:
            tensor = self._pickled[file][key]
            return tensor[start:stop] if shape else tensor
        out_shape = (stop - start, *shape[1:]) if shape else shape
        row_bytes = (shape[1:].numel() if shape else 1) * dtype.itemsize
        begin = self._offsets[key][0] + start * row_bytes
        length = (stop - start) * row_bytes
        if length == 0:
            return torch.empty(out_shape, dtype=dtype)
        # Plain reads, not a memory map: a streaming merge must not keep every page it has seen resident.
        buffer = bytearray(length)
        with file.open("rb") as handle:
            handle.seek(begin)
            if handle.readinto(buffer) != length:
                raise CheckpointError(f"{file}: truncated while reading tensor '{key}'")
        tensor = torch.frombuffer(buffer, dtype=dtype).reshape(out_shape)
        self._last = ((key, start, stop), tensor)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> torch.Size:
        return self._shape[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype[key]

    @property
    def config(self) -> dict[str, Any] | None:
        return read_config(self.path) if self.path.is_dir() else None

    def nbytes(self, key: str) -> int:
        return self._shape[key].numel() * self._dtype[key].itemsize

    def __repr__(self) -> str:
        return f"ModelWeights({str(self.path)!r}, tensors={len(self)}, files={len(self.files)})"


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts, checked against the file size."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length <= 0 or 8 + length > size:
                raise CheckpointError(f"{file}: not a safetensors file (bad header length)")
            header = json.loads(handle.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not an object")
    start = 8 + length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            ok = 0 <= begin <= end and start + end <= size
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{file}: tensor '{key}' lies outside the file (truncated or corrupt)")
    return header, start


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor: the header is known up front from the shapes, so no
    tensor has to wait in memory for the others."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, torch.Size]], metadata: Mapping[str, str]):
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, torch.Size, int]] = []
        for key, dtype, shape in specs:
            nbytes = shape.numel() * dtype.itemsize
            header[key] = {
                "dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]
            }
            self._expected.append((key, dtype, shape, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self._handle = path.open("wb")
        self._handle.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, key: str, tensor: Tensor) -> None:
        self.write_parts(key, [tensor])

    def write_parts(self, key: str, parts: Iterable[Tensor]) -> None:
        """Write one tensor given as consecutive row chunks (so the whole tensor need never exist)."""
        expected_key, dtype, shape, nbytes = self._expected[self._next]
        if key != expected_key:
            raise ValueError(f"{self.path}: expected tensor {expected_key}, got {key}")
        written = 0
        for part in parts:
            if part.dtype != dtype:
                raise ValueError(f"{self.path}: tensor {key} has dtype {part.dtype}, expected {dtype}")
            if part.numel():
                data = part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                self._handle.write(memoryview(data))  # type: ignore[arg-type]
                written += data.nbytes
        if written != nbytes:
            raise ValueError(f"{self.path}: tensor {key} got {written} bytes, expected {nbytes} for {tuple(shape)}")
        self._next += 1

    def close(self, complete: bool = True) -> None:
        """Close the file; ``complete`` checks that every announced tensor was written."""
        self._handle.close()
        if complete and self._next != len(self._expected):
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._expected)} tensors")


def _index_file(folder: Path) -> Path | None:
    for name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a readable shard index with a 'weight_map' ({err!r})") from err
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' is empty or not an object")
    return {str(k): str(v) for k, v in weight_map.items()}


def _weight_files(path: Path) -> list[Path]:
    """The weight files a checkpoint path stands for, validated (every shard the index names exists)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        return [path]
    if is_adapter_dir(path):
        raise CheckpointError(f"{path}: is a PEFT adapter directory, not a model; read it with taskvec.hf.load_adapter")
    index = _index_file(path)
    if index is not None:
        names = list(dict.fromkeys(_read_index(index).values()))
        files = []
        for name in names:
            file = (path / name).resolve()
            if file.parent != path.resolve() or not file.is_file():
                raise CheckpointError(f"{index} names shard '{name}', which is missing from {path}")
            files.append(path / name)
        return files
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return [path / name]
    shards = sorted(p.name for p in path.iterdir() if _SHARD.fullmatch(p.name))
    if shards:
        raise CheckpointError(f"{path}: has shards ({shards[0]}, ...) but no {SAFETENSORS_INDEX} or {BIN_INDEX}")
    raise CheckpointError(
        f"{path}: directory holds no weights (looked for {', '.join(SINGLE_FILES)} or {SAFETENSORS_INDEX})"
    )


def _load_pickled(file: Path, allow_pickle: bool) -> dict[str, Tensor]:
    from taskvec.io import _unwrap

    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # the legacy (non-zip) format cannot be memory-mapped
                raise
            obj = torch.load(file, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        hint = "" if allow_pickle else " (for an old torch.save(model) pickle, try `taskvec convert`)"
        raise CheckpointError(f"{file}: cannot be read as a tensor checkpoint: {err}{hint}") from err
    return _unwrap(obj, file)


def open_weights(path: PathLike, *, allow_pickle: bool = False) -> ModelWeights:
    """A lazy reader for a checkpoint file or a Hugging Face model directory."""
    return ModelWeights(path, allow_pickle=allow_pickle)


def load_model_state_dict(path: PathLike, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a checkpoint file or model directory (shards joined), in file order."""
    weights = open_weights(path, allow_pickle=allow_pickle)
    return {key: weights[key] for key in weights}
