"""Suites: what an experiment runs on (a backbone, its tasks and bank, their data, heads and
augmentations), behind one interface so the experiment layer and the recipes never branch on the
modality. :class:`~taskvec.suites.vision.VisionSuite` wraps today's image bank; a text suite (MiniLM,
tokenised batches, zero-shot heads) implements the same protocol.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from taskvec.train import Loader
from taskvec.vectors import TaskVector


@runtime_checkable
class Suite(Protocol):
    """The data side of an experiment. Splits are opaque to the layer: only the suite batches them."""

    name: str
    head_description: str  # whose head scores a task, for report headers

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task the suite has a vector and a head for."""
        ...

    def identity(self) -> dict[str, Any]:
        """What determines the suite's numbers (backbone, bank root, entries): part of every fingerprint."""
        ...

    def backbone(self) -> nn.Module:
        """A fresh pre-trained backbone in eval mode (inputs -> features)."""
        ...

    def vectors(self, tasks: Sequence[str]) -> list[TaskVector]:
        ...

    def head(self, task: str) -> nn.Module:
        """The task's frozen head (features -> logits)."""
        ...

    def splits(self, task: str) -> Any:
        """The task's ``train``, ``val`` and ``test`` splits (attributes)."""
        ...

    def few_shot_pool(self, task: Any) -> Any:
        """The split of ``task`` (what :meth:`splits` returned) that few-shot data is drawn from: one
        the task's head never saw (vision: validation, its head is a probe fitted on training; text:
        training, its head is zero-shot)."""
        ...

    def loader(self, split: Any, *, batch_size: int, augmentation: str | None = None, min_steps: int = 1) -> Loader:
        """Shuffled training batches ``(inputs, labels)`` of a split, augmented as named."""
        ...

    def accuracy(self, model: nn.Module, head: nn.Module, split: Any) -> float:
        """Top-1 accuracy of ``head(model(inputs))`` on a split."""
        ...

    def logits(self, model: nn.Module, head: nn.Module, split: Any) -> Tensor:
        """``head(model(inputs))`` for every sample of a split, in order, float32 on the CPU."""
        ...

    def features(self, model: nn.Module, split: Any) -> Tensor:
        """``model(inputs)`` for every sample of a split, in order (what probes, Tip-Adapter and LP++ fit)."""
        ...

    def scores(self, model: nn.Module, head: nn.Module, split: Any) -> dict[str, float]:
        """``{"acc", "balanced_acc"}`` of ``head(model(inputs))`` on a split (the report's numbers)."""
        ...

    def augment_inputs(self, x: Tensor, generator: torch.Generator | None, strength: str) -> Tensor:
        """A ``weak`` or ``strong`` view of a batch of inputs (what SimCLR and UFM compare), a function of
        ``(x, generator)``; ``None`` draws from torch's global generator (``fit`` reseeds it per epoch)."""
        ...

    def unlabelled(self, split: Any) -> Any:
        """The split with every label replaced by -1: what adaptation on test inputs may hold."""
        ...

    def unlabelled_loader(self, split: Any, *, batch_size: int, trusted: tuple[Tensor, Tensor] | None = None) -> Loader:
        """Shuffled input batches ``x`` of a split, never its labels; with UFM's ``trusted = (indices,
        pseudo-labels)``, ``(x, TrustedTargets)`` batches of two streams (:func:`taskvec.batching.index_loader`)."""
        ...


SUITES = ("vision", "text")


def make_suite(name: str = "vision", *, root: Path | str | None = None, tasks: Sequence[str] | None = None,
               progress: bool = True, linearized: bool = False) -> Any:
    """The named suite over its default bank (or the bank at ``root``): what ``--suite`` builds.

    ``linearized`` gives the suite over the linearised bank of the same settings."""
    if name == "vision":
        from dataclasses import replace

        from taskvec.bank import DEFAULT_TASKS, Bank, BankConfig
        from taskvec.suites.vision import VisionSuite

        config = replace(BankConfig(), linearized=linearized)
        return VisionSuite(Bank(config, root=root), tasks=tuple(tasks or DEFAULT_TASKS), progress=progress)
    if name == "text":
        from taskvec.suites.text import TEXT_TASKS_DEFAULT, TextSuite

        suite = TextSuite(root=None if linearized else root, tasks=tuple(tasks or TEXT_TASKS_DEFAULT),
                          progress=progress)
        return suite.linearized() if linearized else suite
    raise ValueError(f"unknown suite {name!r}; choose from {list(SUITES)}")


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """``--suite`` and ``--bank-root``: every recipe's way to pick what it runs on."""
    parser.add_argument("--suite", choices=SUITES, default="vision",
                        help="vision (MobileNetV2 bank, probe heads) or text (MiniLM bank, zero-shot heads) "
                             "(default: %(default)s)")
    parser.add_argument("--bank-root", type=Path, default=None,
                        help="the suite's bank directory (default: under $TASKVEC_CACHE/banks)")


def suite_from_args(args: argparse.Namespace, *, progress: bool = True, tasks: Sequence[str] | None = None) -> Any:
    """The suite :func:`add_suite_arguments`' options name."""
    return make_suite(args.suite, root=args.bank_root, tasks=tasks, progress=progress)


__all__ = ["SUITES", "Suite", "add_suite_arguments", "make_suite", "suite_from_args"]
