"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by minimising prediction entropy
on unlabelled inputs of every task, each through its own frozen head.

It is a configuration of the library's pieces, not a method of its own: a :class:`~taskvec.compose.Composer`
at ``"task"`` granularity (task-wise: one coefficient per vector, the composer's ``isotropic``) or
``"layer"`` granularity (layer-wise: the authors' layers are parameter tensors, the composer's
``block``), coefficients starting at 0.3, clamped to [0, 1] in the forward pass as the authors do
(gradients stop where a coefficient is outside), Adam at a *constant* rate (``TrainConfig(schedule=
"constant")``), no clipping, the last step kept. :func:`adamerge` runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from taskvec.compose import Composer
from taskvec.objectives import softmax_entropy
from taskvec.train import Batch, Loader, LossFn, TrainConfig, TrainResult, fit
from taskvec.vectors import TaskVector

GRANULARITY = {"task": "isotropic", "layer": "block"}


class ClampedComposer(nn.Module):
    """A composer run with its coefficients clamped to ``[low, high]`` (AdaMerging's [0, 1])."""

    def __init__(self, composer: Composer, low: float, high: float) -> None:
        super().__init__()
        if not low < high:
            raise ValueError(f"clamp needs low < high; got [{low}, {high}]")
        self.composer, self.low, self.high = composer, low, high

    def forward(self, x: Tensor) -> Tensor:
        return self.composer(x, coefficients=self.composer.coefficients.clamp(self.low, self.high))

    @torch.no_grad()
    def settle(self) -> Composer:
        """Write the clamped values into the coefficients, so ``merge()`` gives what was trained."""
        self.composer.coefficients.clamp_(self.low, self.high)
        return self.composer


def multitask_entropy(heads: Sequence[nn.Module]) -> LossFn:
    """AdaMerging's objective: the sum over tasks of the mean prediction entropy on that task's
    unlabelled inputs, each through its own frozen head. Batches: ``[x_task0, x_task1, ...]``; inputs of
    equal shape share one forward pass."""
    for head in heads:
        head.requires_grad_(False)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        if not isinstance(batch, Sequence) or len(batch) != len(heads) or not all(isinstance(x, Tensor) for x in batch):
            raise TypeError(f"multitask_entropy: expected a list of {len(heads)} input tensors, one per task")
        if len({tuple(x.shape[1:]) for x in batch}) == 1:  # one forward pass when the inputs stack
            features = model(torch.cat(list(batch))).split([len(x) for x in batch])
        else:  # e.g. token batches padded to each task's own length
            features = [model(x) for x in batch]
        terms = [softmax_entropy(head(f)).mean() for head, f in zip(heads, features, strict=True)]
        return torch.stack(terms).sum()

    return loss_fn


@dataclass
class AdaMergingConfig:
    """The authors' defaults but the number of steps (they run 500 of 16 images per task)."""

    granularity: str = "layer"  # "task" (task-wise) or "layer" (layer-wise)
    steps: int = 500
    lr: float = 1e-3
    init: float = 0.3
    clamp: tuple[float, float] | None = (0.0, 1.0)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITY:
            raise ValueError(f"AdaMergingConfig.granularity={self.granularity!r}; choose one of {list(GRANULARITY)}")
        if self.steps < 1:
            raise ValueError(f"AdaMergingConfig.steps={self.steps}; must be >= 1")

    def train_config(self, checkpoint: Path | None = None, resume: bool = False) -> TrainConfig:
        """One epoch of ``steps`` batches at a constant rate, no clipping, no weight decay."""
        return TrainConfig(epochs=1, lr=self.lr, weight_decay=0.0, warmup_fraction=0.0, max_grad_norm=None,
                           schedule="constant", seed=self.seed, progress=self.progress, description="AdaMerging",
                           checkpoint=checkpoint, resume=resume)


def adamerging_composer(base: nn.Module, vectors: Sequence[TaskVector], config: AdaMergingConfig) -> Composer:
    return Composer(base, vectors, GRANULARITY[config.granularity], init=config.init)


def adamerge(
    base: nn.Module,
    vectors: Sequence[TaskVector],
    heads: Sequence[nn.Module],
    loader: Loader,
    config: AdaMergingConfig | None = None,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
) -> tuple[Composer, TrainResult]:
    """Learn AdaMerging coefficients on ``loader``'s unlabelled batches ``[x_task0, x_task1, ...]`` (one
    input tensor per vector, in the order of ``heads``); returns the composer (coefficients clamped)."""
    config = config or AdaMergingConfig()
    if len(heads) != len(vectors):
        raise ValueError(f"AdaMerging needs one head per vector; got {len(heads)} heads for {len(vectors)} vectors")
    composer = adamerging_composer(base, vectors, config)
    model: nn.Module = composer if config.clamp is None else ClampedComposer(composer, *config.clamp)
    result = fit(
        model, multitask_entropy(heads), loader, config.train_config(checkpoint, resume),
        # Adam (not AdamW) as the authors; with no weight decay the two take the same steps.
        optimizer_factory=lambda params: torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0),
    )
    if isinstance(model, ClampedComposer):
        model.settle()
    return composer, result
