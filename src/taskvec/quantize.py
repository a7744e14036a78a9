"""Low-bit storage of a task-vector bank, and composition straight from that storage.

A bank of n vectors costs n times the network in fp32; the composer only ever needs each vector
inside a weighted sum ``sum_i w_i * tau_i`` and its adjoint ``<grad, tau_i>``. So the bank can stay
in a small format (bf16, fp16, int8, int4) and be dequantised a chunk at a time inside those two
contractions, never as a full fp32 copy.

Schemes (:class:`QuantScheme`, spelled ``fp32``, ``bf16``, ``fp16``, ``int8-row``, ``int4-block``,
``int8-g64`` ...):

- float formats round to nearest: ``|x - dq(q(x))| <= max(u * |x|, tiny / 2)`` with unit roundoff
  ``u`` = 2^-8 (bf16), 2^-11 (fp16), 0 (fp32) and ``tiny`` the smallest subnormal;
- integer formats are symmetric absmax: a group of elements shares ``scale = absmax / qmax``
  (qmax 127 for int8, 7 for int4), codes are ``round(x / scale)`` and ``|x - scale * code| <= scale / 2``,
  because ``|x / scale| <= qmax`` so the clamp never binds. Groups are a whole parameter block
  (``block``), one output row (``row``; 0-d/1-d blocks use one group) or ``g<N>`` contiguous elements
  of the flattened block. int4 codes are stored as ``code + 8`` nibbles, two per byte.

:class:`QuantizedTaskVector` saves and loads as safetensors (codes and scales per block, scheme and
shapes in the metadata). :func:`quantized_weighted_sum` is the composition kernel, and
:class:`QuantizedComposer` a :class:`~taskvec.compose.Composer` that accepts quantised vectors.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from taskvec.compose import Composer
from taskvec.granularity import BlockParts, Granularity
from taskvec.io import CheckpointError, PathLike, atomic_save_safetensors, load_state_dict, read_safetensors_metadata
from taskvec.vectors import FORMAT_VERSION, AnyTaskVector, LoraTaskVector, TaskVector, _VectorBase, fingerprint

FLOAT_FORMATS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT_FORMATS: dict[str, int] = {"int8": 127, "int4": 7}  # format -> qmax (symmetric codes in [-qmax, qmax])
GROUPINGS = ("block", "row")

#: Elements of one block that the kernel dequantises at once (times the number of vectors in the stack).
DEFAULT_CHUNK = 1 << 18


@dataclass(frozen=True)
class QuantScheme:
    """How a bank is stored: a format and, for integer formats, which elements share a scale."""

    format: str = "int8"
    grouping: str = "row"  # block | row | g<N>

    def __post_init__(self) -> None:
        if self.format not in FLOAT_FORMATS and self.format not in INT_FORMATS:
            raise ValueError(f"quantisation format {self.format!r} is not one of {[*FLOAT_FORMATS, *INT_FORMATS]}")
        if self.grouping not in GROUPINGS and not re.fullmatch(r"g[1-9]\d*", self.grouping):
            raise ValueError(f"grouping {self.grouping!r} is not 'block', 'row' or 'g<N>' (e.g. g64)")

    @classmethod
    def parse(cls, spec: str | QuantScheme) -> QuantScheme:
        """Read ``fp32``, ``bf16``, ``fp16``, ``int8`` (= ``int8-row``), ``int4-block``, ``int8-g64`` ..."""
        if isinstance(spec, QuantScheme):
            return spec
        text = spec.strip().lower()
        if text in FLOAT_FORMATS:
            return cls(text, "block")
        fmt, _, grouping = text.partition("-")
        if fmt not in INT_FORMATS:
            raise ValueError(f"unknown quantisation scheme {spec!r}: use fp32, bf16, fp16, int8[-row|-block|-gN] "
                             "or int4[-row|-block|-gN]")
        return cls(fmt, grouping or "row")

    def __str__(self) -> str:
        return self.format if self.is_float else f"{self.format}-{self.grouping}"

    @property
    def is_float(self) -> bool:
        return self.format in FLOAT_FORMATS

    @property
    def qmax(self) -> int:
        return INT_FORMATS[self.format]

    def group_size(self, shape: Sequence[int]) -> int:
        """Elements per scale for a block of ``shape`` (the whole block for float formats)."""
        numel = max(1, math.prod(shape))
        if self.is_float or self.grouping == "block":
            return numel
        if self.grouping == "row":
            return numel // shape[0] if len(shape) >= 2 and shape[0] > 0 else numel
        return int(self.grouping[1:])

    def unit_roundoff(self) -> tuple[float, float]:
        """(u, tiny) of a float format: round-to-nearest error is at most max(u*|x|, tiny/2)."""
        if self.format == "fp32":
            return 0.0, 0.0
        info = torch.finfo(FLOAT_FORMATS[self.format])
        return info.eps / 2, info.smallest_normal * info.eps  # smallest subnormal = smallest_normal * eps


# ----------------------------------------------------------------------------------------------
# One block: quantise / dequantise
# ----------------------------------------------------------------------------------------------


@dataclass
class QuantizedBlock:
    """One parameter block in storage form.

    ``codes``: the stored values, flattened and zero-padded to whole groups (float formats: the values
    in that dtype; int8: int8 codes; int4: uint8 bytes holding two nibbles). ``scales``: fp32, one per
    group (empty for float formats).
    """

    codes: Tensor
    scales: Tensor
    shape: torch.Size
    group: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


def _padded_length(numel: int, group: int, fmt: str) -> int:
    length = -(-numel // group) * group
    return length + (length % 2 if fmt == "int4" else 0)


def pack_int4(codes: Tensor) -> Tensor:
    """Signed codes in [-7, 7] (even length) -> uint8 bytes, low nibble first."""
    if codes.numel() % 2:
        raise ValueError(f"int4 packing needs an even number of codes, got {codes.numel()}")
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 bytes -> signed int8 codes (twice as many), inverse of :func:`pack_int4`."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)


def quantize_block(tensor: Tensor, scheme: QuantScheme | str, *, name: str = "") -> QuantizedBlock:
    """Store one block under ``scheme``; refuses non-finite values and fp16 overflow (naming the block)."""
    scheme = QuantScheme.parse(scheme)
    x = tensor.detach().to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"block '{name}': {int((~torch.isfinite(x)).sum())} NaN/Inf values cannot be quantised")
    shape = tensor.shape
    numel = x.numel()
    if scheme.is_float:
        dtype = FLOAT_FORMATS[scheme.format]
        limit = torch.finfo(dtype).max
        if numel and float(x.abs().max()) > limit:
            raise ValueError(f"block '{name}': |value| {float(x.abs().max()):.3g} exceeds {scheme} max {limit:.3g}")
        return QuantizedBlock(x.reshape(-1).to(dtype), torch.empty(0), shape, max(1, numel))
    group = scheme.group_size(shape)
    length = _padded_length(numel, group, scheme.format)
    flat = torch.zeros(length)
    flat[:numel] = x.reshape(-1)
    groups = -(-numel // group) if numel else 0
    grouped = flat[: groups * group].reshape(groups, group)
    scales = grouped.abs().amax(dim=1) / scheme.qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.zeros(length, dtype=torch.int8)
    codes[: groups * group] = torch.round(grouped / safe[:, None]).clamp(-scheme.qmax, scheme.qmax).reshape(-1).to(
        torch.int8
    )
    stored = pack_int4(codes) if scheme.format == "int4" else codes
    return QuantizedBlock(stored, scales, shape, group)


def _codes_range(codes: Tensor, fmt: str, start: int, stop: int) -> Tensor:
    """Stored codes of elements [start, stop) (last dim), as fp32 before scaling."""
    if fmt == "int4":
        packed = codes[..., start // 2 : (stop + 1) // 2]
        # straight into fp32 (strided writes), 3x faster than unpacking to int8 and converting
        values = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.float32, device=packed.device)
        values[..., 0::2] = packed & 0x0F
        values[..., 1::2] = packed >> 4
        offset = start % 2
        return values.sub_(8)[..., offset : offset + stop - start]
    return codes[..., start:stop].to(torch.float32)


def dequantize_range(
    codes: Tensor, scales: Tensor, fmt: str, group: int, start: int, stop: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Dequantise elements [start, stop) of one block, or of a stack of them (leading dims kept).

    Ranges inside one group, or starting on a group boundary, scale by broadcasting (no per-element
    scale tensor); other ranges gather each element's scale.
    """
    if fmt not in INT_FORMATS:
        return codes[..., start:stop].to(dtype)
    first, last = start // group, (stop - 1) // group
    if first == last:
        values = _codes_range(codes, fmt, start, stop) * scales[..., first : first + 1]
    elif start % group == 0:
        # codes are padded to whole groups, so the last group can be read in full and cut
        whole = _codes_range(codes, fmt, start, (last + 1) * group).unflatten(-1, (last + 1 - first, group))
        values = (whole * scales[..., first : last + 1, None]).flatten(-2)[..., : stop - start]
    else:
        index = torch.arange(start, stop, device=scales.device) // group
        values = _codes_range(codes, fmt, start, stop) * scales[..., index]
    return values.to(dtype)


def dequantize_block(block: QuantizedBlock, fmt: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """The stored block back as a dense tensor of its shape."""
    return dequantize_range(block.codes, block.scales, fmt, block.group, 0, block.numel, dtype).reshape(block.shape)


def error_bound(tensor: Tensor, scheme: QuantScheme | str) -> Tensor:
    """Per-element worst-case ``|x - dq(q(x))|`` that :func:`quantize_block` guarantees for ``tensor``."""
    scheme = QuantScheme.parse(scheme)
    x = tensor.detach().to(torch.float32)
    if scheme.is_float:
        u, tiny = scheme.unit_roundoff()
        return torch.clamp(u * x.abs(), min=tiny / 2)
    block = quantize_block(x, scheme)
    per_element = torch.repeat_interleave(block.scales, block.group)[: x.numel()]
    return per_element.reshape(x.shape) / 2


# ----------------------------------------------------------------------------------------------
# The quantised task vector
# ----------------------------------------------------------------------------------------------


class QuantizedTaskVector(_VectorBase):
    """A task vector held in a :class:`QuantScheme`: one :class:`QuantizedBlock` per parameter block.

    It offers the shared task-vector interface (``names``, ``shapes``, ``dense_block``,
    ``check_base``, ``apply_to``), dequantising a block only when it is asked for.
    """

    def __init__(
        self,
        blocks: Mapping[str, QuantizedBlock],
        scheme: QuantScheme | str,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not blocks:
            raise ValueError("a quantised task vector needs at least one block; got none")
        self.scheme = QuantScheme.parse(scheme)
        self.blocks: dict[str, QuantizedBlock] = dict(blocks)
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}

    @classmethod
    def from_vector(cls, vector: AnyTaskVector, scheme: QuantScheme | str) -> QuantizedTaskVector:
        """Quantise a dense or LoRA vector (LoRA blocks are densified one at a time)."""
        scheme = QuantScheme.parse(scheme)
        blocks = {
            key: quantize_block(vector.dense_block(key, torch.float32), scheme, name=f"{vector.name}:{key}")
            for key in vector.names
        }
        meta = dict(vector.metadata)
        if isinstance(vector, LoraTaskVector) and "fingerprint_blocks" not in meta:
            meta["fingerprint_blocks"] = json.dumps(vector.names)  # its print covers only the adapted blocks
        return cls(blocks, scheme, metadata=meta)

    @property
    def names(self) -> list[str]:
        return list(self.blocks)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {key: block.shape for key, block in self.blocks.items()}

    def dense_block(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_block(self.blocks[name], self.scheme.format, dtype or torch.float32)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> TaskVector:
        """The dequantised vector (what the composition kernel computes with)."""
        meta = {k: v for k, v in self.metadata.items() if k != "fingerprint_blocks"}
        meta["kind"] = "dense"
        return TaskVector({key: self.dense_block(key, dtype) for key in self.names}, metadata=meta, check_finite=False)

    def content_fingerprint(self) -> str:
        """A digest of the stored codes and scales (with block shapes and scheme), without dequantising.

        Why: a :class:`~taskvec.compose.Composer` records which vectors its coefficients scale; a
        quantised vector is its own vector, so its print differs from the dense one it came from.
        """
        stored: dict[str, Tensor] = {}
        for key, block in self.blocks.items():
            tag = f"{key}{tuple(block.shape)}:{self.scheme}"
            stored[f"{tag}.codes"] = block.codes
            if block.scales.numel():
                stored[f"{tag}.scales"] = block.scales
        return fingerprint(stored)

    def nbytes(self) -> int:
        """Bytes of the stored codes and scales."""
        return sum(block.nbytes() for block in self.blocks.values())

    def __repr__(self) -> str:
        return (f"QuantizedTaskVector(name={self.name!r}, scheme={self.scheme}, blocks={len(self.blocks)}, "
                f"bytes={self.nbytes():,})")

    def save(self, path: PathLike) -> Path:
        """Safetensors with ``<block>.codes`` / ``<block>.scales``; scheme, shapes and order in the metadata."""
        tensors: dict[str, Tensor] = {}
        for key, block in self.blocks.items():
            tensors[f"{key}.codes"] = block.codes
            if block.scales.numel():
                tensors[f"{key}.scales"] = block.scales
        meta = dict(self.metadata)
        meta.update(
            format=FORMAT_VERSION,
            kind="quantized",
            scheme=str(self.scheme),
            shapes=json.dumps({key: list(block.shape) for key, block in self.blocks.items()}),
            groups=json.dumps({key: block.group for key, block in self.blocks.items()}),
        )
        return atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: PathLike) -> QuantizedTaskVector:
        """Read a file written by :meth:`save`, checking every block's codes and scales against its shape."""
        meta = read_safetensors_metadata(path)
        if meta.get("kind") != "quantized":
            raise CheckpointError(f"{path}: not a quantised task vector (metadata kind={meta.get('kind')!r})")
        try:
            scheme = QuantScheme.parse(meta["scheme"])
            shapes = json.loads(meta["shapes"])
            groups = json.loads(meta["groups"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: bad quantisation metadata ({err})") from err
        tensors = load_state_dict(path)
        blocks: dict[str, QuantizedBlock] = {}
        for key, shape in shapes.items():
            shape = torch.Size(shape)
            group = int(groups.get(key, 0))
            if group != scheme.group_size(shape):
                raise CheckpointError(f"{path}: block '{key}' has group {group}, {scheme} needs "
                                      f"{scheme.group_size(shape)} for shape {tuple(shape)}")
            codes = tensors.get(f"{key}.codes")
            if codes is None:
                raise CheckpointError(f"{path}: missing tensor '{key}.codes'")
            numel = math.prod(shape)
            if scheme.is_float:
                expected, dtype, scales = numel, FLOAT_FORMATS[scheme.format], torch.empty(0)
            else:
                length = _padded_length(numel, group, scheme.format)
                expected = length // 2 if scheme.format == "int4" else length
                dtype = torch.uint8 if scheme.format == "int4" else torch.int8
                scales = tensors.get(f"{key}.scales", torch.empty(0))
                n_groups = -(-numel // group) if numel else 0
                if tuple(scales.shape) != (n_groups,) or scales.dtype != torch.float32:
                    raise CheckpointError(f"{path}: '{key}.scales' is {scales.dtype} {tuple(scales.shape)}, "
                                          f"expected float32 ({n_groups},)")
            if tuple(codes.shape) != (expected,) or codes.dtype != dtype:
                raise CheckpointError(f"{path}: '{key}.codes' is {codes.dtype} {tuple(codes.shape)}, "
                                      f"expected {dtype} ({expected},) for {scheme} shape {tuple(shape)}")
            blocks[key] = QuantizedBlock(codes, scales, shape, group)
        rest = {k: v for k, v in meta.items() if k not in ("shapes", "groups", "scheme")}
        return cls(blocks, scheme, metadata=rest)


def quantize_bank(vectors: Iterable[AnyTaskVector], scheme: QuantScheme | str) -> list[QuantizedTaskVector]:
    """Quantise every vector of a bank under one scheme."""
    return [QuantizedTaskVector.from_vector(vector, scheme) for vector in vectors]


# ----------------------------------------------------------------------------------------------
# Composition kernel
# ----------------------------------------------------------------------------------------------


class QuantizedStack(nn.Module):
    """One parameter block of m quantised vectors, stacked in storage form (buffers, so ``.to`` moves them).

    :meth:`weighted_sum` and :meth:`contract` are the two contractions the composer needs; both walk
    the block in chunks of ``chunk`` elements, so at most (m, chunk) values are ever dequantised at once.
    """

    codes: Tensor
    scales: Tensor

    def __init__(self, blocks: Sequence[QuantizedBlock], scheme: QuantScheme, *, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a quantised stack needs at least one block")
        shapes = {tuple(b.shape) for b in blocks}
        if len(shapes) != 1:
            raise ValueError(f"blocks of one stack must share a shape; got {sorted(shapes)}")
        self.format = scheme.format
        self.shape = blocks[0].shape
        self.numel = blocks[0].numel
        self.group = blocks[0].group
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 element, got {chunk}")
        self.chunk = chunk
        self.register_buffer("codes", torch.stack([b.codes for b in blocks]), persistent=False)
        self.register_buffer("scales", torch.stack([b.scales for b in blocks]), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` / ``.double()`` must not cast the stored codes or scales; only devices move."""
        dtypes = (self.codes.dtype, self.scales.dtype)
        super()._apply(fn, recurse)
        self.codes, self.scales = self.codes.to(dtypes[0]), self.scales.to(dtypes[1])
        return self

    def ranges(self, dtype: torch.dtype | None = None) -> Iterable[tuple[int, int]]:
        """Element ranges of at most ``chunk``, made of whole groups or lying inside one group.

        A stack already stored in ``dtype`` needs no conversion, hence no temporary: one range.
        """
        if dtype is not None and self.codes.dtype == dtype:
            yield 0, self.numel
            return
        if self.group <= self.chunk:
            step = (self.chunk // self.group) * self.group
            for start in range(0, self.numel, step):
                yield start, min(self.numel, start + step)
            return
        for group_start in range(0, self.numel, self.group):
            group_stop = min(self.numel, group_start + self.group)
            for start in range(group_start, group_stop, self.chunk):
                yield start, min(group_stop, start + self.chunk)

    def dequantize(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """(m, stop - start) dequantised values of elements [start, stop)."""
        return dequantize_range(self.codes, self.scales, self.format, self.group, start, stop, dtype)

    def weighted_sum(self, weights: Tensor, base: Tensor | None = None, *, parts: BlockParts | None = None) -> Tensor:
        """Flat ``base + sum_i w_i * dq(q_i)`` (no base: just the sum), in weights' dtype.

        ``weights`` is (m,) or, with ``parts``, (m, K): one coefficient per part of the block.
        """
        out = torch.empty(self.numel, dtype=weights.dtype, device=weights.device)
        for start, stop in self.ranges(weights.dtype):
            values = self.dequantize(start, stop, weights.dtype)
            if parts is None:
                out[start:stop] = weights @ values
            else:
                out[start:stop] = (weights[:, element_parts(parts, start, stop, weights.device)] * values).sum(0)
        return out if base is None else out.add_(base.reshape(-1).to(out.dtype))

    def contract(self, grad: Tensor, *, parts: BlockParts | None = None, num_parts: int = 1) -> Tensor:
        """``<grad, dq(q_i)>`` per vector: (m,), or (m, K) summed within each part."""
        m = self.codes.shape[0]
        flat = grad.reshape(-1)
        out = torch.zeros((m,) if parts is None else (m, num_parts), dtype=grad.dtype, device=grad.device)
        for start, stop in self.ranges(grad.dtype):
            values = self.dequantize(start, stop, grad.dtype)
            if parts is None:
                out += values @ flat[start:stop]
            else:
                out.index_add_(1, element_parts(parts, start, stop, grad.device), values * flat[start:stop])
        return out


def element_parts(parts: BlockParts, start: int, stop: int, device: torch.device | None = None) -> Tensor:
    """Local part (0..K-1) of each element in [start, stop) of a block split by a layout."""
    if parts.index is not None:
        return parts.index[start:stop].to(device)
    if parts.sizes is None:
        return torch.zeros(stop - start, dtype=torch.long, device=device)
    bounds = torch.cumsum(parts.sizes, 0).to(device)
    return torch.bucketize(torch.arange(start, stop, device=device), bounds, right=True)


class _QuantizedWeightedSum(torch.autograd.Function):
    """Forward ``sum_i w_i * dq(q_i)``; backward ``grad_w_i = <grad, dq(q_i)>``; saves only the stack."""

    @staticmethod
    def forward(ctx, weights: Tensor, stack: QuantizedStack, parts: BlockParts | None) -> Tensor:
        ctx.stack, ctx.parts, ctx.num_parts = stack, parts, weights.shape[1] if weights.dim() == 2 else 1
        return stack.weighted_sum(weights, parts=parts)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return ctx.stack.contract(grad_output, parts=ctx.parts, num_parts=ctx.num_parts), None, None


def quantized_weighted_sum(weights: Tensor, stack: QuantizedStack, parts: BlockParts | None = None) -> Tensor:
    """Differentiable flat composition of one block from its quantised stack.

    ``weights``: (m,) one coefficient per vector, or (m, K) with ``parts`` (the block's
    :class:`~taskvec.granularity.BlockParts`) for aTLAS x K. Gradients flow to ``weights`` only.
    """
    m = stack.codes.shape[0]
    if weights.shape[0] != m or (parts is None) != (weights.dim() == 1):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not fit a stack of {m} vectors "
                         f"({'with' if parts is not None else 'without'} parts)")
    return _QuantizedWeightedSum.apply(weights, stack, parts)


class QuantizedComposer(Composer):
    """A :class:`~taskvec.compose.Composer` whose bank may hold :class:`QuantizedTaskVector` s.

    Quantised vectors are stacked per block in storage form (one scheme per composer) and composed by
    :func:`quantized_weighted_sum`; dense and LoRA vectors in the same bank go the usual way.
    """

    def __init__(self, base: nn.Module, vectors: Sequence[AnyTaskVector | QuantizedTaskVector],
                 granularity: Granularity | str = "block", *, chunk: int = DEFAULT_CHUNK, **kwargs) -> None:
        schemes = {str(v.scheme) for v in vectors if isinstance(v, QuantizedTaskVector)}
        if len(schemes) > 1:
            raise ValueError(f"one composer stores one scheme; the bank mixes {sorted(schemes)}")
        self._chunk = chunk
        self._quantized: dict[str, list[int]] = {}
        self._stacks_pending: dict[str, QuantizedStack] = {}
        super().__init__(base, vectors, granularity, **kwargs)  # type: ignore[arg-type]
        self.stacks = nn.ModuleDict(self._stacks_pending)
        del self._stacks_pending

    def _stack_block(self, position: int, name: str, vectors: Sequence) -> dict[str, object]:
        plan = super()._stack_block(position, name, vectors)
        quantized = [i for i, v in enumerate(vectors) if isinstance(v, QuantizedTaskVector) and name in v.names]
        self._quantized[name] = quantized
        if quantized:
            scheme = vectors[quantized[0]].scheme
            blocks = [vectors[i].blocks[name] for i in quantized]
            self._stacks_pending[str(position)] = QuantizedStack(blocks, scheme, chunk=self._chunk)
        return plan

    def block_delta(self, name: str, coefficients: Tensor) -> Tensor:
        plan = self._plan[name]
        total = super().block_delta(name, coefficients).reshape(-1) if plan["dense"] or plan["lora"] else None
        quantized = self._quantized[name]
        if quantized:
            parts = self.layout.blocks[name]
            stack = cast(QuantizedStack, self.stacks[str(self._positions[name])])
            rows = coefficients[quantized]
            if parts.parts == 1:
                flat = quantized_weighted_sum(rows[:, int(cast(int, plan["column"]))], stack)
            else:
                flat = quantized_weighted_sum(rows[:, parts.columns], stack, parts)
            total = flat if total is None else total + flat
        assert total is not None
        return total.reshape(self.layout.shapes[name])

    def bank_nbytes(self) -> int:
        """Bytes held by the composer's bank: quantised stacks plus any dense/LoRA buffers."""
        held = [*self.stacks.buffers(), *(b for n, b in self._bank.named_buffers() if not n.startswith(("sizes",
                                                                                                         "index")))]
        return sum(t.numel() * t.element_size() for t in held)
