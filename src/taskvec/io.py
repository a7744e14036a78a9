"""Safe reading and atomic writing of tensor files.

Every checkpoint that enters taskvec goes through :func:`load_state_dict`, so the rules live in one
place: safetensors first, ``torch.load(weights_only=True)`` for ``.pt``/``.bin``, full pickle only when
the caller opts in, and an error that names the file when anything is off.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, not tensors, or does not match what it is used for."""


_SAFETENSORS_NAMES = ("model.safetensors", "pytorch_model.safetensors")
_PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth")


def _resolve(path: Path) -> Path:
    """A Hugging Face style directory stands for the weights file inside it."""
    if path.is_dir():
        for name in _SAFETENSORS_NAMES + _PICKLE_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{path}: directory holds none of {', '.join(_SAFETENSORS_NAMES + _PICKLE_NAMES)}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return path


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as handle:
        head = handle.read(9)
    # safetensors files start with an 8-byte little-endian header length then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, or the common {"state_dict": ...} / {"model": ...} wrappers."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping | torch.nn.Module) and not isinstance(inner, torch.Tensor):
                return _unwrap(inner, path)
        bad = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: entries are not tensors: {bad[:5]}")
        return {str(key): value for key, value in obj.items()}
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")


def load_state_dict(path: PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pt``/``.pth``/``.bin`` or a model directory.

    ``allow_pickle=True`` permits full unpickling of files that ``weights_only`` refuses: only for
    files you trust, since unpickling can run arbitrary code.
    """
    if Path(path).is_dir():  # a Hugging Face model directory, possibly sharded
        from taskvec.hf.checkpoints import load_model_state_dict

        return load_model_state_dict(path, allow_pickle=allow_pickle)
    file = _resolve(Path(path))
    if _is_safetensors(file):
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        hint = "" if allow_pickle else " (if you trust it and it needs full pickle, pass allow_pickle=True)"
        raise CheckpointError(f"{file}: cannot be read as a tensor checkpoint: {err}{hint}") from err
    return _unwrap(obj, file)


@contextmanager
def _atomic_target(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else remove it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors to ``path`` through a temporary file and a rename, so no reader sees half a file."""
    payload = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with _atomic_target(path) as tmp:
        save_file(payload, tmp, metadata=dict(metadata) if metadata else None)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write a text file through a temporary file and a rename."""
    with _atomic_target(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def atomic_save_torch(obj: object, path: PathLike) -> Path:
    """``torch.save`` through a temporary file and a rename (training checkpoints)."""
    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def write_json(path: PathLike, data: object) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file, without loading its tensors."""
    from safetensors import safe_open

    file = Path(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
