"""The training loop for whatever is trainable in a module: coefficients, offsets, adapters, weights.

One loop serves the composer, fine-tuning of the bank and every baseline: AdamW on the parameters
that require grad, a learning-rate schedule (warm-up then cosine decay, or constant), an optional
clamp of the trained values, gradient clipping, bf16 autocast on CUDA, a progress
bar, model selection on a held-out metric, and an atomic checkpoint at each epoch end.

Reproducibility: every epoch draws its randomness from a generator seeded by ``(seed, epoch)`` and
reseeds torch's global generator the same way, so a run resumed from its epoch-``e`` checkpoint
continues exactly as the uninterrupted run would have.

Batches come from any iterable: taskvec's :class:`Loader` (epoch order drawn from the epoch's
generator), a ``torch.utils.data.DataLoader`` (a shuffling sampler draws from torch's global
generator, reseeded per epoch; a sampler holding its own ``generator`` has it reseeded per epoch, so
both resume exactly), or any re-iterable sequence of batches.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from taskvec.io import atomic_save_torch

Batch = Any
LossFn = Callable[[nn.Module, Batch], Tensor]
Evaluate = Callable[[nn.Module], float]


class Loader:
    """An epoch-wise batch source: ``make(generator)`` yields the batches of one epoch.

    ``steps`` is the number of batches an epoch yields (the schedule needs it up front).
    """

    def __init__(self, make: Callable[[torch.Generator], Iterable[Batch]], steps: int) -> None:
        if steps < 1:
            raise ValueError(f"a loader needs at least one batch per epoch, got {steps}")
        self.make = make
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        return iter(self.make(generator))


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit`; defaults suit coefficient learning."""

    epochs: int = 10
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: bool | None = None  # None: bf16 autocast when the model is on CUDA
    higher_is_better: bool = True
    select_initial: bool = True  # the untrained state competes in model selection
    train_mode: bool = True  # False: train in eval mode, so BatchNorm statistics (and dropout) stay frozen
    progress: bool = True
    checkpoint: Path | None = None  # file written atomically at every epoch end
    resume: bool = False
    description: str = "train"
    schedule: str = "cosine"  # "cosine": linear warm-up (warmup_fraction) then cosine decay; "constant": lr throughout
    clamp: tuple[float, float] | None = None  # (low, high): trained values projected into the range after each step
    steps_per_epoch: int | None = None  # only for a cosine schedule over batches without len()

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if self.epochs < 0:
            raise ValueError(f"TrainConfig.epochs={self.epochs}; must be >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"TrainConfig.warmup_fraction={self.warmup_fraction}; must be in [0, 1)")
        if self.clamp is not None and not self.clamp[0] < self.clamp[1]:
            raise ValueError(f"TrainConfig.clamp={self.clamp}; needs low < high")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"TrainConfig.steps_per_epoch={self.steps_per_epoch}; must be >= 1")


SCHEDULES = ("cosine", "constant")


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    metric: float | None
    seconds: float


@dataclass
class TrainResult:
    best_metric: float | None
    best_epoch: int
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad: nothing to train")
    return params


def _snapshot(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def _restore(params: dict[str, nn.Parameter], state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def _schedule(total_steps: int, warmup_fraction: float, kind: str = "cosine") -> Callable[[int], float]:
    if kind == "constant":
        return lambda step: 1.0
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _steps_per_epoch(loader: Iterable[Batch], config: TrainConfig) -> int:
    """Batches per epoch, which a cosine schedule needs up front."""
    if config.steps_per_epoch is not None:
        return config.steps_per_epoch
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        if config.schedule == "constant":
            return 1  # unused by a constant schedule
        raise TypeError(
            f"fit: the batches ({type(loader).__name__}) have no len(), which the cosine schedule needs; "
            "pass TrainConfig(steps_per_epoch=...) or schedule='constant'"
        ) from None


def _epoch_batches(loader: Iterable[Batch], generator: torch.Generator, seed: int) -> Iterator[Batch]:
    """One epoch of batches: ``Loader.epoch(generator)``, or iteration of any other iterable after
    reseeding a sampler's own generator (``DataLoader(sampler=RandomSampler(..., generator=g))``)."""
    epoch = getattr(loader, "epoch", None)
    if callable(epoch):
        return iter(epoch(generator))
    batch_sampler = getattr(loader, "batch_sampler", None)
    for holder in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        own = getattr(holder, "generator", None)
        if isinstance(own, torch.Generator):
            own.manual_seed(seed)
    if isinstance(loader, Iterator):
        raise TypeError("fit: batches must be re-iterable once per epoch (a DataLoader, Loader or list), "
                        "not a one-shot iterator")
    return iter(loader)


def _better(new: float, old: float | None, higher: bool) -> bool:
    return old is None or (new > old if higher else new < old)


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    loader: Iterable[Batch],
    config: TrainConfig | None = None,
    *,
    evaluate: Evaluate | None = None,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad, to minimise ``loss_fn(model, batch)``.

    With ``evaluate`` (higher is better unless configured otherwise) the best epoch's parameters are
    restored at the end; that is the only model selection, so pass held-out data to it, never test data.
    ``loader`` is any re-iterable source of batches (see the module docstring for exact resume).
    """
    config = config or TrainConfig()
    params = _trainable(model)
    device = next(iter(params.values())).device
    autocast = config.mixed_precision if config.mixed_precision is not None else device.type == "cuda"
    optimizer = (
        optimizer_factory(list(params.values()))
        if optimizer_factory
        else torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(config.epochs * _steps_per_epoch(loader, config), config.warmup_fraction, config.schedule)
    )
    result = TrainResult(best_metric=None, best_epoch=0)
    best_state: dict[str, Tensor] | None = None
    start_epoch = 1
    started = time.perf_counter()

    if config.resume and config.checkpoint is not None and Path(config.checkpoint).is_file():
        saved = torch.load(config.checkpoint, map_location=device, weights_only=True)
        if sorted(saved["params"]) != sorted(params):
            raise ValueError(f"{config.checkpoint}: checkpoint holds parameters {sorted(saved['params'])[:3]}..., "
                             f"this run trains {sorted(params)[:3]}...")
        _restore(params, saved["params"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        best_state = saved["best_state"]
        result = TrainResult(
            best_metric=saved["best_metric"],
            best_epoch=saved["best_epoch"],
            history=[EpochRecord(**record) for record in saved["history"]],
        )
        start_epoch = saved["epoch"] + 1
    elif evaluate is not None and config.select_initial:
        model.eval()
        with torch.no_grad():
            result.best_metric = float(evaluate(model))
        best_state = _snapshot(params)
        result.history.append(EpochRecord(0, float("nan"), result.best_metric, 0.0))

    bar = tqdm(
        range(start_epoch, config.epochs + 1),
        desc=config.description,
        disable=not config.progress,
        initial=start_epoch - 1,
        total=config.epochs,
        leave=False,
    )
    for epoch in bar:
        tic = time.perf_counter()
        seed = epoch_seed(config.seed, epoch)
        seed_everything(seed)
        generator = torch.Generator().manual_seed(seed)
        model.train(config.train_mode)
        total, count = 0.0, 0
        for batch in _epoch_batches(loader, generator, seed):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}; lower the learning rate")
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
            optimizer.step()
            if config.clamp is not None:
                with torch.no_grad():
                    for p in params.values():
                        p.clamp_(*config.clamp)
            scheduler.step()
            total += float(loss.detach())
            count += 1
        metric = None
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                metric = float(evaluate(model))
            if _better(metric, result.best_metric, config.higher_is_better):
                result.best_metric, result.best_epoch = metric, epoch
                best_state = _snapshot(params)
        result.history.append(EpochRecord(epoch, total / max(1, count), metric, time.perf_counter() - tic))
        bar.set_postfix(loss=f"{total / max(1, count):.4f}", **({"val": f"{metric:.4f}"} if metric is not None else {}))
        if config.checkpoint is not None:
            atomic_save_torch(
                {
                    "epoch": epoch,
                    "params": _snapshot(params),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best_state": best_state,
                    "best_metric": result.best_metric,
                    "best_epoch": result.best_epoch,
                    "history": [asdict(record) for record in result.history],
                },
                config.checkpoint,
            )
    bar.close()
    if best_state is not None:
        _restore(params, best_state)
    else:
        result.best_epoch = config.epochs
    model.eval()
    result.seconds = time.perf_counter() - started
    return result
