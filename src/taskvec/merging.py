"""Data-free merging baselines over task vectors: task arithmetic, TIES, DARE, and the alpha search.

Every merge returns a :class:`~taskvec.vectors.TaskVector` to be applied with
``merged.apply_to(base, scale)``. LoRA vectors are accepted and densified with ``.to_dense()``.
Vectors made on different bases are refused by the task vector arithmetic
(:class:`~taskvec.vectors.BaseMismatchError`), never merged silently.

TIES (Yadav et al., 2023) trims *globally per vector*: a vector keeps its top-``density`` fraction of
magnitudes over all of its blocks together, as in the paper (a per-block trim would keep the same
fraction of every block, however unimportant). The threshold is the exact k-th largest magnitude: by a
concatenation and ``kthvalue`` up to :data:`EXACT_LIMIT` elements, beyond that by bisection on the
float bit pattern, which stays exact and never materialises the flattened vector.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor

from taskvec.vectors import AnyTaskVector, LoraTaskVector, TaskVector

Majority = Literal["total", "frequency"]

#: Vectors with at most this many elements find the TIES threshold from one flattened copy.
EXACT_LIMIT = 1 << 24

DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _dense(vector: AnyTaskVector) -> TaskVector:
    return vector.to_dense() if isinstance(vector, LoraTaskVector) else vector


def _prepare(vectors: Iterable[AnyTaskVector], what: str) -> tuple[list[TaskVector], dict[str, str]]:
    """Densify, and check that all vectors share blocks and base (the arithmetic's own check)."""
    dense = [_dense(v) for v in vectors]
    if not dense:
        raise ValueError(f"{what}: needs at least one task vector; got an empty list")
    meta = dict(dense[0].metadata)
    for other in dense[1:]:
        meta = dense[0]._combine_metadata(other, what)  # raises on other blocks or another base
    meta.pop("name", None)
    return dense, meta


def _check_fraction(name: str, value: float, *, low_open: bool, high_open: bool) -> None:
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (isinstance(value, int | float) and math.isfinite(value) and lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {interval}; got {value!r}")


def _result(tensors: dict[str, Tensor], meta: dict[str, str], name: str) -> TaskVector:
    return TaskVector(tensors, metadata=dict(meta, name=name), check_finite=False)


# ----------------------------------------------------------------------------------------------
# Task arithmetic
# ----------------------------------------------------------------------------------------------


def task_arithmetic(vectors: Sequence[AnyTaskVector], alpha: float = 1.0) -> TaskVector:
    """``alpha * sum_i tau_i`` (Ilharco et al., 2023); a negative alpha negates."""
    dense = [_dense(v) for v in vectors]
    if not dense:
        raise ValueError("task_arithmetic: needs at least one task vector; got an empty list")
    total = dense[0] if len(dense) == 1 else sum(dense[1:], dense[0])
    merged = total * float(alpha)
    merged.metadata["name"] = f"task_arithmetic(alpha={alpha:g})"
    return merged


# ----------------------------------------------------------------------------------------------
# TIES
# ----------------------------------------------------------------------------------------------


def _kept_count(numel: int, density: float) -> int:
    return min(numel, max(1, math.ceil(density * numel)))


def magnitude_threshold(vector: AnyTaskVector, density: float) -> float:
    """The k-th largest |value| over all blocks of ``vector``, k = ceil(density * numel).

    Keeping ``|value| >= threshold`` keeps at least k entries (more only on exact ties).
    """
    _check_fraction("density", density, low_open=True, high_open=False)
    dense = _dense(vector)
    numel = dense.numel()
    k = _kept_count(numel, density)
    if k == numel:
        return 0.0
    if numel <= EXACT_LIMIT:
        flat = torch.cat([t.detach().reshape(-1).abs().to(torch.float32) for t in dense.tensors.values()])
        return float(torch.kthvalue(flat.cpu(), numel - k + 1).values)
    # Non-negative float32 values are ordered like their int32 bit patterns: bisect on the bits for the
    # largest t with count(|v| >= t) >= k. That t is exactly the k-th largest magnitude.
    lo, hi = 0, 0x7F800000  # [0, +inf]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        count = sum(
            int((t.detach().abs().to(torch.float32).view(torch.int32) >= mid).sum())
            for t in dense.tensors.values()
        )
        if count >= k:
            lo = mid
        else:
            hi = mid - 1
    return float(torch.tensor(lo, dtype=torch.int32).view(torch.float32))


def elect_sign(stack: Tensor, majority: Majority = "total") -> Tensor:
    """Elected sign (+1/-1) per element of ``stack`` (n, ...): of the summed values ("total" mass, as
    TIES) or of the count of signs ("frequency"). Zero sums elect +1."""
    if majority == "total":
        score = stack.sum(0)
    elif majority == "frequency":
        score = stack.sign().sum(0)
    else:
        raise ValueError(f"majority must be 'total' or 'frequency'; got {majority!r}")
    return torch.where(score >= 0, 1.0, -1.0).to(stack.dtype)


def disjoint_mean(stack: Tensor, sign: Tensor) -> Tensor:
    """Mean over the vectors whose nonzero entry agrees with the elected sign; 0 where none does."""
    agree = (stack != 0) & (stack.sign() == sign)
    total = (stack * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def _ties_blocks(
    dense: list[TaskVector], thresholds: list[float], majority: Majority, alpha: float
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name in dense[0].names:
        stack = torch.stack([v.tensors[name].to(torch.float32) for v in dense])
        limits = torch.tensor(thresholds, dtype=torch.float32, device=stack.device)
        limits = limits.reshape((-1,) + (1,) * (stack.dim() - 1))
        trimmed = torch.where(stack.abs() >= limits, stack, torch.zeros((), device=stack.device))
        merged = disjoint_mean(trimmed, elect_sign(trimmed, majority)) * alpha
        out[name] = merged.to(dense[0].tensors[name].dtype)
    return out


def ties_merge(
    vectors: Sequence[AnyTaskVector],
    density: float = 0.2,
    alpha: float = 1.0,
    majority: Majority = "total",
) -> TaskVector:
    """TIES-merging: trim each vector to its top-``density`` magnitudes (globally over its blocks),
    elect a sign per element, average the entries that agree with it, scale by ``alpha``."""
    _check_fraction("density", density, low_open=True, high_open=False)
    if majority not in ("total", "frequency"):
        raise ValueError(f"majority must be 'total' or 'frequency'; got {majority!r}")
    dense, meta = _prepare(vectors, "ties")
    thresholds = [magnitude_threshold(v, density) for v in dense]
    tensors = _ties_blocks(dense, thresholds, majority, float(alpha))
    return _result(tensors, meta, f"ties(density={density:g}, alpha={alpha:g}, majority={majority})")


# ----------------------------------------------------------------------------------------------
# DARE
# ----------------------------------------------------------------------------------------------


def dare(vector: AnyTaskVector, drop_rate: float, generator: torch.Generator | None = None) -> TaskVector:
    """Drop And REscale (Yu et al., 2024): zero each entry with probability ``drop_rate`` and scale the
    survivors by ``1 / (1 - drop_rate)``, so the expectation is the original vector.

    Randomness is drawn on ``generator``'s device, block by block in the vector's block order.
    """
    _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
    dense = _dense(vector)
    device = generator.device if generator is not None else torch.device("cpu")
    scale = 1.0 / (1.0 - drop_rate)
    out: dict[str, Tensor] = {}
    for name, tensor in dense.tensors.items():
        keep = torch.rand(tensor.shape, generator=generator, device=device).to(tensor.device) >= drop_rate
        kept = torch.where(keep, tensor.to(torch.float32) * scale, torch.zeros((), device=tensor.device))
        out[name] = kept.to(tensor.dtype)
    return _result(out, dense.metadata, f"dare({dense.name}, p={drop_rate:g})")


def dare_merge(
    vectors: Sequence[AnyTaskVector],
    drop_rate: float = 0.9,
    alpha: float = 1.0,
    seed: int = 0,
    ties: bool = False,
    majority: Majority = "total",
) -> TaskVector:
    """DARE on every vector (one seeded generator, vectors in order), then either ``alpha * sum``
    (task arithmetic) or, with ``ties=True``, TIES sign election and disjoint mean without trimming."""
    _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
    dense, meta = _prepare(vectors, "dare")
    generator = torch.Generator().manual_seed(seed)
    dropped = [dare(v, drop_rate, generator) for v in dense]
    if ties:
        tensors = _ties_blocks(dropped, [0.0] * len(dropped), majority, float(alpha))
    else:
        tensors = {
            name: (functools.reduce(operator.add, [v.tensors[name].to(torch.float32) for v in dropped]) * alpha).to(
                dense[0].tensors[name].dtype
            )
            for name in dense[0].names
        }
    kind = "dare_ties" if ties else "dare"
    return _result(tensors, meta, f"{kind}(p={drop_rate:g}, alpha={alpha:g}, seed={seed})")


# ----------------------------------------------------------------------------------------------
# Choosing the scale on validation data
# ----------------------------------------------------------------------------------------------


def alpha_search(
    evaluate: Callable[[float], float],
    grid: Iterable[float] = DEFAULT_ALPHA_GRID,
    *,
    higher_is_better: bool = True,
) -> tuple[float, list[tuple[float, float]]]:
    """Evaluate every alpha of ``grid`` (on validation data, never test data) and return the best one
    with the full ``[(alpha, score), ...]`` table in grid order. NaN scores never win; the first of
    equal scores does. Use a negative grid for negation, or ``higher_is_better=False`` for a loss."""
    table: list[tuple[float, float]] = []
    best: tuple[float, float] | None = None
    for alpha in grid:
        score = float(evaluate(float(alpha)))
        table.append((float(alpha), score))
        if math.isnan(score):
            continue
        if best is None or (score > best[1] if higher_is_better else score < best[1]):
            best = (float(alpha), score)
    if not table:
        raise ValueError("alpha_search: the grid is empty")
    if best is None:
        raise ValueError(f"alpha_search: every score was NaN over grid {[a for a, _ in table]}")
    return best[0], table
