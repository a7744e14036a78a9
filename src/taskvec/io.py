"""Safe reading and atomic writing of tensor files.

Every checkpoint that enters taskvec goes through :func:`load_state_dict`, so the rules live in one
place: safetensors first, ``torch.load(weights_only=True)`` for ``.pt``/``.bin``, full pickle only when
the caller opts in, and an error that names the file when anything is off.
"""

from __future__ import annotations

import hashlib
import io
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


DIGEST_KEY = "taskvec_sha256"
"""Metadata key of the sha256 over a safetensors file's tensors and other metadata (see :func:`content_digest`)."""

DIGEST_MARK_KEY = "taskvec_digest"
"""A second key, written with the digest, naming its algorithm. Why two: a file from before digests has
neither and loads unverified; one flipped bit can damage one key's name but not both, so a file with
only one of them is refused instead of passing for an old, unverified file."""


def content_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` and the ``metadata`` pairs.

    Why: safetensors checks its header's structure but not the values, so a flipped bit or an edited
    metadata entry would otherwise load as different data without a word.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest_tensor(digest, name, tensors[name])
    digest_metadata(digest, metadata or {})
    return digest.hexdigest()


def digest_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    """Feed one tensor into a :func:`content_digest` (callers go in sorted name order).

    The bytes are hashed in place (a contiguous CPU tensor, e.g. a view of a memory-mapped file, is
    not copied), so a file can be verified tensor by tensor.
    """
    tensor = tensor.detach().contiguous().cpu()
    digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)


def digest_metadata(digest: hashlib._Hash, metadata: Mapping[str, str]) -> None:
    """Feed the metadata pairs (all but the digest itself) into a :func:`content_digest`, after the tensors."""
    for key in sorted(metadata):
        if key != DIGEST_KEY:
            digest.update(json.dumps([key, str(metadata[key])]).encode())


def digest_mismatch(path: PathLike) -> CheckpointError:
    """The error for a file whose contents differ from its recorded digest."""
    return CheckpointError(
        f"{path}: contents do not match the sha256 recorded when it was written (corrupted or edited); "
        "rewrite or rebuild it"
    )


def recorded_digest(path: PathLike, metadata: Mapping[str, str]) -> str | None:
    """The digest a file recorded; None for a file written before digests (neither key present).

    Raises :class:`CheckpointError` naming ``path`` when only one of the two digest keys is there.
    """
    recorded, mark = metadata.get(DIGEST_KEY), metadata.get(DIGEST_MARK_KEY)
    if recorded is None and mark is None:
        return None
    if recorded is None or mark != "sha256":
        raise CheckpointError(f"{path}: its digest entries are damaged (corrupted or edited); rewrite or rebuild it")
    return recorded


def verify_digest(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when its recorded digest does not match (absent: no check)."""
    recorded = recorded_digest(path, metadata)
    if recorded is not None and content_digest(tensors, metadata) != recorded:
        raise digest_mismatch(path)


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


def is_safetensors_file(path: Path) -> bool:
    """By suffix, else by content: a safetensors file starts with an 8-byte header length and a JSON object."""
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
    if is_safetensors_file(file):
        try:
            tensors = load_file(str(file))
            metadata = _raw_metadata(file)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
        verify_digest(file, tensors, metadata)
        return tensors
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        hint = "" if allow_pickle else " (if you trust it and it needs full pickle, pass allow_pickle=True)"
        raise CheckpointError(f"{file}: cannot be read as a tensor checkpoint: {err}{hint}") from err
    return _unwrap(obj, file)


def _default_mode() -> int:
    """0666 minus the process umask: what ``open(path, "w")`` would create (0644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def _atomic_target(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else remove it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes 0600 files; give the result the mode a plain open() would (or the old file's).
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.is_file() else _default_mode())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors to ``path`` through a temporary file and a rename, so no reader sees half a file."""
    payload = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if k not in (DIGEST_KEY, DIGEST_MARK_KEY)}
    meta[DIGEST_MARK_KEY] = "sha256"
    meta[DIGEST_KEY] = content_digest(payload, meta)
    with _atomic_target(path) as tmp:
        save_file(payload, tmp, metadata=meta)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write a text file through a temporary file and a rename."""
    with _atomic_target(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


_CHECKED_TORCH = "taskvec-checked-1"


def atomic_save_torch(obj: object, path: PathLike) -> Path:
    """``torch.save`` through a temporary file and a rename (training checkpoints), wrapped with the
    sha256 of the serialised bytes, since a flipped bit in a torch file often loads without an error."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    wrapper = {
        "format": _CHECKED_TORCH,
        "sha256": hashlib.sha256(data).hexdigest(),
        "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
    }
    with _atomic_target(path) as tmp:
        torch.save(wrapper, tmp)
    return Path(path)


def load_torch_checked(path: PathLike, map_location: str | torch.device = "cpu") -> object:
    """Read a file written by :func:`atomic_save_torch` (``weights_only``), verifying its sha256.

    Raises :class:`CheckpointError` naming the file for any unreadable, truncated or altered file; a
    plain ``torch.save`` file from before the wrapper is returned unverified.
    """
    file = Path(path)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncation and bit flips surface as many different error types
        # (torch's own text suggests weights_only=False, the wrong advice for a damaged file)
        raise CheckpointError(f"{file}: unreadable, truncated or not a torch file ({type(err).__name__})") from err
    if not (isinstance(obj, dict) and obj.get("format") == _CHECKED_TORCH):
        return obj
    payload, recorded = obj.get("payload"), obj.get("sha256")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or not isinstance(recorded, str):
        raise CheckpointError(f"{file}: malformed checked wrapper")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != recorded:
        raise CheckpointError(f"{file}: contents do not match the sha256 recorded when it was written (corrupted)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file}: verified payload does not load ({type(err).__name__})") from err


def write_json(path: PathLike, data: object) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _raw_metadata(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return dict(handle.metadata() or {})


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file, without loading its tensors (nor its digest entry:
    :func:`load_state_dict` checks that when the tensors are read)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file")
    try:
        meta = _raw_metadata(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    meta.pop(DIGEST_KEY, None)
    meta.pop(DIGEST_MARK_KEY, None)
    return meta
