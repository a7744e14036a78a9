"""Fixed, seeded, stratified splits and k-shot sampling.

Why this algorithm: every class's indices are shuffled with a seeded ``torch.Generator``, then all
samples are ordered by their relative rank within their class, ``(rank + 0.5) / class_count``. Any
prefix of that order holds each class in proportion to its frequency (within one sample), so cutting
the order into consecutive chunks gives train / val / test splits that are stratified and disjoint by
construction, and a larger ``train`` size only adds samples to the smaller one's. Only integer and
float64 arithmetic on CPU is involved, so the split is the same on every machine for a given torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taskvec.data.types import ImageSet

__all__ = ["SplitSizes", "few_shot", "resolve_size", "stratified_order", "stratified_split"]


@dataclass(frozen=True)
class SplitSizes:
    """Split sizes: an ``int`` is a number of samples, a ``float`` in (0, 1] a fraction of its pool.

    ``test=None`` means "everything left in the pool the test split is drawn from".
    """

    train: int | float
    val: int | float
    test: int | float | None = None


def resolve_size(size: int | float | None, pool: int, *, what: str, remaining: int) -> int:
    """Turn an int / fraction / None size into a sample count, with a clear error when it cannot fit."""
    if size is None:
        n = remaining
    elif isinstance(size, bool):
        raise ValueError(f"{what} size must be an int or a float, got {size!r}")
    elif isinstance(size, float):
        if not 0.0 < size <= 1.0:
            raise ValueError(f"{what} size {size!r}: a float size must be a fraction in (0, 1]")
        n = round(size * pool)
    elif isinstance(size, int):
        n = size
    else:
        raise ValueError(f"{what} size must be an int, a float fraction or None, got {size!r}")
    if n < 0 or n > remaining:
        raise ValueError(f"{what} size {size!r} -> {n} samples, but only {remaining} of {pool} are left")
    return n


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def stratified_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(len(labels))`` whose every prefix is (nearly) class-stratified."""
    labels = labels.to("cpu", torch.int64)
    n = labels.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    counts = torch.bincount(labels)
    by_class = torch.argsort(labels, stable=True)  # indices grouped by class, ascending within class
    rank = torch.empty(n, dtype=torch.float64)
    starts = torch.cumsum(counts, 0) - counts
    for c in torch.nonzero(counts).flatten().tolist():
        k = int(counts[c])
        members = by_class[int(starts[c]) : int(starts[c]) + k]
        shuffled = members[torch.randperm(k, generator=generator)]
        rank[shuffled] = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    # ties (same relative rank in equally sized classes) resolve by class, then index: stable sort
    return by_class[torch.argsort(rank[by_class], stable=True)]


def stratified_split(labels: torch.Tensor, counts: list[int], seed: int) -> list[torch.Tensor]:
    """Disjoint, stratified index sets of the given sizes (each sorted ascending), drawn under ``seed``."""
    if sum(counts) > labels.numel():
        raise ValueError(f"split sizes {counts} need {sum(counts)} samples, the pool has {labels.numel()}")
    order = stratified_order(labels, _generator(seed))
    out, start = [], 0
    for c in counts:
        out.append(torch.sort(order[start : start + c]).values)
        start += c
    return out


def few_shot(split: ImageSet, k: int, seed: int) -> ImageSet:
    """Exactly ``k`` samples per class present in ``split``, chosen deterministically under ``seed``.

    Samples come back grouped by class (class 0's k first). Raises if a class has fewer than ``k``.
    """
    if k < 1:
        raise ValueError(f"few_shot: k must be >= 1, got {k}")
    g = _generator(seed)
    labels = split.labels.cpu()
    picks = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        if members.numel() < k:
            raise ValueError(f"few_shot: class {c} has only {members.numel()} samples, fewer than k={k}")
        picks.append(torch.sort(members[torch.randperm(members.numel(), generator=g)[:k]]).values)
    idx = torch.cat(picks) if picks else torch.empty(0, dtype=torch.int64)
    return split.subset(idx)
