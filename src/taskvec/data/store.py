"""The decoded-dataset cache: one safetensors file per dataset, written atomically.

Why: decoding 60k IDX images is quick but decoding thousands of PNGs is not; after the first decode a
dataset loads from one memory-mapped file in well under a second. The file holds uint8 images at native
resolution, int64 labels and duplicate groups per pool (``<pool>.images|labels|groups``), and in its metadata the
class names and the ``key`` (source digest + format version) that the file was decoded from: a file
whose key differs from the wanted one is ignored and decoded again. A sha256 of the tensors and metadata
is checked on every read: a damaged file is decoded again, with a message saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from taskvec.data.sources import RawData
from taskvec.io import DIGEST_KEY, atomic_save_safetensors, content_digest

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
    # Atomic, umask permissions, and a sha256 of tensors + metadata that load_decoded checks.
    atomic_save_safetensors(tensors, path, meta)


def _stale(path: Path, why: str) -> None:
    """Say that a cached file is being decoded again, and why (a bad cache entry is never silent)."""
    print(f"taskvec: cached dataset {path} {why}; decoding it again", file=sys.stderr)


def load_decoded(path: Path, key: str) -> RawData | None:
    """The cached dataset at ``path`` if it exists and was decoded under ``key``; else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("format") != FORMAT_VERSION:
                return None  # decoded from another source version: an expected miss, not damage
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        classes = json.loads(meta["classes"])
    except Exception as err:  # safetensors raises its own error type for a truncated header
        _stale(path, f"is unreadable ({type(err).__name__})")
        return None
    if DIGEST_KEY not in meta:
        _stale(path, "has no content hash (written by an older taskvec)")
        return None
    if content_digest(tensors, meta) != meta[DIGEST_KEY]:
        _stale(path, "does not match its recorded sha256 (corrupted)")
        return None
    pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        if f"{name}.images" not in tensors or f"{name}.labels" not in tensors:
            _stale(path, f"lacks the images or labels of pool {name!r}")
            return None
        pools[name] = (tensors[f"{name}.images"], tensors[f"{name}.labels"])
    groups = {name: tensors[f"{name}.groups"] for name in pools if f"{name}.groups" in tensors}
    try:
        return RawData(pools, classes, groups).check(str(path))
    except ValueError as err:
        _stale(path, f"fails its checks ({err})")
        return None
