"""Batching for the methods: multi-task batches, validation splits, unlabelled and two-stream (UFM) batches.

Every loader here is a :class:`taskvec.train.Loader`: its epoch order is drawn from the generator
``fit`` seeds per epoch, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from taskvec.data import ImageSet, augment, batches, to_input
from taskvec.objectives import TrustedTargets
from taskvec.train import Loader


def image_loader(
    split: ImageSet,
    resolution: int,
    *,
    batch_size: int,
    norm: dict,
    augmentation: str | None = "weak",
    min_steps: int = 1,
) -> Loader:
    """Shuffled, augmented batches of a split; small splits are repeated to give ``min_steps`` batches."""
    repeats = max(1, math.ceil(min_steps * batch_size / max(1, len(split))))
    pool = split if repeats == 1 else ImageSet(split.images.repeat(repeats, 1, 1, 1), split.labels.repeat(repeats))
    steps = math.ceil(len(pool) / batch_size)

    def make(generator: torch.Generator):
        for x, y in batches(pool, batch_size, shuffle=True, generator=generator, resolution=resolution, **norm):
            yield (augment(x, generator, augmentation, **norm) if augmentation else x), y

    return Loader(make, steps)


def split_validation(val: ImageSet, select: int, fit_size: int, seed: int, name: str = "") -> tuple[ImageSet, ImageSet]:
    """Disjoint (selection, fitting) parts of a validation split, drawn by a seeded permutation.

    Holding the selection part out of coefficient training keeps model selection honest without
    touching test data. ``name`` varies the permutation between tasks. A split too small for both
    parts gives the fitting part what is left.
    """
    if select < 1 or fit_size < 1:
        raise ValueError(f"selection and fitting parts need >= 1 image each; got {select} and {fit_size}")
    if len(val) < select + 1:
        raise ValueError(f"validation split of {name or 'a task'} has {len(val)} images; "
                         f"cannot hold out {select} for selection and still fit on any")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    order = torch.randperm(len(val), generator=generator)
    return val.subset(order[:select]), val.subset(order[select : select + fit_size])


def mixed_loader(
    parts: Sequence[ImageSet],
    batch_sizes: int | Sequence[int],
    resolution: int,
    norm: dict,
    *,
    steps: int | None = None,
    augmentation: str | None = None,
    labels: bool = True,
) -> Loader:
    """Every batch holds ``batch_sizes[i]`` images of every part ``i``: a list ``[(x, y), ...]`` (or
    ``[x, ...]`` with ``labels=False``, for unsupervised objectives that must not see labels).

    Each epoch draws a fresh permutation per part; by default an epoch is one pass over the part with
    the fewest batches (aTLAS's primary iterator); larger parts are cut short, smaller ones wrap.
    """
    sizes = [batch_sizes] * len(parts) if isinstance(batch_sizes, int) else list(batch_sizes)
    if len(sizes) != len(parts) or min(sizes, default=0) < 1:
        raise ValueError(f"need one batch size >= 1 per part; got {sizes} for {len(parts)} parts")
    if any(len(part) == 0 for part in parts):
        raise ValueError("mixed_loader: a part is empty")
    if steps is None:
        steps = min(math.ceil(len(part) / size) for part, size in zip(parts, sizes, strict=True))

    def make(generator: torch.Generator) -> Iterator[list]:
        orders = [torch.randperm(len(part), generator=generator) for part in parts]
        for step in range(steps):
            batch = []
            for part, size, order in zip(parts, sizes, orders, strict=True):
                idx = order[torch.arange(step * size, (step + 1) * size) % len(part)]
                x = to_input(part.images[idx], resolution, **norm)
                if augmentation:
                    x = augment(x, generator, augmentation, **norm)
                batch.append((x, part.labels[idx]) if labels else x)
            yield batch

    return Loader(make, steps)


def unlabelled(images: Tensor) -> ImageSet:
    """A label-free view of images (labels all -1) for code that wants an ImageSet: adaptation never
    holds the real labels, so it cannot read them."""
    return ImageSet(images, torch.full((len(images),), -1, dtype=torch.long))


def _batch_starts(n: int, batch_size: int) -> list[int]:
    """Batch starts over n items, folding a trailing single item into the previous batch (NT-Xent and
    batch statistics need two samples)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    return starts


def unlabelled_loader(
    images: Tensor, resolution: int, norm: dict, batch_size: int, trusted: tuple[Tensor, Tensor] | None = None
) -> Loader:
    """Shuffled batches of images as inputs ``x`` (see :func:`index_loader`)."""
    return index_loader(len(images), batch_size, lambda idx: to_input(images[idx], resolution, **norm), trusted)


def index_loader(
    n: int, batch_size: int, take: Callable[[Tensor], Tensor], trusted: tuple[Tensor, Tensor] | None = None
) -> Loader:
    """Shuffled batches of inputs ``x = take(indices)`` over a pool of ``n`` unlabelled samples (any
    modality: ``take`` makes the inputs); with ``trusted = (indices, pseudo-labels)`` (UFM), each batch is
    ``(x, TrustedTargets)`` with half untrusted samples (target -1) and half trusted ones, cycling the
    trusted stream (aTLAS's two-stream sampler), and an epoch is one pass over the untrusted samples."""
    if n < 2:
        raise ValueError(f"test-time adaptation needs at least 2 unlabelled inputs; got {n}")
    if trusted is None:
        starts = _batch_starts(n, batch_size)

        def make(generator: torch.Generator):
            order = torch.randperm(n, generator=generator)
            for i, start in enumerate(starts):
                stop = starts[i + 1] if i + 1 < len(starts) else n
                yield take(order[start:stop])

        return Loader(make, len(starts))

    t_index, t_label = trusted
    mask = torch.ones(n, dtype=torch.bool)
    mask[t_index] = False
    rest = torch.nonzero(mask).flatten()
    if len(rest) == 0:  # everything is trusted: the untrusted stream is the whole pool
        rest = torch.arange(n)
    half = max(1, batch_size // 2)
    starts = list(range(0, len(rest), half))

    def make_two_stream(generator: torch.Generator):
        order = rest[torch.randperm(len(rest), generator=generator)]
        stream: list[int] = []
        for start in starts:
            while len(stream) < half:
                stream.extend(torch.randperm(len(t_index), generator=generator).tolist())
            picks, stream[:] = stream[:half], stream[half:]
            u = order[start : start + half]
            t = torch.tensor(picks, dtype=torch.long)
            idx = torch.cat([u, t_index[t]])
            targets = torch.cat([torch.full((len(u),), -1, dtype=torch.long), t_label[t]])
            yield take(idx), TrustedTargets(targets)

    return Loader(make_two_stream, len(starts))


def seeded_subset(split: Any, size: int | None, seed: int) -> Any:
    """At most ``size`` samples of ``split`` (any split with ``subset``), drawn by a seeded permutation and
    kept in their original order; the whole split when ``size`` is None or not smaller."""
    if size is None or size >= len(split):
        return split
    pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size]
    return split.subset(pick.sort().values)
