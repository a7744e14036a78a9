"""The vision suite: the image bank (MobileNetV2 or ViT backbone, six small image tasks, their task
vectors and linear heads), image loaders and augmentations, behind :class:`taskvec.suites.Suite`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from taskvec.bank import DEFAULT_TASKS, Bank, BankConfig
from taskvec.batching import image_loader, unlabelled, unlabelled_loader
from taskvec.data import ImageSet, augment
from taskvec.evaluate import accuracy, balanced_accuracy, features, logits
from taskvec.train import Loader
from taskvec.vectors import TaskVector


class VisionSuite:
    """A bank of image tasks; builds missing entries on first use (cached, resumable)."""

    name = "vision"

    def __init__(self, bank: Bank | None = None, *, tasks: Sequence[str] = DEFAULT_TASKS, progress: bool = True,
                 config: BankConfig | None = None) -> None:
        self.bank = bank or Bank(config or BankConfig())
        self._tasks = tuple(tasks)
        self.progress = progress
        self._norm: dict | None = None
        self._resolution = self.bank.config.resolution

    @classmethod
    def for_images(cls, resolution: int, norm: dict, bank: Bank | None = None) -> VisionSuite:
        """Batching and scoring of image splits at ``resolution`` with ``norm`` (``mean``, ``std``), e.g.
        for splits that come from outside a bank; backbone, vectors and heads need ``bank``."""
        suite = cls.__new__(cls)
        suite.bank, suite._tasks, suite.progress = bank, tuple(DEFAULT_TASKS), False  # type: ignore[assignment]
        suite._norm, suite._resolution = dict(norm), int(resolution)
        return suite

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    head_description = "its own head, a linear probe fitted on its whole training split"

    def few_shot_pool(self, task: Any) -> ImageSet:
        """Where a target's k shots come from: its validation split. The head was fitted on the training
        split, so shots from there would be images it has memorised (loss near zero, accuracy inflated)."""
        return task.val

    def linearized(self) -> VisionSuite:
        """The same suite over the linearised bank of the same settings (vectors fine-tuned in tangent
        space), a sibling of this bank's directory, as :meth:`TextSuite.linearized`."""
        from dataclasses import replace

        config = replace(self.bank.config, linearized=True)
        bank = Bank(config, root=self.bank.root.parent / config.key(), loader=self.bank.loader)
        return VisionSuite(bank, tasks=self._tasks, progress=self.progress)

    def build(self, tasks: Sequence[str] | None = None) -> None:
        self.bank.build(tuple(tasks or self._tasks), progress=self.progress)

    def identity(self) -> dict[str, Any]:
        return {"suite": self.name, "bank": str(self.bank.root), "bank_config": asdict(self.bank.config),
                "entries": {t: self.bank.meta(t).get("vector_norm") for t in self._tasks if self.bank.has(t)}}

    def backbone(self) -> nn.Module:
        from taskvec.models import build_backbone

        base, spec = build_backbone(self.bank.config.backbone, pretrained=self.bank.config.pretrained)
        self._norm = {"mean": spec.mean, "std": spec.std}
        return base.eval()

    @property
    def norm(self) -> dict:
        """The backbone's input normalisation (``mean``, ``std``)."""
        if self._norm is None:
            self.backbone()
        assert self._norm is not None
        return self._norm

    @property
    def resolution(self) -> int:
        return self._resolution

    def vectors(self, tasks: Sequence[str]) -> list[TaskVector]:
        return self.bank.vectors(tasks)

    def head(self, task: str) -> nn.Module:
        return self.bank.head(task).freeze()

    def splits(self, task: str):
        return self.bank.loader(task, seed=self.bank.config.seed)

    def loader(
        self, split: ImageSet, *, batch_size: int, augmentation: str | None = "weak", min_steps: int = 1
    ) -> Loader:
        return image_loader(split, self._resolution, batch_size=batch_size, norm=self.norm, augmentation=augmentation,
                            min_steps=min_steps)

    def augment(self, x, generator, strength: str):
        return augment(x, generator, strength, **self.norm)

    def augment_inputs(self, x: Tensor, generator: torch.Generator | None, strength: str) -> Tensor:
        """A view of a normalised image batch (:func:`taskvec.data.augment` with the backbone's norm);
        ``generator=None`` draws from torch's global generator, which ``fit`` reseeds every epoch."""
        return augment(x, generator, strength, **self.norm)

    def unlabelled(self, split: ImageSet) -> ImageSet:
        """The split's images without their labels (all -1): what test-time adaptation may hold."""
        return unlabelled(split.images)

    def unlabelled_loader(self, split: ImageSet, *, batch_size: int,
                          trusted: tuple[Tensor, Tensor] | None = None) -> Loader:
        """Shuffled input batches of the split's images, no labels (UFM: two streams, see
        :func:`taskvec.batching.index_loader`)."""
        return unlabelled_loader(split.images, self._resolution, self.norm, batch_size, trusted)

    def accuracy(self, model: nn.Module, head: nn.Module, split: ImageSet) -> float:
        return accuracy(model, head, split, self._resolution, **self.norm)

    def logits(self, model: nn.Module, head: nn.Module, split: ImageSet) -> Tensor:
        return logits(model, head, split, self._resolution, **self.norm)

    def features(self, model: nn.Module, split: ImageSet) -> Tensor:
        return features(model, split, self._resolution, **self.norm)

    def scores(self, model: nn.Module, head: nn.Module, split: ImageSet) -> dict[str, float]:
        predicted = self.logits(model, head, split).argmax(-1)
        labels = split.labels.cpu()
        accuracy_ = float((predicted == labels).float().mean())
        return {"acc": accuracy_, "balanced_acc": balanced_accuracy(predicted, labels)}
