"""The composer: theta(Lambda) = theta_0 + sum_i Lambda_i * tau_i, with only Lambda trainable.

:class:`Composer` wraps a frozen copy of the base network and a bank of task vectors. Its forward
runs the network through :func:`torch.func.functional_call` on composed weights, so one backward
pass gives every coefficient's gradient ``<dL/dtheta_j, tau_ij>``. :meth:`Composer.merge` bakes the
composition into a plain copy of the network, which then runs exactly as fast as the base.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import mmap
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypedDict, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from taskvec.granularity import BlockParts, Granularity, Layout
from taskvec.graphed import GraphedComposition, graphed_composition
from taskvec.io import (
    DIGEST_KEY,
    DIGEST_MARK_KEY,
    CheckpointError,
    PathLike,
    atomic_save_safetensors,
    digest_metadata,
    digest_mismatch,
    digest_tensor,
    load_state_dict,
    read_safetensors_metadata,
    recorded_digest,
)
from taskvec.quantize import DEFAULT_CHUNK, QuantizedStack, QuantizedTaskVector, quantized_weighted_sum
from taskvec.vectors import AnyTaskVector, LoraTaskVector, TaskVector, fingerprint, parameter_blocks


def _is_plain(tensor: Tensor) -> bool:
    """False under vmap / grad / jvp transforms, where only pure-torch autograd rules compose."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _low_precision(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _split(values: Tensor, dtype: torch.dtype) -> Tensor:
    """(2, k): ``values`` as a high and a low part in ``dtype`` whose sum is ``values`` to ~16 bits."""
    high = values.to(dtype)
    return torch.stack([high, (values - high.to(values.dtype)).to(dtype)])


class _Scratch:
    """One small reusable buffer per device and dtype for converting low-precision tiles on CPU.

    Why: CPUs without bf16 arithmetic have no mixed-precision product, and casting a whole
    (m, numel) block to a fresh tensor costs an allocation (page faults) and a block-sized transient
    every step. Tiles of at most ``ELEMENTS`` are converted into a buffer that lives as long as the
    composer and stays in cache, so the bank is still read once and never copied.
    """

    ELEMENTS = 1 << 20  # 4 MiB of fp32

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def tiles(self, stack: Tensor, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
        """(start, end, stack[:, start:end] converted to ``dtype``) over column tiles of ``stack``."""
        rows, columns = stack.shape
        width = max(1, min(columns, self.ELEMENTS // max(1, rows)))
        key = (stack.device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < rows * width:
            buffer = torch.empty(rows * width, dtype=dtype, device=stack.device)
            self._buffers[key] = buffer
        for start in range(0, columns, width):
            end = min(columns, start + width)
            tile = buffer[: rows * (end - start)].view(rows, end - start)
            tile.copy_(stack[:, start:end])
            yield start, end, tile


class _DenseStack:
    """One block's dense task vectors as an (m, numel) matrix kept in its storage dtype.

    The storage interface the fused kernel relies on (another kind, e.g. a quantised stack that
    dequantises tiles on the fly, only has to provide the same two methods):

    * ``weighted_sum(weights, base)``: ``base + weights @ stack`` as one fp32 (or weights-dtype) row,
    * ``contract(grad)``: ``stack @ grad``, the (m,) coefficient gradient, accumulated in fp32.

    Each reads the stack exactly once. The tensor itself lives in the composer's ``_bank`` module
    (so ``.to(device)`` moves it); the stack only remembers its key.
    """

    def __init__(self, bank: _Bank, key: str, scratch: _Scratch) -> None:
        self.bank = bank
        self.key = key
        self.scratch = scratch

    @property
    def tensor(self) -> Tensor:
        return self.bank.get(self.key)

    @staticmethod
    def _mixed_product(stack: Tensor, dtype: torch.dtype) -> bool:
        """True where one product can read bf16/fp16 and accumulate into fp32 (CUDA)."""
        return stack.device.type == "cuda" and _low_precision(stack.dtype) and dtype == torch.float32

    def weighted_sum(self, weights: Tensor, base: Tensor | None = None) -> Tensor:
        stack = self.tensor
        if stack.dtype == weights.dtype:
            if base is None:
                return weights @ stack
            if base.dtype == weights.dtype:
                return torch.addmm(base[None], weights[None], stack)[0]
            return base + (weights @ stack).to(base.dtype)
        if self._mixed_product(stack, weights.dtype):
            # Coefficients as a hi + lo pair of bf16/fp16 rows keep ~16 mantissa bits; one pass over the stack.
            delta = torch.mm(_split(weights, stack.dtype), stack, out_dtype=torch.float32).sum(0)
            return delta if base is None else base + delta.to(base.dtype)
        out = torch.empty(stack.shape[1], dtype=weights.dtype, device=stack.device)
        row = weights[None]
        for start, end, tile in self.scratch.tiles(stack, weights.dtype):
            target = out[start:end][None]
            if base is not None and base.dtype == weights.dtype:
                torch.addmm(base[start:end][None], row, tile, out=target)
            else:
                torch.mm(row, tile, out=target)
        if base is not None and base.dtype != weights.dtype:
            return base + out.to(base.dtype)
        return out

    def contract(self, grad: Tensor) -> Tensor:
        stack = self.tensor
        if stack.dtype == grad.dtype:
            return stack @ grad
        if self._mixed_product(stack, grad.dtype):
            return torch.mm(stack, _split(grad, stack.dtype).t(), out_dtype=torch.float32).sum(1)
        total = torch.zeros(stack.shape[0], dtype=grad.dtype, device=stack.device)
        for start, end, tile in self.scratch.tiles(stack, grad.dtype):
            total.addmv_(tile, grad[start:end])
        return total


class _BlockStack(Protocol):
    """What the fused kernel needs of one block's stored vectors (dense, quantised or chained)."""

    def weighted_sum(self, weights: Tensor, base: Tensor | None = None) -> Tensor: ...

    def contract(self, grad: Tensor) -> Tensor: ...


class _ChainedStack:
    """Several stacks of one block (e.g. its dense rows, then its quantised rows) read as one.

    ``weights`` / the contraction are split by ``counts`` in order, so the fused kernel sees a single
    (sum(counts),)-row stack whose rows are the concatenation of the parts' rows.
    """

    def __init__(self, stacks: Sequence[_BlockStack], counts: Sequence[int]) -> None:
        self.stacks = list(stacks)
        self.counts = list(counts)

    def weighted_sum(self, weights: Tensor, base: Tensor | None = None) -> Tensor:
        for stack, part in zip(self.stacks, weights.split(self.counts), strict=True):
            base = stack.weighted_sum(part, base)
        assert base is not None
        return base

    def contract(self, grad: Tensor) -> Tensor:
        return torch.cat([stack.contract(grad).to(grad.dtype) for stack in self.stacks])


class _WeightedSum(torch.autograd.Function):
    """``weights @ stack`` that keeps only the stored (possibly bf16) stack for backward.

    Autograd would otherwise save the fp32 cast of every stacked block, doubling the memory of a
    bf16 bank. vmap support comes from the generated rule (used by sample-specific composition).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(weights: Tensor, stack: Tensor) -> Tensor:
        return weights @ stack.to(weights.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, stack = inputs
        ctx.save_for_backward(stack)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (stack,) = ctx.saved_tensors
        return stack.to(grad_output.dtype) @ grad_output, None


def weighted_sum(weights: Tensor, stack: Tensor) -> Tensor:
    """Sum of the rows of ``stack`` (m, numel) weighted by ``weights`` (m,), computed in weights' dtype.

    The generic path (any transform, e.g. vmap over per-sample coefficients); plain training steps
    go through :class:`_ComposeBlocks` instead.
    """
    if stack.dtype == weights.dtype:
        return weights @ stack
    return _WeightedSum.apply(weights, stack)


class _ComposeBlocks(torch.autograd.Function):
    """theta_0 + sum_i Lambda_i tau_i for every dense, one-column block, as one autograd node.

    Forward: one ``addmm`` per block (base + weights @ stack), reading the stack once in its storage
    dtype. Backward: one product per block (stack @ grad) written straight into the coefficient
    gradient. Why one node: a composer of a real network has hundreds of blocks, and the gather,
    product, reshape and add nodes per block of the generic path cost more than the products.
    """

    @staticmethod
    def forward(ctx, coefficients: Tensor, plan: list, *bases: Tensor):  # type: ignore[override]
        ctx.plan = plan
        ctx.coefficient_shape = coefficients.shape
        ctx.coefficient_dtype = coefficients.dtype
        outputs = []
        # The composition itself never runs under autocast: bases keep their dtype, sums accumulate
        # in the coefficients' dtype; the network that consumes the blocks autocasts as usual.
        with torch.no_grad(), torch.autocast(coefficients.device.type, enabled=False):
            for (stack, rows, column, parts), base in zip(plan, bases, strict=True):
                selected = coefficients if rows is None else coefficients[rows]
                if parts is None:
                    composed = stack.weighted_sum(selected[:, column], base.reshape(-1))
                else:  # only quantised stacks take per-part weights (m, K); see _fused_plan
                    composed = stack.weighted_sum(selected[:, column], base.reshape(-1), parts=parts)
                outputs.append(composed.to(base.dtype).view(base.shape))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        plan = ctx.plan
        total: Tensor | None = None
        for (stack, rows, column, parts), grad in zip(plan, grads, strict=True):
            if grad is None:
                continue
            if total is None:
                total = torch.zeros(ctx.coefficient_shape, dtype=ctx.coefficient_dtype, device=grad.device)
            flat = grad.reshape(-1).to(ctx.coefficient_dtype)
            if parts is not None:
                contribution = stack.contract(flat, parts=parts, num_parts=parts.parts)
                index = (slice(None), column) if rows is None else (rows[:, None], column[None, :])
                total[index] += contribution.to(total.dtype)
                continue
            contribution = stack.contract(flat)
            if rows is None:
                total[:, column] += contribution.to(total.dtype)
            else:
                total[rows, column] += contribution.to(total.dtype)
        return (total, None) + (None,) * len(grads)


class _Bank(nn.Module):
    """Frozen per-block tensors of the bank, registered as buffers so ``.to(device)`` moves them."""

    def __init__(self) -> None:
        super().__init__()

    def put(self, key: str, tensor: Tensor) -> None:
        self.register_buffer(key, tensor, persistent=False)

    def get(self, key: str) -> Tensor:
        return getattr(self, key)


class _BlockPlan(TypedDict):
    """How one block is composed: which vectors are dense, LoRA or quantised, and the column of a 1-part block."""

    dense: list[int]
    lora: list[int]
    quantized: list[int]
    column: int


# (block, stack, rows or None for all vectors, column (1 part) or columns (K parts), parts if K > 1)
_FusedEntry = tuple[str, _BlockStack | QuantizedStack, Tensor | None, int | Tensor, BlockParts | None]


def entry_plan(entries: Sequence[_FusedEntry], device: torch.device) -> list:
    """(stack, rows, column(s), parts) per entry, indexes on ``device``: what :class:`_ComposeBlocks` reads."""
    return [(stack, None if rows is None else rows.to(device),
             column if isinstance(column, int) else column.to(device), parts)
            for _, stack, rows, column, parts in entries]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}


def map_safetensors(path: PathLike) -> tuple[dict[str, Tensor], dict[str, str], mmap.mmap]:
    """Zero-copy tensors over a memory-mapped safetensors file, its metadata, and the mapping.

    The mapping is private copy-on-write (writes, which the composer never makes, would not reach
    the file). Tensors are views of the mapping: reading one touches only its own pages.
    """
    file = Path(path)
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file}: too short to be a safetensors file")
        length = struct.unpack("<Q", head)[0]
        try:
            header = json.loads(handle.read(length))
        except ValueError as err:
            raise CheckpointError(f"{file}: unreadable safetensors header ({err})") from err
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    start = 8 + length
    tensors: dict[str, Tensor] = {}
    for key, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{file}: tensor '{key}' has dtype {entry.get('dtype')}; task vectors are float")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or start + end > len(mapping):
            raise CheckpointError(f"{file}: tensor '{key}' offsets {begin}..{end} do not fit shape {shape}")
        if count:
            flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=start + begin)
        else:
            flat = torch.empty(0, dtype=dtype)
        tensors[key] = flat.view(shape)
    return tensors, metadata, mapping


_FINITE_CHUNK = 1 << 14  # elements per isfinite call: temporaries this small are reused, not left in the heap


def _check_finite(file: Path, name: str, tensor: Tensor) -> None:
    flat = tensor.reshape(-1)
    for begin in range(0, flat.numel(), _FINITE_CHUNK):
        if not bool(torch.isfinite(flat[begin : begin + _FINITE_CHUNK]).all()):
            raise CheckpointError(f"{file}: block '{name}' holds NaN or inf values")


class _MappedVector(TaskVector):
    """A dense task vector whose blocks are views of a memory-mapped file (see :func:`map_safetensors`)."""

    source: Path
    _mapping: mmap.mmap | None
    _fingerprint: str

    @classmethod
    def open(cls, path: PathLike) -> _MappedVector:
        """Map ``path``, verify its digest and values in one pass over its pages, then drop the pages.

        Why one pass here: the digest, the finite check and the content fingerprint all read the
        file; done together, only this file's pages are resident, never the whole bank's files.
        """
        file = Path(path)
        tensors, metadata, mapping = map_safetensors(file)
        try:
            if metadata.get("kind") == "lora":
                raise CheckpointError(f"{file}: holds a LoRA task vector; Composer.from_files takes dense vectors")
            digest = hashlib.sha256()
            for name in sorted(tensors):
                digest_tensor(digest, name, tensors[name])  # hashed in place, view by view
                _check_finite(file, name, tensors[name])
            digest_metadata(digest, metadata)
            recorded = recorded_digest(file, metadata)
            metadata.pop(DIGEST_KEY, None)
            metadata.pop(DIGEST_MARK_KEY, None)
            if recorded is not None and digest.hexdigest() != recorded:
                raise digest_mismatch(file)
            order = json.loads(metadata.pop("order", "[]"))
            if sorted(order) == sorted(tensors):
                tensors = {key: tensors[key] for key in order}
            try:
                vector = cls(tensors, metadata=metadata, check_finite=False)  # checked above
            except (ValueError, TypeError) as err:
                raise CheckpointError(f"{file}: {err}") from err
            vector.source = file
            vector._mapping = mapping
            vector._fingerprint = fingerprint(vector.tensors)  # while the pages are resident
        finally:
            _drop_pages(mapping)
        return vector

    def content_fingerprint(self) -> str:
        return self._fingerprint

    def release(self) -> None:
        """Drop the resident pages of the file (the views stay valid and fault pages back in if read)."""
        if self._mapping is not None:
            _drop_pages(self._mapping)


def _drop_pages(mapping: mmap.mmap) -> None:
    if hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)


class Composer(nn.Module):
    """A frozen base network plus a bank of task vectors, with trainable ``coefficients``.

    ``coefficients`` has shape (n_vectors, n_columns); the :class:`~taskvec.granularity.Layout` maps
    columns to blocks. The caller's base model and vectors are never modified (the base is copied).
    ``blocks`` restricts composition to some blocks (the rest stay at theta_0). With
    ``linearized=True`` the network is replaced by its first-order expansion at theta_0.
    ``base_eval=True`` keeps the base in eval mode even in ``train()``, so normalisation statistics
    stay frozen, as they were when the vectors were fine-tuned.

    The bank may mix dense, LoRA and :class:`~taskvec.quantize.QuantizedTaskVector` s (one scheme per
    block); quantised ones stay in storage form and are dequantised ``chunk`` elements at a time.
    ``recompute=True`` composes module by module during training and again in the backward pass
    (:mod:`taskvec.recompute`): no whole composed copy of the network is held, for one more bank read.
    ``cuda_graphs=True`` replays the composition as CUDA graphs when the coefficients are on a GPU
    (:mod:`taskvec.graphed`): the same results without one kernel launch per block; no effect on CPU.
    """

    GRAPH_DEVICES: tuple[str, ...] = ("cuda",)  # where cuda_graphs takes effect

    def __init__(
        self,
        base: nn.Module,
        vectors: Sequence[AnyTaskVector | QuantizedTaskVector],
        granularity: Granularity | str = "block",
        *,
        init: float | Tensor = 0.0,
        blocks: Iterable[str] | None = None,
        linearized: bool = False,
        check_base: bool = True,
        base_eval: bool = True,
        copy_base: bool = True,
        chunk: int = DEFAULT_CHUNK,
        recompute: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        if recompute and cuda_graphs:
            raise ValueError("recompute=True and cuda_graphs=True exclude each other: recompute composes "
                             "module by module, a graph composes every block at once")
        self.recompute = recompute
        self.cuda_graphs = cuda_graphs
        self._graphed: GraphedComposition | None = None
        self._graphs_failed = False
        self._chunk = chunk  # elements per dequantised tile of a quantised stack
        if not vectors:
            raise ValueError("the bank is empty: a composer needs at least one task vector")
        # copy_base=False adopts the caller's module (frozen in place): for bases too large to hold twice.
        self.base = copy.deepcopy(base) if copy_base else base
        self.base.requires_grad_(False)
        self.base_eval = base_eval
        self.linearized = linearized
        base_blocks = parameter_blocks(self.base)
        if check_base:
            for vector in vectors:
                vector.check_base(base_blocks)
        covered = {name for vector in vectors for name in vector.names}
        wanted = list(blocks) if blocks is not None else [name for name in base_blocks if name in covered]
        unknown = [name for name in wanted if name not in base_blocks]
        if unknown:
            raise KeyError(f"blocks not in the base model: {unknown[:5]}")
        if not wanted:
            raise ValueError("no block of the base model is covered by any task vector")
        self.vector_names = [vector.name or f"vector_{i}" for i, vector in enumerate(vectors)]
        # What a coefficients file is checked against: which vectors, in order, on which base.
        self.vector_fingerprints = [vector.content_fingerprint() for vector in vectors]
        self.base_fingerprint = fingerprint(base_blocks)
        self.layout = Layout({name: base_blocks[name].shape for name in wanted}, granularity)
        self._bank = _Bank()
        self._scratch = _Scratch()
        self._stacks: dict[str, _DenseStack] = {}
        self.stacks = nn.ModuleDict()  # quantised stacks by block position (modules, so .to() moves them)
        self._plan: dict[str, _BlockPlan] = {}
        for position, name in enumerate(wanted):
            self._plan[name] = self._stack_block(position, name, vectors)
            parts = self.layout.blocks[name]
            if parts.sizes is not None:
                self._bank.put(f"sizes_{position}", parts.sizes)
            if parts.index is not None:
                self._bank.put(f"index_{position}", parts.index)
        self._fill_dense(vectors)
        self._positions = {name: position for position, name in enumerate(wanted)}
        self._fused = self._fused_plan(len(vectors))
        if cuda_graphs and self._fused is None:
            raise ValueError("cuda_graphs=True needs the fused composition: no LoRA vectors, no linearisation, "
                             "one column per block for dense vectors")
        self.coefficients = nn.Parameter(self._initial(init, len(vectors)))

    # -- construction helpers ------------------------------------------------------------------

    def _stack_block(
        self, position: int, name: str, vectors: Sequence[AnyTaskVector | QuantizedTaskVector]
    ) -> _BlockPlan:
        dense = [i for i, v in enumerate(vectors) if isinstance(v, TaskVector) and name in v.names]
        loras = {i: v for i, v in enumerate(vectors) if isinstance(v, LoraTaskVector) and name in v.names}
        lora = list(loras)
        quantized = [i for i, v in enumerate(vectors) if isinstance(v, QuantizedTaskVector) and name in v.names]
        plan: _BlockPlan = {"dense": dense, "lora": lora, "quantized": quantized,
                            "column": int(self.layout.blocks[name].columns[0])}
        if quantized:
            chosen = [vectors[i] for i in quantized]
            self.stacks[str(position)] = QuantizedStack.of(chosen, name, chunk=self._chunk)  # type: ignore[arg-type]
            self._bank.put(f"quant_idx_{position}", torch.tensor(quantized, dtype=torch.long))
        if dense:
            dtype = vectors[dense[0]].tensors[name].dtype  # type: ignore[union-attr]
            for i in dense[1:]:
                dtype = torch.promote_types(dtype, vectors[i].tensors[name].dtype)  # type: ignore[union-attr]
            numel = int(self.layout.shapes[name].numel())
            # Filled vector by vector in _fill_dense, so a memory-mapped vector can be released at once.
            stack = torch.empty((len(dense), numel), dtype=dtype)
            self._bank.put(f"dense_{position}", stack)
            self._stacks[name] = _DenseStack(self._bank, f"dense_{position}", self._scratch)
            self._bank.put(f"dense_idx_{position}", torch.tensor(dense, dtype=torch.long))
        if lora:
            a_cat = torch.cat([loras[i].factors[name][0] for i in lora])
            b_cat = torch.cat([loras[i].factors[name][1] for i in lora], dim=1)
            owner = torch.cat([torch.full((loras[i].rank[name],), i, dtype=torch.long) for i in lora])
            scale = torch.cat([torch.full((loras[i].rank[name],), loras[i].scales[name]) for i in lora])
            self._bank.put(f"lora_a_{position}", a_cat)
            self._bank.put(f"lora_b_{position}", b_cat)
            self._bank.put(f"lora_owner_{position}", owner)
            self._bank.put(f"lora_scale_{position}", scale)
        return plan

    def _fill_dense(self, vectors: Sequence[AnyTaskVector | QuantizedTaskVector]) -> None:
        """Copy every dense vector into its rows of the stacks, one vector at a time.

        Why vector-major: a memory-mapped vector (:meth:`from_files`) drops its pages right after its
        rows are copied, so at most one vector's file pages are resident next to the bank.
        """
        rows = {name: {i: r for r, i in enumerate(plan["dense"])} for name, plan in self._plan.items()}  # type: ignore[attr-defined]
        for i, vector in enumerate(vectors):
            if not isinstance(vector, TaskVector):
                continue
            for name, stack in self._stacks.items():
                row = rows[name].get(i)
                if row is not None:
                    stack.tensor[row].copy_(vector.tensors[name].reshape(-1))  # mapped: checked in open
            if isinstance(vector, _MappedVector):
                vector.release()

    @classmethod
    def from_files(
        cls,
        base: nn.Module,
        paths: Sequence[PathLike],
        granularity: Granularity | str = "block",
        *,
        copy_base: bool = False,
        **kwargs,
    ) -> Composer:
        """A composer over dense task vectors saved by :meth:`TaskVector.save`, holding the bank once.

        Each file is memory-mapped (no read into a second buffer), copied straight into the stacked
        bank and unmapped before the next, so peak memory is the base plus the bank plus one file's
        pages. ``copy_base=False`` (the default here) adopts ``base`` instead of copying it.
        """
        vectors = [_MappedVector.open(path) for path in paths]
        return cls(base, vectors, granularity, copy_base=copy_base, **kwargs)

    GROUP_ELEMENTS = 1 << 22  # blocks per autograd node: their gradients (16 MiB fp32) are alive together

    def _fused_plan(self, n: int) -> list[list[_FusedEntry]] | None:
        """Groups of (block, stack, rows, column(s), parts) when no block holds LoRA, else None.

        A block split into K > 1 parts is fused only when all its vectors are quantised (their stack
        takes per-part weights); a dense block must have one column. Dense and quantised rows of one
        block are read as one :class:`_ChainedStack`.

        Why groups: one autograd node for many small blocks saves per-block bookkeeping, but its
        backward waits for all of its blocks' gradients, so a group is capped at GROUP_ELEMENTS.
        """
        if self.linearized:
            return None
        plan: list[_FusedEntry] = []
        for name in self.block_names:
            info = self._plan[name]
            parts = self.layout.blocks[name]
            dense, quantized = list(info["dense"]), list(info["quantized"])
            if info["lora"] or (parts.parts != 1 and dense):
                return None
            if not dense and not quantized:  # no vector covers this block: it stays at theta_0
                continue
            order = dense + quantized
            rows = None if order == list(range(n)) else torch.tensor(order, dtype=torch.long)
            stack: _BlockStack | QuantizedStack
            if not quantized:
                stack = self._stacks[name]
            elif not dense:
                stack = self._quantized_stack(self._positions[name])
            else:
                stack = _ChainedStack([self._stacks[name], self._quantized_stack(self._positions[name])],
                                      [len(dense), len(quantized)])
            if parts.parts == 1:
                plan.append((name, stack, rows, int(info["column"]), None))
            else:
                plan.append((name, stack, rows, torch.as_tensor(parts.columns, dtype=torch.long), parts))
        groups: list[list[_FusedEntry]] = [[]]
        size = 0
        for entry in plan:
            numel = int(self.layout.shapes[entry[0]].numel())
            if groups[-1] and size + numel > self.GROUP_ELEMENTS:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += numel
        return groups

    def _quantized_stack(self, position: int) -> QuantizedStack:
        return cast(QuantizedStack, self.stacks[str(position)])

    def _initial(self, init: float | Tensor, n: int) -> Tensor:
        columns = self.layout.num_columns
        if isinstance(init, Tensor):
            init = init.detach().to(torch.float32)
            if init.shape == (n,):
                return init[:, None].repeat(1, columns).clone()
            if init.shape == (n, columns):
                return init.clone()
            raise ValueError(f"init tensor has shape {tuple(init.shape)}; expected ({n},) or ({n}, {columns})")
        return torch.full((n, columns), float(init))

    # -- composition ---------------------------------------------------------------------------

    @property
    def num_vectors(self) -> int:
        return len(self.vector_names)

    @property
    def block_names(self) -> list[str]:
        return self.layout.block_names

    def _element_weights(self, position: int, name: str, coefficients: Tensor) -> Tensor:
        """(n, numel) coefficient of every element of a block split into parts."""
        parts = self.layout.blocks[name]
        per_part = coefficients[:, parts.columns]
        if parts.sizes is not None:
            numel = int(self.layout.shapes[name].numel())
            return torch.repeat_interleave(per_part, self._bank.get(f"sizes_{position}"), dim=1, output_size=numel)
        return per_part[:, self._bank.get(f"index_{position}")]

    def block_delta(self, name: str, coefficients: Tensor) -> Tensor:
        """sum_i Lambda_i * tau_i for one block, flattened, in the coefficients' dtype."""
        position = self._positions[name]
        plan = self._plan[name]
        parts = self.layout.blocks[name]
        shape = self.layout.shapes[name]
        total: Tensor | None = None
        if parts.parts == 1:
            column = coefficients[:, plan["column"]]
            if plan["dense"]:
                weights = column[self._bank.get(f"dense_idx_{position}")]
                total = weighted_sum(weights, self._bank.get(f"dense_{position}"))
            if plan["lora"]:
                owner = self._bank.get(f"lora_owner_{position}")
                rank_weights = column[owner] * self._bank.get(f"lora_scale_{position}")
                b = self._bank.get(f"lora_b_{position}").to(coefficients.dtype)
                a = self._bank.get(f"lora_a_{position}").to(coefficients.dtype)
                lora = ((b * rank_weights) @ a).reshape(-1)
                total = lora if total is None else total + lora
            if plan["quantized"]:
                weights = column[self._bank.get(f"quant_idx_{position}")]
                quantized = quantized_weighted_sum(weights, self._quantized_stack(position))
                total = quantized if total is None else total + quantized
        else:
            elements = self._element_weights(position, name, coefficients)
            if plan["dense"]:
                stack = self._bank.get(f"dense_{position}").to(coefficients.dtype)
                total = (elements[self._bank.get(f"dense_idx_{position}")] * stack).sum(0)
            for i in plan["lora"]:
                owner = self._bank.get(f"lora_owner_{position}")
                rows = owner == i
                b = self._bank.get(f"lora_b_{position}")[:, rows].to(coefficients.dtype)
                a = self._bank.get(f"lora_a_{position}")[rows].to(coefficients.dtype)
                scale = self._bank.get(f"lora_scale_{position}")[rows][0]
                lora = elements[i] * (b @ a).reshape(-1) * scale
                total = lora if total is None else total + lora
            if plan["quantized"]:
                weights = coefficients[self._bank.get(f"quant_idx_{position}")][:, parts.columns]
                quantized = quantized_weighted_sum(weights, self._quantized_stack(position), parts)
                total = quantized if total is None else total + quantized
        assert total is not None
        return total.reshape(shape)

    def deltas(self, coefficients: Tensor | None = None) -> dict[str, Tensor]:
        """Composed update per block, ``sum_i Lambda_i tau_i``, with gradients to the coefficients."""
        coefficients = self.coefficients if coefficients is None else coefficients
        return {name: self.block_delta(name, coefficients) for name in self.block_names}

    def composed_blocks(self, coefficients: Tensor | None = None) -> dict[str, Tensor]:
        """theta_0 + delta for every composed block, in the base's dtype."""
        coefficients = self.coefficients if coefficients is None else coefficients
        if self._graphable(coefficients):
            graphed = graphed_composition(self, coefficients, self._graphed)
            self._graphs_failed = graphed is None
            self._graphed = graphed
            if graphed is not None:
                return dict(zip(graphed.names, graphed(coefficients), strict=True))
        params = dict(self.base.named_parameters())
        if self._fused is not None and _is_plain(coefficients):
            result: dict[str, Tensor] = {}
            for group in self._fused:
                result.update(zip([name for name, *_ in group], self.compose_entries(coefficients, group, params),
                                  strict=True))
            return result
        return {
            name: params[name] + delta.to(params[name].dtype)
            for name, delta in self.deltas(coefficients).items()
        }

    def _graphable(self, coefficients: Tensor) -> bool:
        return (self.cuda_graphs and not self._graphs_failed and self._fused is not None
                and coefficients.device.type in self.GRAPH_DEVICES and _is_plain(coefficients))

    def fused_entries(self) -> list[_FusedEntry] | None:
        """Every fused block's (name, stack, rows, column(s), parts), or None where blocks compose one by one."""
        return None if self._fused is None else [entry for group in self._fused for entry in group]

    def compose_entries(self, coefficients: Tensor, entries: Sequence[_FusedEntry],
                        params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, ...]:
        """theta_0 + delta for ``entries`` (from :meth:`fused_entries`), as one autograd node."""
        params = dict(self.base.named_parameters()) if params is None else params
        plan = entry_plan(entries, coefficients.device)
        return _ComposeBlocks.apply(coefficients, plan, *[params[name].detach() for name, *_ in entries])

    def forward(self, *args, coefficients: Tensor | None = None, **kwargs):
        """Run the composed network. ``coefficients`` overrides the learned ones (for search or sampling)."""
        if not self.linearized:
            given = self.coefficients if coefficients is None else coefficients
            if self.recompute and torch.is_grad_enabled() and self._fused is not None and _is_plain(given):
                from taskvec.recompute import recomposed_forward

                return recomposed_forward(self, given, args, kwargs)
            return functional_call(self.base, self.composed_blocks(coefficients), args, kwargs, strict=False)
        params = dict(self.base.named_parameters())
        deltas = self.deltas(coefficients)
        primals = {name: params[name] for name in deltas}
        tangents = {name: delta.to(params[name].dtype) for name, delta in deltas.items()}

        def at(weights: dict[str, Tensor]):
            return functional_call(self.base, weights, args, kwargs, strict=False)

        output, change = jvp(at, (primals,), (tangents,))[:2]  # (output, tangent); no aux without has_aux
        return output + change

    def train(self, mode: bool = True) -> Composer:
        super().train(mode)
        if self.base_eval:
            self.base.eval()
        return self

    # -- results -------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain copy of the base network with the composed weights baked in.

        For a linearised composer the result is a :class:`~taskvec.linearize.LinearizedModel` at the
        composed offset, since the first-order expansion is not itself a plain network.
        """
        if self.linearized:
            from taskvec.linearize import LinearizedModel

            return LinearizedModel(self.base, offsets=self.deltas(), trainable=False).eval()
        merged = copy.deepcopy(self.base)
        params = dict(merged.named_parameters())
        for name, value in self.composed_blocks().items():
            params[name].copy_(value)
        merged.requires_grad_(True)
        return merged.eval()

    def bank_nbytes(self) -> int:
        """Bytes the bank occupies in this composer: dense/LoRA buffers plus quantised stacks in storage form."""
        indexes = ("sizes", "index", "dense_idx", "quant_idx", "lora_owner")
        held = [*self.stacks.buffers(), *(b for n, b in self._bank.named_buffers() if not n.startswith(indexes))]
        return sum(t.numel() * t.element_size() for t in held)

    def block_coefficients(self) -> Tensor:
        """(n_vectors, n_blocks) mean coefficient per block: what a heatmap shows."""
        return self.layout.block_coefficients(self.coefficients.detach())

    def _identity(self) -> dict[str, str]:
        """What a coefficients file belongs to; every entry is compared on load."""
        return {
            "granularity": str(self.layout.granularity),
            "partition_seed": str(self.layout.granularity.seed),
            "blocks": json.dumps(self.block_names),
            "vectors": json.dumps(self.vector_names),
            "vector_fingerprints": json.dumps(self.vector_fingerprints),
            "linearized": str(self.linearized),
            "base_fingerprint": self.base_fingerprint,
        }

    def save_coefficients(self, path: PathLike, extra: Mapping[str, str] | None = None) -> Path:
        """A small safetensors file: the coefficients and what they belong to (vectors and their
        fingerprints in order, granularity and partition seed, linearisation, base fingerprint)."""
        meta = {"kind": "coefficients", **self._identity()}
        clash = sorted(set(extra or {}) & set(meta))
        if clash:
            raise ValueError(f"extra metadata may not redefine {clash}")
        meta.update(extra or {})
        return atomic_save_safetensors({"coefficients": self.coefficients}, path, meta)

    def load_coefficients(self, path: PathLike) -> None:
        """Load coefficients saved by :meth:`save_coefficients`, refusing a file that belongs to another
        layout, other vectors (or another order), another partition seed, linearisation or base."""
        meta = read_safetensors_metadata(path)
        tensors = load_state_dict(path)
        if "coefficients" not in tensors:
            raise CheckpointError(f"{path}: no 'coefficients' tensor (keys: {sorted(tensors)[:5]})")
        identity = self._identity()
        value = tensors["coefficients"]
        for key in ("granularity", "blocks"):
            if meta.get(key) != identity[key]:
                shown = meta.get(key, "<absent>")
                raise CheckpointError(
                    f"{path}: {key} {shown[:80]!r} does not match this composer's {identity[key][:80]!r}"
                )
        if value.shape != self.coefficients.shape:
            raise CheckpointError(
                f"{path}: coefficients have shape {tuple(value.shape)}, this composer needs "
                f"{tuple(self.coefficients.shape)} (vectors {self.vector_names})"
            )
        for key in ("vectors", "vector_fingerprints", "partition_seed", "linearized", "base_fingerprint"):
            if key not in meta:
                raise CheckpointError(f"{path}: metadata lacks '{key}' (written by an older taskvec?); "
                                      "recompute the coefficients")
            if meta[key] != identity[key]:
                raise CheckpointError(f"{path}: {key} {meta[key][:120]!r} does not match this composer's "
                                      f"{identity[key][:120]!r}")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: coefficients hold NaN/Inf values")
        with torch.no_grad():
            self.coefficients.copy_(value)
