"""Training and measuring a variational composer on a suite's data: the ELBO fit, gated evaluation,
and the inference cost against a merged network.

Why here and not in a recipe: these are the variational method's own steps (how its KL warm-up is
sized, how the gate is read out on a split, how its per-sample runners are timed). Batches and
logits come from a suite (:class:`taskvec.suites.Suite`), so the same code runs on images and text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taskvec.report import markdown_table
from taskvec.train import TrainConfig, TrainResult, fit
from taskvec.variational.model import ELBOLoss, VariationalComposer

__all__ = [
    "GateRecorder",
    "gated_logits",
    "gated_scores",
    "inference_cost",
    "learn_variational",
    "learn_variational_multitask",
    "probe_batch",
    "seeded_subset",
    "train_variational",
    "variational_composer",
]

RUNNERS = ("vmap", "linear", "auto")


def train_variational(
    model: VariationalComposer,
    loss: ELBOLoss,
    loader: Iterable[Any],
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    kl_warmup_fraction: float = 0.5,
    seed: int = 0,
    evaluate: Callable[[nn.Module], float] | None = None,
    progress: bool = True,
    description: str = "variational",
    checkpoint: Path | None = None,
    resume: bool = True,
) -> TrainResult:
    """Fit the inference network on the ELBO: AdamW without warm-up (its output bias plays aTLAS's
    coefficients), the KL weight warmed up over ``kl_warmup_fraction`` of all steps, the epoch chosen by
    ``evaluate`` (selection data only). A finished run's checkpoint is removed."""
    if not 0.0 <= kl_warmup_fraction <= 1.0:
        raise ValueError(f"kl_warmup_fraction must lie in [0, 1], got {kl_warmup_fraction}")
    steps = len(loader)  # type: ignore[arg-type]
    loss.kl_warmup_steps = int(kl_warmup_fraction * epochs * steps)
    result = fit(
        model,
        loss,
        loader,
        TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_fraction=0.0, seed=seed,
                    progress=progress, description=description, checkpoint=checkpoint,
                    resume=checkpoint is not None and resume),
        evaluate=evaluate,
    )
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return result


class GateRecorder(nn.Module):
    """The gated composer as a plain ``inputs -> outputs`` module that also counts, per (vector, block),
    how many inputs the gate kept it for: hand it to ``suite.logits`` and read :attr:`kept` after."""

    def __init__(self, model: VariationalComposer) -> None:
        super().__init__()
        self.model = model
        self.kept_sum: Tensor | None = None
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        features = self.model.features(x)
        kept = self.model.kept_fraction(features, per_block=True) * len(features)
        self.kept_sum = kept if self.kept_sum is None else self.kept_sum + kept
        self.count += len(features)
        return self.model(x, features=features, sample=False)

    @property
    def kept(self) -> Tensor:
        """Fraction of the inputs seen for which the gate keeps each (vector, block)."""
        if self.kept_sum is None:
            raise ValueError("GateRecorder has seen no inputs yet")
        return self.kept_sum / self.count


@torch.no_grad()
def gated_logits(model: VariationalComposer, head: nn.Module, split: Any, suite: Any) -> tuple[Tensor, Tensor]:
    """Logits of gated inference on every sample of ``split`` (batched by ``suite.logits``), and the
    fraction of the split for which the gate keeps each (vector, block)."""
    recorder = GateRecorder(model)
    logits = suite.logits(recorder, head, split)
    return logits, recorder.kept


def probe_batch(suite: Any, split: Any, size: int, seed: int = 0) -> Tensor:
    """One batch of ``size`` inputs of ``split`` as the suite feeds them (seeded, not augmented)."""
    loader = suite.loader(split, batch_size=size, augmentation=None)
    x, _ = next(iter(loader.epoch(torch.Generator().manual_seed(seed))))
    return x


def _best_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up (and, for the linearity runner, its basis and one check against vmap)
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1000.0 * min(times)


@torch.no_grad()
def inference_cost(
    model: VariationalComposer, merged: nn.Module, x: Tensor, rounds: int = 5, runners: Iterable[str] = RUNNERS
) -> list[dict]:
    """Milliseconds per batch of gated variational inference (features + inference network + per-sample
    composition) for each runner, against the merged network on the same batch (best of ``rounds``).
    A runner that refuses the network (the linearity runner on unsupported modules) gets a note."""
    model.eval()
    floor = _best_ms(lambda: merged(x), rounds)
    rows: list[dict] = [{"method": "merged aTLAS", "ms_per_batch": floor, "relative": 1.0}]
    previous = model.config.method
    try:
        for method in runners:
            model.config.method = method
            try:
                ms = _best_ms(lambda: model(x), rounds)
            except (TypeError, ValueError) as err:
                rows.append({"method": f"variational ({method})", "ms_per_batch": None, "relative": None,
                             "note": str(err)[:200]})
                continue
            rows.append({"method": f"variational ({method})", "ms_per_batch": ms, "relative": ms / floor})
    finally:
        model.config.method = previous
    return rows


@torch.no_grad()
def gated_scores(
    model: VariationalComposer, head: nn.Module, split: Any, suite: Any
) -> tuple[dict[str, float], Tensor]:
    """``({"acc", "balanced_acc"}, kept fraction per (vector, block))`` of gated inference on ``split``."""
    from taskvec.evaluate import balanced_accuracy

    logits, kept = gated_logits(model, head, split, suite)
    predicted, labels = logits.argmax(-1), split.labels.cpu()
    accuracy = float((predicted == labels).float().mean())
    return {"acc": accuracy, "balanced_acc": balanced_accuracy(predicted, labels)}, kept


def variational_composer(
    suite: Any, base: nn.Module, vectors: list, granularity: str, config: Any, *, init: float = 0.0,
    probe: Any = None,
) -> VariationalComposer:
    """A :class:`VariationalComposer` over ``base`` and ``vectors``, its inference network reading the base's
    features (their width from ``base.feature_dim``, else from one sample of ``probe`` through the suite)."""
    from dataclasses import replace

    from taskvec.compose import Composer

    dim = getattr(base, "feature_dim", None)
    if not isinstance(dim, int):
        if probe is None:
            raise ValueError(f"{type(base).__name__} has no feature_dim; pass probe= a split to measure it on")
        dim = int(suite.features(base, probe.subset(torch.arange(1))).shape[-1])
    return VariationalComposer(Composer(base, vectors, granularity, init=init), feature_dim=dim,
                               config=replace(config))


def seeded_subset(split: Any, limit: int, seed: int = 0) -> Any:
    """At most ``limit`` samples of ``split`` (0: all of it), a seeded choice kept in split order: a CPU
    budget's test subset, the same for every method compared on it."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit == 0 or len(split) <= limit:
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(order[:limit].sort()[0])


def learn_variational(
    model: VariationalComposer, head: nn.Module, train: Any, val: Any | None, suite: Any, schedule: Any, *,
    lr: float, kl_weight: float = 1.0, kl_normalizer: str = "sample", kl_warmup_fraction: float = 0.5,
    weight_decay: float = 0.0, description: str = "variational",
) -> TrainResult:
    """Few-shot: the ELBO through the frozen ``head`` on the (augmented) shots of ``train``, batched by the
    suite as ``schedule`` (a :class:`~taskvec.workflow.CoefficientSchedule`) says; the epoch chosen by
    :func:`~taskvec.evaluate.selection_metric` of gated inference on ``val`` (the last one without)."""
    from taskvec.evaluate import selection_metric

    loader = suite.loader(train, batch_size=schedule.batch_size, augmentation=schedule.augmentation,
                          min_steps=schedule.min_steps_per_epoch)
    loss = ELBOLoss(head, len(train), 0, kl_weight=kl_weight, kl_normalizer=kl_normalizer)
    evaluate = None if val is None else (lambda m: selection_metric(gated_logits(m, head, val, suite)[0], val))
    return train_variational(model, loss, loader, epochs=schedule.epochs, lr=lr, weight_decay=weight_decay,
                             kl_warmup_fraction=kl_warmup_fraction, seed=schedule.seed, evaluate=evaluate,
                             progress=schedule.progress, description=description)


def learn_variational_multitask(
    model: VariationalComposer, ctx: Any, setup: Any, *, lr: float, kl_weight: float = 1.0,
    kl_normalizer: str = "sample", kl_warmup_fraction: float = 0.5, weight_decay: float = 0.0,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Task addition: the multi-task ELBO (each task through its own frozen head) on the fitting parts of a
    :class:`~taskvec.workflow.MultiTaskData` ``ctx``, every batch mixing all tasks as aTLAS's does
    (``setup``: a :class:`~taskvec.workflow.MultiTaskSetup`); the epoch chosen on the selection parts."""
    from taskvec.variational.model import MultitaskELBOLoss

    loss = MultitaskELBOLoss([ctx.heads[t] for t in ctx.tasks], sum(len(ctx.fit[t]) for t in ctx.tasks), 0,
                             kl_weight=kl_weight, kl_normalizer=kl_normalizer)
    loader = ctx.mixed([ctx.fit[t] for t in ctx.tasks], setup.batch_per_task, augmentation=setup.augmentation)
    return train_variational(model, loss, loader, epochs=setup.epochs, lr=lr, weight_decay=weight_decay,
                             kl_warmup_fraction=kl_warmup_fraction, seed=setup.seed, evaluate=ctx.selection_score,
                             progress=setup.progress, description="variational (multi-task)", checkpoint=checkpoint,
                             resume=setup.resume)


def report_table(payload: dict, config: Any, labels: Mapping[str, str]) -> str:
    """The variational recipe's markdown from its payload: task addition (accuracy, kept fraction,
    inference cost) and the few-shot grid (mean +- s.e. over seeds); ``labels``: method key -> row name."""
    sections = []
    if "addition" in payload:
        part, tasks = payload["addition"], payload["addition"]["tasks"]
        rows = [{"method": r["method"], **{t[:12]: r["test_acc"][t] for t in tasks}, "avg": r["avg_acc"],
                 "avg balanced": sum(r["test_balanced_acc"].values()) / len(tasks), "avg normalised":
                 r["avg_normalized"], "kept": r.get("kept_fraction_avg", 1.0), "seconds": r["seconds"]}
                for r in (part["atlas"], part["variational"])]
        cost = [{"inference": r["method"], "ms / batch": r["ms_per_batch"], "x merged": r["relative"]}
                for r in part["cost"]]
        sections += [f"**Task addition** over {len(tasks)} tasks, test accuracy (normalised: over each task's "
                     "fine-tuned accuracy); both rows trained on the same fitting parts of the validation splits and "
                     "selected on the same selection parts. 'kept': fraction of coefficients the gate keeps, averaged "
                     "over test inputs.", markdown_table(rows), f"**Inference cost** per batch of {config.timing_batch}"
                     f" (CPU, best of {config.timing_rounds}), relative to the merged aTLAS network:",
                     markdown_table(cost)]
    if "fewshot" in payload:
        cells = {(name, s["method"], s["k"]): s for name, rows in payload["fewshot"]["summary"].items() for s in rows}
        columns = [f"{name} k={k}" for name in ("acc", "balanced_acc", "kept_fraction") for k in config.shots]
        rows = [{"method": label, **{f"{name} k={k}": f"{100 * c['mean']:.1f} ± {100 * (c['se'] or 0):.1f}"
                                       for name in ("acc", "balanced_acc", "kept_fraction") for k in config.shots
                                       if (c := cells.get((name, key, k)))}} for key, label in labels.items()]
        sections += [f"**Few-shot** on {', '.join(config.targets)} (leave-one-out bank): test accuracy, balanced "
                     f"accuracy and the coefficients the gate keeps, in %, mean ± s.e. over seeds "
                     f"{list(config.seeds)}; both methods on the same shots.",
                     markdown_table(rows, ["method", *columns])]
    scale = "per-sample ELBO" if config.kl_normalizer == "sample" else "KL divided by the number of fitting samples"
    sections.append(f"Objective: {scale}, KL weight beta = {config.kl_weight:g} (warm-up over "
                    f"{config.kl_warmup_fraction:.0%} of the steps); per-sample runner {config.variational.method!r}.")
    return "\n\n".join(sections)
