"""Wiring shared by the recipes: bank access, loaders over image splits, supervised coefficient learning.

Nothing here is new maths: it connects data -> bank -> composer -> objective -> fit -> evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from taskvec.bank import Bank
from taskvec.compose import Composer
from taskvec.data import ImageSet, augment, batches
from taskvec.evaluate import accuracy
from taskvec.merging import DEFAULT_ALPHA_GRID, alpha_search, task_arithmetic
from taskvec.objectives import cross_entropy
from taskvec.train import Loader, TrainConfig, TrainResult, fit
from taskvec.vectors import TaskVector

DEFAULT_RESULTS = Path("runs")


@dataclass
class CoefficientSchedule:
    """How coefficients are learned: aTLAS's few-shot defaults (init 0, lr 0.1, no warm-up, cosine)."""

    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 32
    min_steps_per_epoch: int = 10  # small shot sets are repeated, as aTLAS oversamples to >= 10 batches
    weight_decay: float = 0.0
    augmentation: str = "weak"
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)


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


def learn_supervised(
    composer: nn.Module,
    head: nn.Module,
    train: ImageSet,
    val: ImageSet | None,
    resolution: int,
    norm: dict,
    schedule: CoefficientSchedule,
    *,
    description: str = "coefficients",
    checkpoint: Path | None = None,
) -> TrainResult:
    """Cross-entropy through a frozen head; model selection on ``val`` only (never on test data)."""
    loader = image_loader(
        train,
        resolution,
        batch_size=schedule.batch_size,
        norm=norm,
        augmentation=schedule.augmentation,
        min_steps=schedule.min_steps_per_epoch,
    )
    evaluate = None if val is None or len(val) == 0 else (lambda m: accuracy(m, head, val, resolution, **norm))
    return fit(
        composer,
        cross_entropy(head),
        loader,
        TrainConfig(
            epochs=schedule.epochs,
            lr=schedule.lr,
            weight_decay=schedule.weight_decay,
            warmup_fraction=0.0,
            seed=schedule.seed,
            progress=schedule.progress,
            description=description,
            checkpoint=checkpoint,
            resume=checkpoint is not None,
        ),
        evaluate=evaluate,
    )


def task_arithmetic_search(
    base: nn.Module,
    vectors: Sequence[TaskVector],
    score: Callable[[nn.Module], float],
    grid: Sequence[float] | None = None,
) -> tuple[float, nn.Module, list]:
    """Task arithmetic with its one scale chosen by ``score`` (validation data) over a grid."""
    summed = task_arithmetic(vectors, 1.0)
    best, table = alpha_search(lambda a: score(summed.apply_to(base, a)), DEFAULT_ALPHA_GRID if grid is None else grid)
    return best, summed.apply_to(base, best), table


def bank_and_norm(bank: Bank) -> tuple[nn.Module, dict, int]:
    from taskvec.models import build_backbone

    base, spec = build_backbone(bank.config.backbone, pretrained=bank.config.pretrained)
    return base.eval(), {"mean": spec.mean, "std": spec.std}, bank.config.resolution


# Same classes, another style: a partner's head scores a target without having seen its labels.
HEAD_PARTNERS = {"emoji_twitter": "emoji_google", "emoji_google": "emoji_twitter"}


def resolve_head(target: str, head_from: str) -> str:
    """The bank task whose head scores ``target``: ``"auto"`` (the partner in :data:`HEAD_PARTNERS`,
    else the target), ``"own"`` (the target), or a task name.

    Why it matters: a target's own head is fitted on its whole training split, a full-data linear probe
    that a few shots per class can hardly improve; CLIP's zero-shot head, whose role the heads play,
    never saw a target label. (The MNIST and Digits heads share classes but do not transfer: 15-17%.)
    """
    if head_from == "auto":
        return HEAD_PARTNERS.get(target, target)
    return target if head_from == "own" else head_from


def scoring_head(bank: Bank, target: str, head_from: str) -> tuple[str, nn.Module]:
    """``(task, frozen head)`` that scores ``target`` (:func:`resolve_head`); a borrowed head must have
    the target's classes, in the same order."""
    head_task = resolve_head(target, head_from)
    if head_task != target:
        donor, own = bank.meta(head_task)["classes"], bank.meta(target)["classes"]
        if donor != own:
            raise ValueError(f"head_from={head_task!r} has classes {donor}, but {target!r} has {own}")
    return head_task, bank.head(head_task).freeze()


def few_shot_pool(task) -> ImageSet:
    """Where a target's k shots come from: its validation split.

    The target's head was fitted on its training split, so shots drawn from there would be images the
    head has already memorised (their loss near zero, their accuracy inflated). The validation split is
    unseen by the head, and, with the target held out of the bank, by every task vector.
    """
    return task.val


def few_shot_split(train: ImageSet, k: int, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """k labelled images per class, split into a training part and a selection part.

    A quarter of the shots per class (at least one) are held out for model selection when k >= 2;
    with k = 1 there is nothing to hold out and the last epoch is kept.
    """
    from taskvec.data import few_shot

    shots = few_shot(train, k, seed)
    if k < 2:
        return shots, None
    held = max(1, k // 4)
    generator = torch.Generator().manual_seed(10_007 * seed + k)
    keep, out = [], []
    for label in shots.labels.unique(sorted=True):
        idx = (shots.labels == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        out.append(idx[:held])
        keep.append(idx[held:])
    return shots.subset(torch.cat(keep)), shots.subset(torch.cat(out))


def composer_for(
    base: nn.Module, vectors: Sequence[TaskVector], granularity: str, *, init: float = 0.0, linearized: bool = False
) -> Composer:
    return Composer(base, vectors, granularity, init=init, linearized=linearized)
