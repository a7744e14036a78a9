"""The control rule of task negation (aTLAS, after Ilharco et al.): forgetting a target counts only
while a control task keeps at least 95% of the pre-trained model's control accuracy.

Here live the rule (:func:`control_kept`, :func:`negation_score`), the choice of control per suite, one
(target, control) job on a suite whose selection metric is the rule (:class:`NegationJob`), and the two
negation methods that choose on it: :func:`negated_task_arithmetic` and aTLAS's :func:`learn_negation`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

ROUNDING = 1e-6
# Per suite, the control and the fallback control (used when the target is the control): a task the
# pre-trained backbone already does well on (aTLAS uses ImageNet; these banks have no ImageNet head).
SUITE_CONTROLS = {"vision": ("fashion_mnist", "mnist"), "text": ("bbc_news", "wordnet_noun")}


def control_kept(control_acc: float, reference_acc: float, fraction: float = 0.95) -> bool:
    """The control condition of task negation: control accuracy >= ``fraction`` x the pre-trained's.

    Accuracies arrive as float32 means, so the comparison allows 1e-6 of rounding (72/100 against
    0.9 x 80/100 must pass); accuracies over fewer than 10^5 samples differ by at least 1e-5, so the
    slack never changes a real decision.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction!r}")
    return control_acc >= fraction * reference_acc - ROUNDING


def negation_score(target_acc: float, control_acc: float, reference_acc: float, fraction: float = 0.95) -> float:
    """One number, higher is better, for model selection under the 95% rule.

    A state that keeps the control scores ``1 - target_acc`` (in [0, 1]: the lower the target
    accuracy the better); one that does not scores ``control_acc - 2`` (in [-2, -1]), below every
    state that keeps it, so the selection picks the lowest target accuracy among states that satisfy
    the rule, and falls back to the best control only if none does.
    """
    if control_kept(control_acc, reference_acc, fraction):
        return 1.0 - target_acc
    return control_acc - 2.0


def default_control(target: str, control: str = SUITE_CONTROLS["vision"][0],
                    fallback: str = SUITE_CONTROLS["vision"][1]) -> str:
    """The control task for ``target``: ``control``, or ``fallback`` when the target is the control."""
    if control == fallback:
        raise ValueError(f"control and fallback control must differ; both are {control!r}")
    return fallback if target == control else control


def suite_controls(suite_name: str) -> tuple[str, str]:
    """``(control, fallback control)`` of a suite (:data:`SUITE_CONTROLS`)."""
    if suite_name not in SUITE_CONTROLS:
        raise ValueError(f"no default negation control for suite {suite_name!r} (known: {sorted(SUITE_CONTROLS)}); "
                         "name one with --control and --fallback-control")
    return SUITE_CONTROLS[suite_name]


@dataclass
class NegationSide:
    """One task of a negation job: its frozen head, the selection / fitting parts of its validation
    split, its test split and its bank entry's metadata."""

    name: str
    head: nn.Module
    select: Any
    fit: Any
    test: Any
    meta: dict


class NegationJob:
    """A (target, control) pair on one suite with the 95% rule as its selection metric.

    The reference is the pre-trained model's control accuracy on the control's selection part, so
    every choice (alpha, epoch) is made on validation data; :meth:`test` is for the report only.
    ``evaluator(model, head, split)`` computes every accuracy (default ``suite.accuracy``)."""

    def __init__(self, suite: Any, target: str, control: str, *, select_per_task: int, fit_per_task: int,
                 seed: int, fraction: float = 0.95, evaluator: Callable[..., float] | None = None) -> None:
        from taskvec.batching import split_validation

        control_kept(1.0, 1.0, fraction)  # validates the fraction
        self.suite, self.fraction = suite, fraction
        self.evaluator = evaluator or suite.accuracy
        self.base = suite.backbone()
        sides = []
        for task in (target, control):
            data = suite.splits(task)
            select, fit = split_validation(data.val, select_per_task, fit_per_task, seed, task)
            sides.append(NegationSide(task, suite.head(task), select, fit, data.test, suite.bank.meta(task)))
        self.target, self.control = sides
        self.reference = self.accuracy(self.base, self.control, "select")  # pre-trained control accuracy (val)
        self.trace: list[dict] = []

    def accuracy(self, model: nn.Module, side: NegationSide, split: str) -> float:
        return float(self.evaluator(model, side.head, getattr(side, split)))

    def selection(self, model: nn.Module) -> float:
        """:func:`negation_score` on the selection parts (validation data); records both accuracies."""
        target, control = self.accuracy(model, self.target, "select"), self.accuracy(model, self.control, "select")
        self.trace.append({"target_val": target, "control_val": control})
        return negation_score(target, control, self.reference, self.fraction)

    def test(self, model: nn.Module) -> tuple[float, float]:
        """Target and control accuracy on the test splits: the report, never a choice."""
        return self.accuracy(model, self.target, "test"), self.accuracy(model, self.control, "test")

    def vector(self) -> Any:
        return self.suite.vectors([self.target.name])[0]


class NegationSettings(Protocol):
    """What :func:`learn_negation` reads (``NegationConfig`` has it)."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    bound: str
    augmentation: str | None
    seed: int
    progress: bool
    resume: bool


def negated_task_arithmetic(
    job: NegationJob, grid: Sequence[float], linearized: bool = False
) -> tuple[nn.Module, dict]:
    """``theta_0 + alpha * tau_target`` with alpha from ``grid`` (0 and negative values) chosen by the 95% rule
    on validation data (an isotropic composer in tangent space when ``linearized``): ``(model, detail)``."""
    from taskvec.compose import Composer
    from taskvec.merging import alpha_search

    vector = job.vector()
    composer = Composer(job.base, [vector], "isotropic", linearized=True) if linearized else None

    def at(alpha: float) -> nn.Module:
        if composer is None:
            return vector.apply_to(job.base, alpha)
        composer.coefficients.data.fill_(alpha)
        return composer

    best, table = alpha_search(lambda a: job.selection(at(a)), grid)
    trace = [dict(alpha=a, score=s, **t) for (a, s), t in zip(table, job.trace, strict=True)]
    chosen = next(t for t in trace if t["alpha"] == best)
    model = at(best)
    return (model if composer is None else composer.merge()), {
        "alpha": best, "alpha_table": trace, "target_val": chosen["target_val"], "control_val": chosen["control_val"]}


def learn_negation(job: NegationJob, settings: NegationSettings, *, linearized: bool = False,
                   checkpoint: Path | None = None) -> tuple[Any, dict]:
    """aTLAS negation: block coefficients from 0 (the pre-trained model) trained with
    ``objectives.negation`` (``-CE(target) + CE(control)``, the target term bounded) on the fitting parts,
    every batch half target, half control; the epoch (the untrained state competes) chosen by the 95% rule
    on validation data. Returns ``(composer, detail)``."""
    from taskvec.compose import Composer
    from taskvec.experiment import history
    from taskvec.objectives import negation
    from taskvec.suites.multitask import suite_mixed_loader
    from taskvec.train import TrainConfig, fit

    composer = Composer(job.base, [job.vector()], "block", init=0.0, linearized=linearized)
    loader = suite_mixed_loader(job.suite, [job.target.fit, job.control.fit], settings.batch_size,
                                steps=-(-len(job.target.fit) // settings.batch_size),
                                augmentation=settings.augmentation)
    result = fit(composer, negation(job.target.head, job.control.head, bound=settings.bound),  # type: ignore[arg-type]
                 loader, TrainConfig(epochs=settings.epochs, lr=settings.lr, weight_decay=settings.weight_decay,
                                     warmup_fraction=0.0, seed=settings.seed, progress=settings.progress,
                                     checkpoint=checkpoint, resume=settings.resume,
                                     description=f"negate {job.target.name}{' (lin)' if linearized else ''}"),
                 evaluate=job.selection)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    epochs = [r.epoch for r in result.history]
    trace = job.trace[-len(epochs):]  # a resumed run has fewer traced evaluations than history entries
    chosen = {"target_val": None, "control_val": None}
    for epoch, t in zip(epochs[-len(trace):], trace, strict=True):
        if epoch == result.best_epoch:
            chosen = t
    coefficients = composer.coefficients.detach()
    return composer, {"best_epoch": result.best_epoch, "history": history(result), "val_trace": trace, **chosen,
                      "learned": coefficients.numel(), "mean_coefficient": float(coefficients.mean()),
                      "coefficient_range": [float(coefficients.min()), float(coefficients.max())]}
