"""Read ``torch.save(module)`` pickles (the task_vectors / tangent / aTLAS banks) without running their code.

Why: those files pickle whole ``ImageEncoder`` objects of open_clip models, which ``weights_only`` refuses
and a full unpickle would import (and let execute) whatever the pickle names. Here a restricted
unpickler rebuilds tensors from the zip archive's storages itself, maps the few harmless globals it
needs to its own implementations, gives every other class an inert stand-in that only records its
state, and refuses outright any global that could run code (``os.system``, ``builtins.eval``,
``subprocess.Popen``, a torch or numpy function, ...). Nothing is imported or called that is not
on the allow-list below. The state dict is then read off the recorded module states.
"""

from __future__ import annotations

import collections
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from taskvec.io import CheckpointError, PathLike, atomic_save_safetensors


class UnsafePickleError(CheckpointError):
    """The pickle references something that could run code; nothing was executed."""


class StandIn:
    """An inert placeholder for a class the pickle names: records constructor arguments and state."""

    _origin = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.state: Any = None
        self.items: list[Any] = []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {self._origin}>"


_STAND_INS: dict[tuple[str, str], type[StandIn]] = {}


def _stand_in(module: str, name: str) -> type[StandIn]:
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = type(f"StandIn_{name}", (StandIn,), {"_origin": f"{module}.{name}"})
    return _STAND_INS[key]


class _Storage:
    """A storage rebuilt from the archive: a flat tensor of its dtype."""

    def __init__(self, flat: Tensor) -> None:
        self.flat = flat


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, not an archive storage")
    return torch.as_strided(storage.flat, tuple(size), tuple(stride), int(offset)).clone()


def _rebuild_parameter(data: Tensor, *_: Any) -> Tensor:
    if not isinstance(data, Tensor):
        raise UnsafePickleError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


_REBUILDERS = {_rebuild_tensor, _rebuild_parameter}


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any = None) -> Any:
    if func not in _REBUILDERS:
        raise UnsafePickleError(f"tensor subclass rebuilt through {func!r}, which is not an allowed rebuild function")
    return func(*args)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    if isinstance(cls, type) and issubclass(cls, StandIn):
        return cls()
    if cls in (collections.OrderedDict, dict, list, set):
        return cls()
    raise UnsafePickleError(f"copyreg._reconstructor asked to build {cls!r}")


def _encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


def _device(spec: Any = "cpu", index: Any = None) -> str:
    return str(spec) if index is None else f"{spec}:{index}"


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

#: Every real object the unpickler hands out. Anything else is a stand-in or refused.
ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "device"): _device,
    ("torch", "Size"): tuple,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _encode,
}
for _module in ("builtins", "__builtin__"):
    for _name, _value in (("set", set), ("frozenset", frozenset), ("list", list), ("dict", dict), ("tuple", tuple),
                          ("object", object), ("slice", slice), ("complex", complex), ("bytearray", bytearray),
                          ("int", int), ("float", float), ("bool", bool), ("str", str), ("bytes", bytes)):
        ALLOWED[(_module, _name)] = _value

#: Modules whose globals are refused outright, even class names: they exist to run code or touch the system.
DANGEROUS = frozenset(
    {
        "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pickle", "_pickle",
        "marshal", "ctypes", "code", "codeop", "pty", "webbrowser", "multiprocessing", "signal", "builtins",
        "__builtin__", "operator", "types", "io", "tempfile", "threading", "_thread", "asyncio", "platform",
        "glob", "zipimport", "pdb", "bdb", "timeit", "trace", "profile", "cProfile", "inspect", "ast", "shlex",
        "pathlib", "posixpath", "ntpath", "urllib", "http", "ftplib", "smtplib", "sqlite3", "dbm", "shelve",
    }
)


def _stdlib(module: str) -> bool:
    return module.split(".")[0] in getattr(sys, "stdlib_module_names", ())


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only through :data:`ALLOWED`, inert stand-ins, or a refusal."""

    def __init__(self, file: Any, storages: Mapping[str, bytes] | None, where: str) -> None:
        super().__init__(file)
        self._storages = storages or {}
        self._where = where
        self.stand_ins: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in ALLOWED:
            return ALLOWED[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        root = module.split(".")[0]
        refused = (
            root in DANGEROUS
            or (_stdlib(module) and not name[:1].isupper())
            or (root in ("torch", "numpy") and not name[:1].isupper())
        )
        if refused:
            raise UnsafePickleError(
                f"{self._where}: pickle references {module}.{name}, which could run code; refused, nothing was executed"
            )
        self.stand_ins.add(f"{module}.{name}")
        return _stand_in(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._where}: unknown persistent id {str(pid)[:80]}")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, torch.dtype):
            raise UnsafePickleError(f"{self._where}: storage {key} has type {dtype!r}, not a known storage type")
        if key not in self._storages:
            raise CheckpointError(f"{self._where}: storage data/{key} is missing from the archive")
        raw = self._storages[key]
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return _Storage(flat)


def restricted_load(path: PathLike) -> Any:
    """Unpickle a ``torch.save`` zip archive with the restricted unpickler; returns the rebuilt object
    graph (tensors real, classes as :class:`StandIn`)."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file")
    if not zipfile.is_zipfile(file):
        raise CheckpointError(f"{file}: not a torch.save zip archive (the pre-1.6 legacy format is not supported)")
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise CheckpointError(f"{file}: archive holds no data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in names and archive.read(order).strip() not in (b"little", b""):
            raise CheckpointError(f"{file}: big-endian archives are not supported")
        storages = {
            n[len(prefix) + len("data/"):]: archive.read(n) for n in names if n.startswith(f"{prefix}data/")
        }
        with archive.open(pickles[0]) as handle:
            return RestrictedUnpickler(handle, storages, str(file)).load()


def _module_state_dict(obj: StandIn, prefix: str, out: dict[str, Tensor]) -> None:
    state = obj.state if isinstance(obj.state, Mapping) else {}
    if isinstance(obj.state, tuple) and obj.state and isinstance(obj.state[0], Mapping):
        state = obj.state[0]
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, Tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, StandIn):
            _module_state_dict(child, f"{prefix}{name}.", out)


def _is_module(obj: Any) -> bool:
    return isinstance(obj, StandIn) and isinstance(obj.state, Mapping) and "_modules" in obj.state


def extract_state_dict(obj: Any, where: str = "pickle") -> dict[str, Tensor]:
    """The tensors a rebuilt object stands for: a module's ``state_dict()`` order and names, or a plain
    state dict (also inside the usual ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers)."""
    if _is_module(obj):
        out: dict[str, Tensor] = {}
        _module_state_dict(obj, "", out)
        if not out:
            raise CheckpointError(f"{where}: the pickled module holds no tensors")
        return out
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            if wrapper in obj and (isinstance(obj[wrapper], Mapping) or _is_module(obj[wrapper])):
                return extract_state_dict(obj[wrapper], where)
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
        if bad or not obj:
            raise CheckpointError(f"{where}: entries are not tensors: {list(bad)[:5]}")
        return {str(k): v for k, v in obj.items()}
    raise CheckpointError(f"{where}: holds {obj!r}, neither a module nor a state dict")


def convert_pickle(source: PathLike, output: PathLike, *, strip_prefix: str = "") -> Path:
    """``taskvec convert``: a ``torch.save`` pickle (module or state dict) to a safetensors state dict.

    ``strip_prefix`` removes a leading name part (e.g. ``"model."`` of an ``ImageEncoder`` wrapper).
    """
    src, dst = Path(source), Path(output)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: output would overwrite the input")
    tensors = extract_state_dict(restricted_load(src), str(src))
    if strip_prefix:
        tensors = {k.removeprefix(strip_prefix): v for k, v in tensors.items()}
    payload = {k: v.contiguous().clone() for k, v in tensors.items()}  # no shared storage in safetensors
    return atomic_save_safetensors(payload, dst, {"converted_from": src.name, "format": "pt"})
