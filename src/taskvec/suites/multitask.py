"""Multi-task data over a :class:`taskvec.suites.Suite`: what :class:`~taskvec.workflow.MultiTaskData`
gives the addition recipe (base, heads, selection / fitting parts of each validation split, fine-tuned
accuracies), with every batch and score made by the suite, so a recipe runs on text as on images.

Why a subclass: the recipes read ``ctx.base``, ``ctx.heads``, ``ctx.select``, ``ctx.fit``, ``ctx.test``
and call ``ctx.mixed(...)``; only how inputs are batched and scored changes with the modality.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from taskvec.train import Loader
from taskvec.workflow import Evaluator, MultiTaskData, MultiTaskSettings, selection_and_fitting_parts

__all__ = ["SuiteMultiTaskData", "suite_mixed_loader"]


def suite_mixed_loader(
    suite: Any,
    parts: Sequence[Any],
    batch_sizes: int | Sequence[int],
    *,
    steps: int | None = None,
    augmentation: str | None = None,
    labels: bool = True,
) -> Loader:
    """Like :func:`taskvec.batching.mixed_loader`: every batch is ``[(x, y), ...]`` (``[x, ...]`` without
    labels), one item per part, each drawn from that part's own loader of the suite."""
    sizes = [batch_sizes] * len(parts) if isinstance(batch_sizes, int) else list(batch_sizes)
    if len(sizes) != len(parts) or min(sizes, default=0) < 1:
        raise ValueError(f"need one batch size >= 1 per part; got {sizes} for {len(parts)} parts")
    if steps is None:
        steps = min(math.ceil(len(part) / size) for part, size in zip(parts, sizes, strict=True))
    loaders = [suite.loader(part, batch_size=size, augmentation=augmentation, min_steps=steps)
               for part, size in zip(parts, sizes, strict=True)]

    def make(generator: torch.Generator) -> Iterator[list]:
        streams = [iter(loader.epoch(generator)) for loader in loaders]
        for _ in range(steps):
            batch = []
            for stream in streams:
                x, y = next(stream)
                batch.append((x, y) if labels else x)
            yield batch

    return Loader(make, steps)


class SuiteMultiTaskData(MultiTaskData):
    """:class:`MultiTaskData` whose bank, base, heads, splits, batches and scores come from ``suite``.

    ``evaluator(model, head, split) -> float`` computes every accuracy (default ``suite.accuracy``):
    tests inject spies or label scramblers through it to prove which splits steer the choices."""

    def __init__(self, suite: Any, tasks: Sequence[str], config: MultiTaskSettings,
                 evaluator: Evaluator | None = None) -> None:
        self.suite = suite
        self.bank = suite.bank
        self.evaluator = evaluator or suite.accuracy
        self.tasks = list(tasks)
        self.base = suite.backbone()
        self.norm: dict = {}
        self.resolution = int(getattr(suite.bank.config, "resolution", 0))
        self.heads = {t: suite.head(t) for t in tasks}
        self.meta = {t: suite.bank.meta(t) for t in tasks}
        data = {t: suite.splits(t) for t in tasks}
        self.test = {t: data[t].test for t in tasks}
        self.select, self.fit = selection_and_fitting_parts({t: data[t].val for t in tasks}, config)
        self.finetuned = {t: float(self.meta[t]["finetuned_test_acc"]) for t in tasks}

    def selection_scores(self, model: nn.Module) -> dict[str, float]:
        """Accuracy on each task's selection part (validation data)."""
        return {t: float(self.evaluator(model, self.heads[t], self.select[t])) for t in self.tasks}

    def test_scores(self, model: nn.Module) -> dict[str, float]:
        """Accuracy on each task's test split: the report, never a choice."""
        return {t: float(self.evaluator(model, self.heads[t], self.test[t])) for t in self.tasks}

    def mixed(self, parts: Sequence[Any], batch_sizes: int | Sequence[int], *, steps: int | None = None,
              augmentation: str | None = None, labels: bool = True) -> Loader:
        return suite_mixed_loader(self.suite, parts, batch_sizes, steps=steps, augmentation=augmentation,
                                  labels=labels)
