"""A target task held out of a suite's bank, with its few labelled shots: what the parameter-efficiency
recipes (precision, gradient-free, selection, subspace) share.

The bank is leave-one-out (every suite task but the target), the head is the target's frozen head from
the suite, the k shots per class come from the suite's few-shot pool (``suite.few_shot_pool``: the split
the target's head never saw) and are split by
:func:`~taskvec.workflow.few_shot_split` into training and selection shots. Test data is only scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskvec.experiment import check_fields
from taskvec.train import Batch
from taskvec.workflow import DEFAULT_RESULTS, CoefficientSchedule, few_shot_split

__all__ = ["AUGMENTATIONS", "HeldOutSetup", "HeldOutTarget"]

AUGMENTATIONS = ("none", "weak", "strong")


@dataclass
class HeldOutSetup:
    """Settings every held-out few-shot recipe shares (their configs inherit them)."""

    target: str = field(default="", metadata={"help": "task held out of the bank ('' = the suite's last task)"})
    shots: tuple[int, ...] = field(default=(16,), metadata={"help": "k labelled samples per class", "metavar": "K"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "seeds (shot draw and training)"})
    epochs: int = field(default=6, metadata={"help": "coefficient training epochs"})
    lr: float = field(default=0.1, metadata={"help": "coefficient learning rate (aTLAS: 0.1)"})
    batch_size: int = field(default=32, metadata={"help": "shots per batch"})
    min_steps: int = field(default=4, metadata={"help": "batches per epoch at least (small shot sets repeat)"})
    augmentation: str = field(default="weak", metadata={"help": "augmentation of the training shots",
                                                        "choices": AUGMENTATIONS})
    out: Path = field(default=DEFAULT_RESULTS / "heldout", metadata={"help": "results directory"})
    resume: bool = field(default=True, metadata={"help": "recompute jobs already recorded under the same settings"})
    progress: bool = field(default=True, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        check_fields(self)  # every field's declared choices, this class's and a recipe's alike
        for name in ("shots", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} must name at least one value")
        if any(k < 1 for k in self.shots):
            raise ValueError(f"shots must be >= 1; got {list(self.shots)}")
        for name in ("epochs", "batch_size", "min_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation {self.augmentation!r} is not one of {AUGMENTATIONS}")

    def schedule(self, seed: int) -> CoefficientSchedule:
        """The coefficient schedule of one seed."""
        return CoefficientSchedule(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                   min_steps_per_epoch=self.min_steps, seed=seed, progress=self.progress,
                                   augmentation=None if self.augmentation == "none" else self.augmentation)  # type: ignore[arg-type]

    def numbers(self) -> dict[str, Any]:
        """The shared settings that change numbers (for a fingerprint; jobs list their own k and seed)."""
        return {"target": self.target, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "min_steps": self.min_steps, "augmentation": self.augmentation}


class HeldOutTarget:
    """``target`` out of ``suite``'s bank: base, frozen head, the other tasks' vectors, the shots."""

    def __init__(self, suite: Any, target: str = "", *, sources: Sequence[str] | None = None) -> None:
        tasks = tuple(suite.tasks)
        self.target = target or tasks[-1]
        if self.target not in tasks:
            raise ValueError(f"target {self.target!r} is not a task of the {suite.name} suite {list(tasks)}")
        self.sources = [t for t in (sources or tasks) if t != self.target]
        unknown = [t for t in self.sources if t not in tasks]
        if unknown or not self.sources:
            raise ValueError(f"bank sources {unknown or []} are not {suite.name} tasks, or none is left once "
                             f"{self.target!r} is held out of {list(sources or tasks)}")
        self.suite = suite
        build = getattr(suite, "build", None)
        if build is not None:
            build([*self.sources, self.target])  # cached; the target's own vector is never loaded
        self.base: nn.Module = suite.backbone()
        self.head: nn.Module = suite.head(self.target)
        self.task = suite.splits(self.target)

    def identity(self) -> dict[str, Any]:
        return {"suite": self.suite.identity(), "target": self.target, "sources": self.sources}

    def vectors(self) -> list:
        """The leave-one-out bank, loaded afresh (callers may quantise or drop it)."""
        return self.suite.vectors(self.sources)

    def pool(self) -> Any:
        """Where the shots come from: the suite's rule (the split the target's head never saw)."""
        return self.suite.few_shot_pool(self.task)

    def shots(self, k: int, seed: int) -> tuple[Any, Any | None]:
        """(training shots, selection shots or None at k = 1)."""
        return few_shot_split(self.pool(), k, seed)

    def fraction(self, fraction: float, seed: int) -> tuple[Any, Any]:
        """A seeded ``fraction`` of the pool (at least two samples): a quarter of it (at least one) held out
        for selection, the rest for training (data-scaling experiments, where k shots per class is not the
        unit)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
        pool = self.pool()
        count = min(len(pool), max(2, round(fraction * len(pool))))
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count]
        held = max(1, count // 4)
        return pool.subset(order[held:]), pool.subset(order[:held])

    def batches(self, split: Any, batch_size: int, seed: int = 0) -> list[Batch]:
        """One pass over ``split`` in fixed batches, no augmentation: a deterministic objective."""
        loader = self.suite.loader(split, batch_size=batch_size, augmentation=None)
        return list(loader.epoch(torch.Generator().manual_seed(seed)))

    def test_scores(self, model: nn.Module) -> dict[str, float]:
        """The report's numbers on the target's test split (never used for a choice)."""
        return self.suite.scores(model, self.head, self.task.test)

    def selection_accuracy(self, model: nn.Module, val: Any | None) -> float | None:
        return None if val is None or len(val) == 0 else self.suite.accuracy(model, self.head, val)
