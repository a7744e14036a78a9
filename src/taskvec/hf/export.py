"""``merge_to_directory``: a base plus task vectors, merged into a model directory ``transformers`` loads.

Why streaming: a merge of a large model with many vectors must not hold n full copies. Every input is
read lazily (safetensors headers first, one tensor at a time), each parameter block is merged from the
n vectors' slices of that block alone, and the output shards are written tensor by tensor with headers
computed up front. TIES needs each vector's global magnitude threshold: two extra sweeps find it
exactly (a histogram of the float bit patterns, high half then low half), equal to
:func:`taskvec.merging.magnitude_threshold`.

Methods (theta_0 the base, tau_i the vectors, missing blocks of a vector count as zero): the data-free
merges of :mod:`taskvec.methods`, whose declarations (names, defaults, ranges) validate the parameters
here too; this module holds their streaming implementations, equal to the registry's in-memory ones.
``sum``: theta_0 + alpha * sum_i tau_i; ``ties``: TIES with ``density``, ``alpha``, ``majority``; ``dare`` /
``dare_ties``: DARE with ``drop_rate``; the mask of vector i on block b is drawn from its own generator,
seeded :func:`dare_seed` (seed, i, b), so it does not depend on the order in which files list blocks;
``learned`` (not a registry method: it needs data): the coefficients a :class:`~taskvec.compose.Composer`
saved, at their granularity.

Writing is atomic: everything goes to a temporary directory beside OUT_DIR, renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from taskvec.granularity import Granularity, Layout
from taskvec.hf.checkpoints import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    ModelWeights,
    SafetensorsStreamWriter,
    check_same_architecture,
    is_adapter_dir,
    open_weights,
)
from taskvec.io import CheckpointError, PathLike, read_safetensors_metadata
from taskvec.merging import _kept_count, disjoint_mean, elect_sign
from taskvec.methods import MergeParameterError, UnknownMethodError, get_method
from taskvec.methods import method_names as registered_methods
from taskvec.vectors import BUFFER_SUFFIXES, AnyTaskVector, BaseMismatchError, LoraTaskVector, fingerprint

# The registry methods with a streaming implementation below, and the learned composition.
STREAMING = ("sum", "ties", "dare", "dare_ties")
LEARNED = "learned"
METHODS = (*STREAMING, LEARNED)
DEFAULT_MAX_SHARD = 5 * 1024**3
_SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def dare_seed(seed: int, index: int, block: str) -> int:
    """The generator seed of vector ``index``'s DARE mask on ``block``: a digest, stable across runs."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{index}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def parse_size(size: int | str) -> int:
    """``"20KB"``, ``"2GB"``, ``"500MiB"`` or a byte count."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip():
            return int(float(text[: -len(unit)]) * _SIZE_UNITS[unit])
    return int(text)


# ----------------------------------------------------------------------------------------------
# Vector sources: one block at a time
# ----------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """A task vector seen block by block: ``delta(name)`` in fp32, or None where it has no such block."""

    name: str
    label: str
    kind: str
    shapes: dict[str, torch.Size]
    base_fingerprint: str | None = None
    fingerprint_names: list[str] = field(default_factory=list)
    vector: AnyTaskVector | None = None
    weights: ModelWeights | None = None
    finetuned: ModelWeights | None = None
    base: ModelWeights | None = None

    def delta(self, key: str, start: int | None = None, stop: int | None = None) -> Tensor | None:
        """Rows ``start:stop`` of this vector's block ``key`` in fp32 (the whole block by default)."""
        if key not in self.shapes:
            return None
        shape = self.shapes[key]
        start, stop = start or 0, (shape[0] if shape else 1) if stop is None else stop
        if isinstance(self.vector, LoraTaskVector):
            a, b = self.vector.factors[key]
            rows = (b[start:stop].to(torch.float32) @ a.to(torch.float32)) * self.vector.scales[key]
            out = rows.reshape((stop - start, *shape[1:]) if shape else shape)
        elif self.vector is not None:
            block = self.vector.dense_block(key)
            out = (block[start:stop] if shape else block).to(torch.float32)
        elif self.finetuned is not None and self.base is not None:
            out = self.finetuned.rows(key, start, stop).to(torch.float32) - self.base.rows(key, start, stop).to(
                torch.float32
            )
        else:
            assert self.weights is not None
            out = self.weights.rows(key, start, stop).to(torch.float32)
        if not torch.isfinite(out).all():
            raise ValueError(f"{self.label}: block '{key}' has NaN/Inf values")
        return out

    def numel(self) -> int:
        return sum(shape.numel() for shape in self.shapes.values())


def _base_blocks(base: ModelWeights) -> list[str]:
    return [key for key in base if base.dtype(key).is_floating_point and not key.endswith(BUFFER_SUFFIXES)]


def _source(item: PathLike | AnyTaskVector, base: ModelWeights, base_path: Path, allow_pickle: bool) -> _Source:
    if isinstance(item, LoraTaskVector) or hasattr(item, "dense_block"):
        vector: AnyTaskVector = item  # type: ignore[assignment]
        return _Source(vector.name, vector.name or "vector", vector.metadata.get("kind", "dense"), dict(vector.shapes),
                       vector.base_fingerprint, vector._fingerprint_names(), vector=vector)
    path = Path(item)
    if is_adapter_dir(path):
        from taskvec.hf.adapters import load_adapter

        lora = load_adapter(path, base)
        return _Source(lora.name, str(path), "lora (peft)", dict(lora.shapes), lora.base_fingerprint,
                       lora.names, vector=lora)
    if path.is_file() and path.suffix == ".safetensors":
        meta = read_safetensors_metadata(path)
        if meta.get("kind") == "lora":
            lora = LoraTaskVector.load(path)
            return _Source(lora.name or path.stem, str(path), "lora", dict(lora.shapes), lora.base_fingerprint,
                           lora.names, vector=lora)
        if meta.get("kind") == "dense":
            weights = open_weights(path)
            names = json.loads(meta.get("order", "[]")) or list(weights)
            stored = meta.get("fingerprint_blocks")
            return _Source(meta.get("name") or path.stem, str(path), "dense", {k: weights.shape(k) for k in names},
                           meta.get("base_fingerprint") or None, json.loads(stored) if stored else names,
                           weights=weights)
    # Anything else is a fine-tuned checkpoint of the base's architecture.
    check_same_architecture(base_path, path)
    finetuned = open_weights(path, allow_pickle=allow_pickle)
    blocks = _base_blocks(base)
    missing = [k for k in blocks if k not in finetuned]
    extra = [k for k in finetuned if k not in base]
    if missing or extra:
        raise CheckpointError(
            f"{path} vs base {base_path}: "
            + (f"missing tensors {missing[:5]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected tensors {extra[:5]}" if extra else "")
        )
    return _Source(path.name, str(path), "fine-tuned checkpoint", {k: finetuned.shape(k) for k in blocks},
                   finetuned=finetuned, base=base)


class _LazyBlocks(Mapping[str, Tensor]):
    def __init__(self, weights: ModelWeights, names: Sequence[str]) -> None:
        self.weights, self.names = weights, list(names)

    def __getitem__(self, key: str) -> Tensor:
        return self.weights[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _check_sources(sources: list[_Source], base: ModelWeights, base_path: Path) -> None:
    """Every vector's blocks exist in the base with the same shapes, and its base fingerprint matches."""
    prints: dict[tuple[str, ...], str] = {}
    for source in sources:
        for key, shape in source.shapes.items():
            if key not in base:
                raise BaseMismatchError(f"{source.label}: block '{key}' is not in base {base_path}")
            if base.shape(key) != shape:
                raise BaseMismatchError(
                    f"{source.label}: block '{key}' has shape {tuple(shape)}, "
                    f"base {base_path} has {tuple(base.shape(key))}"
                )
        if source.base_fingerprint:
            names = tuple(sorted(source.fingerprint_names))
            if names not in prints:
                prints[names] = fingerprint(_LazyBlocks(base, names))
            if prints[names] != source.base_fingerprint:
                raise BaseMismatchError(
                    f"{source.label} was made on a base with fingerprint {source.base_fingerprint}; "
                    f"{base_path} has {prints[names]}"
                )


# ----------------------------------------------------------------------------------------------
# TIES thresholds, exactly, in two sweeps
# ----------------------------------------------------------------------------------------------


def _row_chunks(sources: Sequence[_Source], key: str, chunk_elements: int) -> list[tuple[int, int]]:
    """Row ranges of block ``key`` holding about ``chunk_elements`` elements each."""
    shape = next(s.shapes[key] for s in sources if key in s.shapes)
    if not shape:
        return [(0, 1)]
    step = max(1, chunk_elements // max(1, shape[1:].numel()))
    return [(start, min(shape[0], start + step)) for start in range(0, shape[0], step)]


def streaming_thresholds(
    sources: list[_Source], order: Sequence[str], density: float, chunk_elements: int = 1 << 20
) -> list[float]:
    """Each vector's k-th largest |value| over its blocks (k = ceil(density * numel)), reading one block
    at a time: non-negative floats sort like their bit patterns, so a histogram of the high 16 bits
    finds the bin, and one of the low 16 bits inside it finds the exact value."""
    ks = [_kept_count(s.numel(), density) for s in sources]
    chunks = [(key, start, stop) for key in order for start, stop in _row_chunks(sources, key, chunk_elements)]
    high = [torch.zeros(1 << 15, dtype=torch.long) for _ in sources]
    for key, start, stop in chunks:
        for i, source in enumerate(sources):
            delta = source.delta(key, start, stop)
            if delta is not None:
                bits = delta.abs().reshape(-1).view(torch.int32)
                high[i] += torch.bincount(bits >> 16, minlength=1 << 15)[: 1 << 15]
    bins, needs = [], []
    for i in range(len(sources)):
        from_top = high[i].flip(0).cumsum(0)
        position = int(torch.searchsorted(from_top, torch.tensor(ks[i])))
        bins.append((1 << 15) - 1 - position)
        needs.append(ks[i] - (int(from_top[position - 1]) if position else 0))
    low = [torch.zeros(1 << 16, dtype=torch.long) for _ in sources]
    for key, start, stop in chunks:
        for i, source in enumerate(sources):
            delta = source.delta(key, start, stop)
            if delta is not None:
                bits = delta.abs().reshape(-1).view(torch.int32)
                inside = bits[(bits >> 16) == bins[i]]
                low[i] += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
    out = []
    for i, source in enumerate(sources):
        if ks[i] == source.numel():
            out.append(0.0)
            continue
        from_top = low[i].flip(0).cumsum(0)
        position = int(torch.searchsorted(from_top, torch.tensor(needs[i])))
        value_bits = (bins[i] << 16) | ((1 << 16) - 1 - position)
        out.append(float(torch.tensor(value_bits, dtype=torch.int32).view(torch.float32)))
    return out


# ----------------------------------------------------------------------------------------------
# Learned coefficients
# ----------------------------------------------------------------------------------------------


@dataclass
class _Learned:
    layout: Layout
    coefficients: Tensor

    def element_weights(self, key: str, begin: int, end: int) -> Tensor:
        """(n, end - begin) coefficients of the flattened elements ``begin:end`` of a block, as the composer
        applies them (one per part; contiguous ``rows`` parts or a fixed ``random`` partition)."""
        parts = self.layout.blocks[key]
        per_part = self.coefficients[:, parts.columns]
        if parts.sizes is not None:
            bounds = torch.cumsum(parts.sizes, 0)
            which = torch.searchsorted(bounds, torch.arange(begin, end), right=True)
            return per_part[:, which]
        if parts.index is not None:
            return per_part[:, parts.index[begin:end]]
        return per_part.expand(-1, end - begin)


def _learned(path: Path, sources: list[_Source], base: ModelWeights) -> _Learned:
    from taskvec.io import load_state_dict

    meta = read_safetensors_metadata(path)
    tensors = load_state_dict(path)
    if "coefficients" not in tensors or "vectors" not in meta or "blocks" not in meta:
        raise CheckpointError(f"{path}: not a coefficients file saved by Composer.save_coefficients")
    names = json.loads(meta["vectors"])
    mine = [s.name or f"vector_{i}" for i, s in enumerate(sources)]
    if names != mine:
        raise CheckpointError(f"{path}: coefficients were learned for vectors {names}, not for {mine}")
    if meta.get("linearized") == "True":
        raise CheckpointError(f"{path}: coefficients of a linearised composer do not give a plain network")
    blocks = json.loads(meta["blocks"])
    unknown = [k for k in blocks if k not in base]
    if unknown:
        raise CheckpointError(f"{path}: blocks {unknown[:5]} are not in the base")
    granularity = Granularity.parse(meta.get("granularity", "block"))
    granularity = Granularity(granularity.kind, granularity.parts, granularity.partition,
                              int(meta.get("partition_seed", 0)))
    layout = Layout({k: base.shape(k) for k in blocks}, granularity)
    value = tensors["coefficients"].to(torch.float32)
    if tuple(value.shape) != (len(sources), layout.num_columns):
        raise CheckpointError(
            f"{path}: coefficients have shape {tuple(value.shape)}, expected ({len(sources)}, {layout.num_columns})"
        )
    return _Learned(layout, value)


# ----------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(out_dir: PathLike, inputs: Sequence[PathLike], *, force: bool) -> Path:
    """Refuse an OUT_DIR that is, holds or lies inside an input, exists (unless ``force``), or cannot be
    written; all before any work."""
    out = Path(out_dir).resolve()
    for item in inputs:
        given = Path(item).resolve()
        if _inside(out, given) or _inside(given, out):
            raise CheckpointError(f"output directory {out_dir} overlaps the input {item}; choose another one")
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"output {out_dir} exists and is not a directory")
        if not force:
            raise CheckpointError(f"output directory {out_dir} already exists; pass --force (force=True) to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"output directory {out_dir}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"output directory {out_dir}: {parent} is not writable")
    return out


def _shard_plan(base: ModelWeights, max_shard: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key in base:
        nbytes = base.nbytes(key)
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _model_card(base_path: Path, base_print: str, sources: list[_Source], method: str, params: dict) -> str:
    rows = "\n".join(
        f"| {i} | {s.name} | {s.kind} | `{s.label}` | {s.base_fingerprint or '-'} |" for i, s in enumerate(sources)
    )
    return (
        "---\nlibrary_name: transformers\ntags:\n- taskvec\n- merge\n---\n\n"
        f"# Merged with taskvec ({method})\n\n"
        f"This model is `{base_path}` with {len(sources)} task vector(s) merged in by `taskvec merge`.\n\n"
        f"- base: `{base_path}`, fingerprint `{base_print}`\n"
        f"- method: `{method}`\n"
        f"- parameters: `{json.dumps(params, sort_keys=True)}`\n\n"
        "| # | vector | kind | source | base fingerprint |\n|---|---|---|---|---|\n"
        f"{rows}\n"
    )


def merge_parameters(method: str, params: Mapping[str, Any], *, coefficients: object = None) -> dict[str, Any]:
    """``params`` checked against ``method``'s declaration in :mod:`taskvec.methods`, defaults filled in.

    Why one function: the library, ``taskvec merge`` and its ``--config`` file all validate here, so an
    unknown method, an undeclared parameter or a value out of range reads the same everywhere.
    """
    if method == LEARNED:
        if params:
            raise MergeParameterError(
                f"merge method 'learned' takes no parameters (its coefficients file sets every weight); "
                f"got {', '.join(sorted(params))}"
            )
        if coefficients is None:
            raise ValueError("merge method 'learned' needs a coefficients file (--coefficients)")
        return {}
    if method not in registered_methods():
        raise UnknownMethodError(f"unknown merge method {method!r}; methods: {', '.join(merge_method_names())}")
    if coefficients is not None:
        raise MergeParameterError(f"a coefficients file is for merge method 'learned', not {method!r}")
    if method not in STREAMING:
        raise ValueError(f"merge method {method!r} has no streaming implementation for model directories; "
                         "use taskvec.methods.merge on task vectors in memory")
    return get_method(method).validate(params)


def merge_method_names() -> list[str]:
    """What ``taskvec merge --method`` accepts: the registered methods with a streaming form, then learned."""
    return [name for name in registered_methods() if name in STREAMING] + [LEARNED]


def merge_to_directory(
    base: PathLike,
    vectors: Sequence[PathLike | AnyTaskVector],
    out_dir: PathLike,
    *,
    method: str = "sum",
    coefficients: PathLike | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    force: bool = False,
    allow_pickle: bool = False,
    chunk_elements: int = 1 << 20,
    **params: Any,
) -> Path:
    """Merge task vectors into ``base`` and write a model directory that ``from_pretrained`` loads.

    ``base`` is a model directory or checkpoint file; each vector is a taskvec vector file, a fine-tuned
    model directory/file, a PEFT adapter directory, or an in-memory task vector. Everything is checked
    before any work; nothing is left half-written on failure. ``params`` are the method's parameters as
    declared in :mod:`taskvec.methods` (e.g. ``alpha``, ``density``); others are refused, by name.
    Blocks are processed in row chunks of about ``chunk_elements`` elements, so memory holds n chunks,
    not n blocks. Returns the output directory.
    """
    values = merge_parameters(method, params, coefficients=coefficients)
    if not vectors:
        raise ValueError("merge needs at least one task vector")
    alpha: float = values.get("alpha", 1.0)
    density: float = values.get("density", 1.0)
    drop_rate: float = values.get("drop_rate", 0.0)
    seed: int = values.get("seed", 0)
    majority: Any = values.get("majority", "total")
    base_path = Path(base)
    inputs = [base_path] + [Path(v) for v in vectors if isinstance(v, str | os.PathLike)]
    if coefficients is not None:
        inputs.append(Path(coefficients))
    out = check_output_dir(out_dir, inputs, force=force)
    max_shard = parse_size(max_shard_size)

    weights = open_weights(base_path, allow_pickle=allow_pickle)
    sources = [_source(v, weights, base_path, allow_pickle) for v in vectors]
    _check_sources(sources, weights, base_path)
    learned = None
    if method == "learned" and coefficients is not None:
        learned = _learned(Path(coefficients), sources, weights)
    blocks = _base_blocks(weights)
    covered = [k for k in blocks if any(k in s.shapes for s in sources)]
    thresholds = streaming_thresholds(sources, covered, density, chunk_elements) if method == "ties" else None
    card_params: dict[str, object] = dict(values)
    if method == LEARNED:
        card_params = {"coefficients": str(coefficients)}
    base_print = fingerprint(_LazyBlocks(weights, blocks))

    def merged(key: str) -> Iterator[Tensor]:
        """The merged block ``key`` as row chunks: n vectors' slices of one chunk in memory at a time."""
        shape = weights.shape(key)
        if key not in covered or (learned is not None and key not in learned.layout.blocks):
            yield weights[key]
            return
        row = shape[1:].numel() if shape else 1
        generators = [torch.Generator().manual_seed(dare_seed(seed, i, key)) for i in range(len(sources))]
        for start, stop in _row_chunks(sources, key, chunk_elements):
            theta = weights.rows(key, start, stop)
            update = torch.zeros(theta.shape)
            if method in ("sum", "dare", "learned"):
                coefficient = learned.element_weights(key, start * row, stop * row) if learned is not None else None
                for i, source in enumerate(sources):  # accumulate: one vector's slice at a time
                    d = source.delta(key, start, stop)
                    if d is None:
                        continue
                    if method == "dare":
                        keep = torch.rand(d.shape, generator=generators[i]) >= drop_rate
                        update += torch.where(keep, d * (1.0 / (1.0 - drop_rate)), torch.zeros(())) * alpha
                    elif coefficient is not None:
                        update += coefficient[i].reshape(d.shape) * d
                    else:
                        update += d * alpha
            else:
                slices = [source.delta(key, start, stop) for source in sources]
                stack = torch.stack([d if d is not None else torch.zeros(theta.shape) for d in slices])
                del slices
                if method == "dare_ties":
                    for i in range(len(sources)):
                        keep = torch.rand(stack[i].shape, generator=generators[i]) >= drop_rate
                        stack[i] = torch.where(keep, stack[i] * (1.0 / (1.0 - drop_rate)), torch.zeros(()))
                else:
                    assert thresholds is not None
                    limits = torch.tensor(thresholds).reshape((-1,) + (1,) * theta.dim())
                    stack = torch.where(stack.abs() >= limits, stack, torch.zeros(()))
                update = disjoint_mean(stack, elect_sign(stack, majority)) * alpha
            yield (theta.to(torch.float32) + update).to(theta.dtype)

    plan = _shard_plan(weights, max_shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise CheckpointError(f"output directory {out_dir}: cannot write in {out.parent} ({err})") from err
    try:
        names = (
            ["model.safetensors"]
            if len(plan) == 1
            else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        )
        weight_map: dict[str, str] = {}
        for keys, name in zip(plan, names, strict=True):
            specs = [(k, weights.dtype(k), weights.shape(k)) for k in keys]
            writer = SafetensorsStreamWriter(tmp / name, specs, {"format": "pt"})
            try:
                for key in keys:
                    writer.write_parts(key, merged(key))
                    weight_map[key] = name
            except BaseException:
                writer.close(complete=False)
                raise
            writer.close()
        if len(plan) > 1:
            total = sum(weights.nbytes(k) for k in weights)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if base_path.is_dir():
            for item in base_path.iterdir():
                skip = item.suffix in _WEIGHT_SUFFIXES or item.name in (SAFETENSORS_INDEX, BIN_INDEX, "README.md")
                if item.is_file() and not skip:
                    shutil.copy2(item, tmp / item.name)
        (tmp / "README.md").write_text(_model_card(base_path, base_print, sources, method, card_params))
        trash = None
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, trash / out.name)
        os.replace(tmp, out)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
