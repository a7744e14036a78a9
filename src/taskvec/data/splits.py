"""Fixed, seeded, stratified splits and k-shot sampling.

Why this algorithm: every class's indices are shuffled with a seeded ``torch.Generator``, then all
samples are ordered by their relative rank within their class, ``(rank + 0.5) / class_count``. Any
prefix of that order holds each class in proportion to its frequency (within one sample), so cutting
the order into consecutive chunks gives train / val / test splits that are stratified and disjoint by
construction, and a larger ``train`` size only adds samples to the smaller one's. Only integer and
float64 arithmetic on CPU is involved, so the split is the same on every machine for a given torch.
"""

from __future__ import annotations

import warnings
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


def stratified_order(
    labels: torch.Tensor, generator: torch.Generator, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices ordered so that every prefix is (nearly) class-stratified.

    With ``groups`` (index of each sample's first identical copy, -1 = unusable) only the first copy
    of each group appears, standing for the whole group: its key is the middle of the group's span
    when the class's groups are laid end to end in shuffled order, so prefixes stay stratified in
    *sample* counts. The shuffle is over the class's samples either way, so classes without
    duplicates get exactly the keys they would get without ``groups``.
    """
    labels = labels.to("cpu", torch.int64)
    n = labels.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    if groups is None:
        is_rep = torch.ones(n, dtype=torch.bool)
        size = torch.ones(n, dtype=torch.float64)
    else:
        groups = groups.to("cpu", torch.int64)
        is_rep = groups == torch.arange(n)
        size = torch.bincount(groups[groups >= 0], minlength=n).to(torch.float64)
    counts = torch.bincount(labels)
    by_class = torch.argsort(labels, stable=True)  # indices grouped by class, ascending within class
    key = torch.full((n,), float("inf"), dtype=torch.float64)
    starts = torch.cumsum(counts, 0) - counts
    for c in torch.nonzero(counts).flatten().tolist():
        k = int(counts[c])
        members = by_class[int(starts[c]) : int(starts[c]) + k]
        shuffled = members[torch.randperm(k, generator=generator)]
        reps = shuffled[is_rep[shuffled]]
        s = size[reps]
        if reps.numel():
            key[reps] = (torch.cumsum(s, 0) - s / 2) / s.sum()
    # ties (same relative rank in equally sized classes) resolve by class, then index: stable sort
    sel = by_class[is_rep[by_class]]
    return sel[torch.argsort(key[sel], stable=True)]


def stratified_split(
    labels: torch.Tensor, counts: list[int], seed: int, groups: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Disjoint, stratified index sets of the given sizes (each sorted ascending), drawn under ``seed``.

    ``groups`` (see :func:`taskvec.data.sources.duplicate_groups`) keeps every copy of an image in one
    split: walking the stratified order of groups, a whole group goes into the current split if it
    fits, else into the next one; samples with group -1 are never used. Without duplicates this is a
    cut of the order into consecutive chunks, so two datasets with the same labels (the emoji pair)
    get the same indices wherever their duplicates do not interfere. When the pool is nearly used up,
    keeping copies together can make a split fall short of its size: that warns.
    """
    n_usable = labels.numel() if groups is None else int((groups >= 0).sum())
    if sum(counts) > n_usable:
        raise ValueError(f"split sizes {counts} need {sum(counts)} samples, the pool has {n_usable} usable")
    order = stratified_order(labels, _generator(seed), groups)
    if order.numel() == n_usable:  # every group is a single sample: plain cuts
        out, start = [], 0
        for c in counts:
            out.append(torch.sort(order[start : start + c]).values)
            start += c
        return out
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        if g >= 0:
            members.setdefault(g, []).append(i)
    parts: list[list[int]] = [[] for _ in counts]
    waiting: list[list[int]] = []
    cur = 0

    def advance() -> None:
        nonlocal cur, waiting
        while cur < len(counts) and len(parts[cur]) >= counts[cur]:
            cur += 1
            still = []
            for m in waiting:  # groups that did not fit the previous split come first
                if cur < len(counts) and len(parts[cur]) + len(m) <= counts[cur]:
                    parts[cur] += m
                else:
                    still.append(m)
            waiting = still

    advance()
    for i in order.tolist():
        if cur >= len(counts):
            break
        m = members[i]
        if len(parts[cur]) + len(m) <= counts[cur]:
            parts[cur] += m
            advance()
        else:
            waiting.append(m)
    for m in waiting:  # pool exhausted: put what still waits wherever it fits
        for k in range(cur, len(counts)):
            if len(parts[k]) + len(m) <= counts[k]:
                parts[k] += m
                break
    got = [len(p) for p in parts]
    if got != list(counts):
        warnings.warn(
            f"stratified_split: sizes {list(counts)} cannot be met exactly while keeping duplicate images "
            f"together; got {got}",
            stacklevel=2,
        )
    return [torch.sort(torch.tensor(p, dtype=torch.int64)).values for p in parts]


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
