"""The decoded-dataset cache: one safetensors file per dataset, written atomically.

Why: decoding 60k IDX images is quick but decoding thousands of PNGs is not; after the first decode a
dataset loads from one memory-mapped file in well under a second. The file holds uint8 images at native
resolution, int64 labels and duplicate groups per pool (``<pool>.images|labels|groups``), and in its metadata the
class names and the ``key`` (source digest + format version) that the file was decoded from: a file
whose key differs from the wanted one is ignored and decoded again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from taskvec.data.sources import RawData

__all__ = ["FORMAT_VERSION", "load_decoded", "save_decoded"]

FORMAT_VERSION = "2"


def save_decoded(path: Path, raw: RawData, key: str) -> None:
    """Write ``raw`` to ``path`` (tmp file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for pool, (im, lab) in raw.pools.items():
        tensors[f"{pool}.images"] = im.contiguous()
        tensors[f"{pool}.labels"] = lab.contiguous()
        if pool in raw.groups:
            tensors[f"{pool}.groups"] = raw.groups[pool].contiguous()
    meta = {"classes": json.dumps(raw.classes), "key": key, "format": FORMAT_VERSION}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_decoded(path: Path, key: str) -> RawData | None:
    """The cached dataset at ``path`` if it exists and was decoded under ``key``; else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("format") != FORMAT_VERSION:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        classes = json.loads(meta["classes"])
    except Exception:  # safetensors raises its own error type for a truncated header
        return None  # unreadable or truncated: decode again
    pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        if f"{name}.images" not in tensors or f"{name}.labels" not in tensors:
            return None
        pools[name] = (tensors[f"{name}.images"], tensors[f"{name}.labels"])
    groups = {name: tensors[f"{name}.groups"] for name in pools if f"{name}.groups" in tensors}
    try:
        return RawData(pools, classes, groups).check(str(path))
    except ValueError:
        return None
