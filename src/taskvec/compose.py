"""The composer: theta(Lambda) = theta_0 + sum_i Lambda_i * tau_i, with only Lambda trainable.

:class:`Composer` wraps a frozen copy of the base network and a bank of task vectors. Its forward
runs the network through :func:`torch.func.functional_call` on composed weights, so one backward
pass gives every coefficient's gradient ``<dL/dtheta_j, tau_ij>``. :meth:`Composer.merge` bakes the
composition into a plain copy of the network, which then runs exactly as fast as the base.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from taskvec.granularity import Granularity, Layout
from taskvec.io import CheckpointError, PathLike, atomic_save_safetensors, load_state_dict, read_safetensors_metadata
from taskvec.vectors import AnyTaskVector, LoraTaskVector, TaskVector, fingerprint, parameter_blocks


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
    """Sum of the rows of ``stack`` (m, numel) weighted by ``weights`` (m,), computed in weights' dtype."""
    if stack.dtype == weights.dtype:
        return weights @ stack
    return _WeightedSum.apply(weights, stack)


class _Bank(nn.Module):
    """Frozen per-block tensors of the bank, registered as buffers so ``.to(device)`` moves them."""

    def __init__(self) -> None:
        super().__init__()

    def put(self, key: str, tensor: Tensor) -> None:
        self.register_buffer(key, tensor, persistent=False)

    def get(self, key: str) -> Tensor:
        return getattr(self, key)


class _BlockPlan(TypedDict):
    """How one block is composed: which vectors are dense, which LoRA, and the column of a 1-part block."""

    dense: list[int]
    lora: list[int]
    column: int


class Composer(nn.Module):
    """A frozen base network plus a bank of task vectors, with trainable ``coefficients``.

    ``coefficients`` has shape (n_vectors, n_columns); the :class:`~taskvec.granularity.Layout` maps
    columns to blocks. The caller's base model and vectors are never modified (the base is copied).
    ``blocks`` restricts composition to some blocks (the rest stay at theta_0). With
    ``linearized=True`` the network is replaced by its first-order expansion at theta_0.
    ``base_eval=True`` keeps the base in eval mode even in ``train()``, so normalisation statistics
    stay frozen, as they were when the vectors were fine-tuned.
    """

    def __init__(
        self,
        base: nn.Module,
        vectors: Sequence[AnyTaskVector],
        granularity: Granularity | str = "block",
        *,
        init: float | Tensor = 0.0,
        blocks: Iterable[str] | None = None,
        linearized: bool = False,
        check_base: bool = True,
        base_eval: bool = True,
    ) -> None:
        super().__init__()
        if not vectors:
            raise ValueError("the bank is empty: a composer needs at least one task vector")
        self.base = copy.deepcopy(base)
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
        self._plan: dict[str, _BlockPlan] = {}
        for position, name in enumerate(wanted):
            self._plan[name] = self._stack_block(position, name, vectors)
            parts = self.layout.blocks[name]
            if parts.sizes is not None:
                self._bank.put(f"sizes_{position}", parts.sizes)
            if parts.index is not None:
                self._bank.put(f"index_{position}", parts.index)
        self._positions = {name: position for position, name in enumerate(wanted)}
        self.coefficients = nn.Parameter(self._initial(init, len(vectors)))

    # -- construction helpers ------------------------------------------------------------------

    def _stack_block(self, position: int, name: str, vectors: Sequence[AnyTaskVector]) -> _BlockPlan:
        dense = [i for i, v in enumerate(vectors) if isinstance(v, TaskVector) and name in v.names]
        loras = {i: v for i, v in enumerate(vectors) if isinstance(v, LoraTaskVector) and name in v.names}
        lora = list(loras)
        plan: _BlockPlan = {"dense": dense, "lora": lora, "column": int(self.layout.blocks[name].columns[0])}
        if dense:
            stack = torch.stack([vectors[i].dense_block(name).reshape(-1) for i in dense])
            self._bank.put(f"dense_{position}", stack)
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
        assert total is not None
        return total.reshape(shape)

    def deltas(self, coefficients: Tensor | None = None) -> dict[str, Tensor]:
        """Composed update per block, ``sum_i Lambda_i tau_i``, with gradients to the coefficients."""
        coefficients = self.coefficients if coefficients is None else coefficients
        return {name: self.block_delta(name, coefficients) for name in self.block_names}

    def composed_blocks(self, coefficients: Tensor | None = None) -> dict[str, Tensor]:
        """theta_0 + delta for every composed block, in the base's dtype."""
        params = dict(self.base.named_parameters())
        return {
            name: params[name] + delta.to(params[name].dtype)
            for name, delta in self.deltas(coefficients).items()
        }

    def forward(self, *args, coefficients: Tensor | None = None, **kwargs):
        """Run the composed network. ``coefficients`` overrides the learned ones (for search or sampling)."""
        if not self.linearized:
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
