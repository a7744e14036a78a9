"""Wiring the recipes share (library code, so no recipe imports another): bank access, loaders over
image splits, supervised coefficient learning.

Nothing here is new maths: it connects data -> bank -> composer -> objective -> fit -> evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from taskvec.bank import Bank
from taskvec.batching import image_loader, mixed_loader, split_validation  # noqa: F401 (image_loader re-exported)
from taskvec.compose import Composer
from taskvec.data import ImageSet
from taskvec.evaluate import accuracy, score, selection_metric
from taskvec.experiment import paired_summary
from taskvec.heads import LPPlusPlus, TipAdapter, fit_linear_head, tip_adapter_search
from taskvec.merging import DEFAULT_ALPHA_GRID, alpha_search, task_arithmetic, ties_merge
from taskvec.objectives import cross_entropy, multitask_cross_entropy
from taskvec.train import Loader, TrainConfig, TrainResult, fit
from taskvec.vectors import TaskVector

if TYPE_CHECKING:
    from taskvec.suites import Suite

DEFAULT_RESULTS = Path("runs")
# accuracy(model, head, split, resolution, **norm): every score a recipe computes goes through one, so a
# test can inject a spy (or a label scrambler) and prove which splits steer the choices. Over a suite
# (SuiteMultiTaskData, NegationJob) the call is evaluator(model, head, split), as suite.accuracy.
Evaluator = Callable[..., float]


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


def learn_supervised(
    composer: nn.Module,
    head: nn.Module,
    train: Any,
    val: Any | None,
    suite: Suite,
    schedule: CoefficientSchedule,
    *,
    description: str = "coefficients",
    checkpoint: Path | None = None,
) -> TrainResult:
    """Cross-entropy through a frozen head; model selection on ``val`` only (never on test data).
    ``suite`` batches and scores the splits (images or texts)."""
    loader = suite.loader(train, batch_size=schedule.batch_size, augmentation=schedule.augmentation,
                          min_steps=schedule.min_steps_per_epoch)
    evaluate = None if val is None or len(val) == 0 else (lambda m: suite.accuracy(m, head, val))
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


def ties_search(
    base: nn.Module,
    vectors: Sequence[TaskVector],
    score: Callable[[nn.Module], float],
    grid: Sequence[float],
    density: float = 0.2,
) -> tuple[float, nn.Module, list]:
    """TIES-merging (Yadav et al., 2023) of ``vectors`` at ``density``, its scale chosen by ``score``
    (validation data) over ``grid`` as task arithmetic's alpha is: ``(scale, merged model, table)``."""
    merged = ties_merge(vectors, density=density, alpha=1.0)
    best, table = alpha_search(lambda a: score(merged.apply_to(base, a)), grid)
    return best, merged.apply_to(base, best), table


def normalized_accuracy(test: Mapping[str, float], finetuned: Mapping[str, float]) -> dict[str, Any]:
    """Task addition's numbers: per-task test accuracy, normalised accuracy (absolute over the
    fine-tuned model's, the convention of aTLAS and Ilharco et al.) and both means over tasks."""
    missing = sorted(set(test) - set(finetuned))
    if missing or not test:
        raise ValueError(f"need a fine-tuned accuracy for every task of {sorted(test)}; missing {missing}")
    normalized = {t: test[t] / finetuned[t] for t in test}
    return {"test_acc": dict(test), "normalized": normalized, "avg_acc": sum(test.values()) / len(test),
            "avg_normalized": sum(normalized.values()) / len(normalized)}


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


def bank_identity(banks: Sequence[Bank], tasks: Sequence[str]) -> list:
    """What ties recorded results to bank contents (root and entries' vector norms), for a fingerprint:
    a rebuilt bank invalidates old records."""
    return [[str(bank.root), [bank.meta(t).get("vector_norm") for t in tasks if bank.has(t)]] for bank in banks]


def standard_and_linearized(
    suite: Any, linear_suite: Any | None, linearized: bool, tasks: Sequence[str], progress: bool = True
) -> list[Any]:
    """``[suite]``, plus its linearised twin (``linear_suite`` or ``suite.linearized()``) when ``linearized``
    methods are asked for; every bank is built for ``tasks`` first (cached, resumable)."""
    suites = [suite]
    if linearized:
        suites.append(linear_suite or suite.linearized())
        if not suites[1].bank.config.linearized:
            raise ValueError(f"linear suite's bank {suites[1].bank.root} was not built with linearized=True")
    for each in suites:
        each.bank.build(list(tasks), progress=progress)
    return suites


def banks_table(banks: Sequence[Bank]) -> dict[str, dict]:
    """For a report: each bank's root and entries (:meth:`Bank.table`), keyed ``standard`` / ``linearised``."""
    return {("linearised" if bank.config.linearized else "standard"): {"root": str(bank.root), "entries": bank.table()}
            for bank in banks}


class MultiTaskSettings(Protocol):
    """The settings multi-task coefficient learning reads (``AdditionConfig`` and ``MultiTaskSetup`` have them)."""

    select_per_task: int
    fit_per_task: int
    seed: int
    epochs: int
    lr: float
    weight_decay: float
    batch_per_task: int
    augmentation: str | None
    progress: bool
    resume: bool


@dataclass
class MultiTaskSetup:
    """Multi-task supervised coefficient learning as the addition recipe's aTLAS row does it: aTLAS's
    AdamW from ``init``, weight decay 0.1; aTLAS runs 20 epochs at 1e-3 (about 480 steps), with ~100
    steps the rate is 1e-2 instead. The ``help`` texts are the generated command line's."""

    select_per_task: int = field(default=64, metadata={
        "help": "validation samples per task held out for model selection"})
    fit_per_task: int = field(default=192, metadata={
        "help": "validation samples per task the coefficients are fitted on"})
    seed: int = field(default=0, metadata={"help": "validation split and training seed"})
    epochs: int = field(default=4, metadata={"help": "epochs of the learned coefficients"})
    lr: float = field(default=1e-2, metadata={"help": "coefficient learning rate (AdamW)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the coefficients"})
    batch_per_task: int = field(default=8, metadata={"help": "samples per task in every training step"})
    augmentation: str | None = field(default=None, metadata={
        "help": "augmentation of the fitting batches (weak, strong; none by default)"})
    init: float = field(default=0.0, metadata={"help": "initial coefficient value"})
    progress: bool = field(default=True, metadata={"help": "no progress bars"})
    resume: bool = field(default=True, metadata={"help": "recompute jobs already recorded under the same settings"})


def selection_and_fitting_parts(val: Mapping[str, Any], config: MultiTaskSettings) -> tuple[dict, dict]:
    """Per task, disjoint (selection, fitting) parts of its validation split (:func:`split_validation`)."""
    parts = {t: split_validation(v, config.select_per_task, config.fit_per_task, config.seed, t)
             for t, v in val.items()}
    return {t: p[0] for t, p in parts.items()}, {t: p[1] for t, p in parts.items()}


class MultiTaskData:
    """What every multi-task method needs: base, norm, heads, data parts, fine-tuned accuracies of one bank."""

    def __init__(
        self, bank: Bank, tasks: Sequence[str], config: MultiTaskSettings, evaluator: Evaluator = accuracy
    ) -> None:
        self.bank, self.evaluator = bank, evaluator
        self.tasks = list(tasks)
        self.base, self.norm, self.resolution = bank_and_norm(bank)
        self.heads = {t: bank.head(t).freeze() for t in tasks}
        self.meta = {t: bank.meta(t) for t in tasks}
        data = {t: bank.loader(t, seed=bank.config.seed) for t in tasks}
        self.test = {t: data[t].test for t in tasks}
        self.select, self.fit = selection_and_fitting_parts({t: data[t].val for t in tasks}, config)
        self.finetuned = {t: float(self.meta[t]["finetuned_test_acc"]) for t in tasks}

    def selection_scores(self, model: nn.Module) -> dict[str, float]:
        """Accuracy on each task's selection part (validation data)."""
        return {t: self.evaluator(model, self.heads[t], self.select[t], self.resolution, **self.norm)
                for t in self.tasks}

    def selection_score(self, model: nn.Module) -> float:
        scores = self.selection_scores(model)
        return sum(scores.values()) / len(scores)

    def test_scores(self, model: nn.Module) -> dict[str, float]:
        """Accuracy on each task's test split: the report, never a choice."""
        return {t: self.evaluator(model, self.heads[t], self.test[t], self.resolution, **self.norm)
                for t in self.tasks}

    def vectors(self):
        return self.bank.vectors(self.tasks)

    def mixed(self, parts: Sequence[ImageSet], batch_sizes: int | Sequence[int], *, steps: int | None = None,
              augmentation: str | None = None, labels: bool = True) -> Loader:
        """Multi-task batches ``[(x, y), ...]`` over ``parts`` (a suite's subclass batches its own inputs)."""
        return mixed_loader(parts, batch_sizes, self.resolution, self.norm, steps=steps, augmentation=augmentation,
                            labels=labels)


def train_multitask(
    composer: nn.Module, ctx: MultiTaskData, config: MultiTaskSettings, label: str, checkpoint: Path
) -> TrainResult:
    """Sum of per-task cross-entropies, every batch mixing all tasks; epoch chosen on the selection parts."""
    loader = ctx.mixed([ctx.fit[t] for t in ctx.tasks], config.batch_per_task, augmentation=config.augmentation)
    trained = fit(
        composer,
        multitask_cross_entropy({t: ctx.heads[t] for t in ctx.tasks}),
        loader,
        TrainConfig(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, warmup_fraction=0.0,
                    seed=config.seed, progress=config.progress, description=label, checkpoint=checkpoint,
                    resume=config.resume),
        evaluate=ctx.selection_score,
    )
    checkpoint.unlink(missing_ok=True)
    return trained


def per_vector_means(composer: Composer) -> dict[str, float]:
    """Each vector's mean coefficient (over blocks): what a report says about a learned composition."""
    return dict(zip(composer.vector_names, composer.coefficients.detach().mean(1).tolist(), strict=True))


def adamerge_tasks(
    ctx: MultiTaskData, settings: Any, batch_per_task: int, checkpoint: Path, resume: bool = True
) -> Composer:
    """AdaMerging (:mod:`taskvec.adamerging`, ``settings`` an ``AdaMergingConfig``) of ``ctx``'s vectors on
    the unlabelled *test inputs* of every task, as its authors do: the loader drops the labels, so the
    coefficients never see one. Returns the composer with its (clamped) coefficients."""
    from taskvec.adamerging import adamerge

    loader = ctx.mixed([ctx.test[t] for t in ctx.tasks], batch_per_task, steps=settings.steps, labels=False)
    composer, _ = adamerge(ctx.base, ctx.vectors(), [ctx.heads[t] for t in ctx.tasks], loader, settings,
                           checkpoint=checkpoint, resume=resume)
    checkpoint.unlink(missing_ok=True)
    return composer


def train_through_backbone(
    model: nn.Module, head: nn.Module, train: Any, val: Any | None, suite: Suite,
    schedule: CoefficientSchedule, seed: int, lr: float, label: str, progress: bool = True,
) -> tuple[float | None, dict]:
    """Cross-entropy through the frozen head on the (augmented) training shots, in eval mode (BatchNorm
    statistics frozen, dropout off); the untrained start and every epoch compete on
    :func:`selection_metric`. ``suite`` batches and scores the splits."""
    loader = suite.loader(train, batch_size=schedule.batch_size, augmentation=schedule.augmentation,
                          min_steps=schedule.min_steps_per_epoch)

    def evaluate(m: nn.Module) -> float:
        return selection_metric(suite.logits(m, head, val), val)

    result = fit(
        model,
        cross_entropy(head),
        loader,
        TrainConfig(epochs=schedule.epochs, lr=lr, weight_decay=schedule.weight_decay, warmup_fraction=0.0,
                    seed=seed, train_mode=False, progress=progress, description=label),
        evaluate=None if val is None else evaluate,
    )
    selection = None if val is None else score(suite.logits(model, head, val), val)
    losses = [round(record.loss, 5) for record in result.history if record.epoch > 0]
    return selection, {"best_epoch": result.best_epoch, "train_losses": losses}


def learn_atlas(
    base: nn.Module, vectors: Sequence, head: nn.Module, train: Any, val: Any | None, suite: Suite,
    schedule: CoefficientSchedule, seed: int, label: str = "aTLAS", progress: bool = True,
) -> tuple[nn.Module, float | None, dict]:
    """aTLAS block coefficients from 0 (the pre-trained model) at the schedule's lr (0.1)."""
    composer = Composer(base, vectors, "block", init=0.0)
    selection, detail = train_through_backbone(composer, head, train, val, suite, schedule, seed,
                                               schedule.lr, label, progress)
    coefficients = composer.coefficients.detach()
    detail["learned"] = int(coefficients.numel())
    detail["mean_coefficient_per_vector"] = dict(
        zip(composer.vector_names, coefficients.mean(1).tolist(), strict=True))
    detail["max_abs_coefficient"] = float(coefficients.abs().max())
    return composer.merge(), selection, detail


# ----------------------------------------------------------------------------------------------
# Few-shot heads on features extracted once (any suite)
# ----------------------------------------------------------------------------------------------


def suite_scoring_head(suite: Suite, target: str, head_from: str) -> tuple[str, nn.Module]:
    """:func:`scoring_head` over any suite: ``(task, frozen head)`` scoring ``target``; a borrowed head
    must have the target's classes, in the same order."""
    head_task = resolve_head(target, head_from)
    if head_task != target:
        donor, own = suite.splits(head_task).classes, suite.splits(target).classes
        if list(donor) != list(own):
            raise ValueError(f"head_from={head_task!r} has classes {list(donor)}, but {target!r} has {list(own)}")
    return head_task, suite.head(head_task)


@dataclass
class ShotFeatures:
    """One backbone's features of the training shots and the selection shots, extracted once and
    shared by every head fitted on them (probe, Tip-Adapter, LP++)."""

    train: torch.Tensor
    val: torch.Tensor | None

    @classmethod
    def extract(cls, suite: Suite, model: nn.Module, train: Any, val: Any | None) -> ShotFeatures:
        return cls(suite.features(model, train), None if val is None else suite.features(model, val))


# (fitted head, accuracy on the selection shots or None at k = 1, what was chosen)
FittedHead = tuple[nn.Module, float | None, dict]


def fit_probe_on_shots(
    feats: ShotFeatures, train: Any, val: Any | None, classes: int, decays: Sequence[float], default_decay: float
) -> FittedHead:
    """Linear probe on the training shots; weight decay chosen on the selection shots by
    :func:`selection_metric` (the first best wins); ``default_decay`` when there is no selection split."""
    if val is None or feats.val is None:
        head = fit_linear_head(feats.train, train.labels, classes, weight_decay=default_decay)
        return head, None, {"weight_decay": default_decay}
    best = None
    for decay in decays:
        head = fit_linear_head(feats.train, train.labels, classes, weight_decay=decay)
        metric = selection_metric(head(feats.val), val)
        if best is None or metric > best[1]:
            best = (head, metric, decay)
    if best is None:
        raise ValueError("fit_probe_on_shots: no weight decay to choose from")
    return best[0], score(best[0](feats.val), val), {"weight_decay": best[2]}


def fit_tip_on_shots(feats: ShotFeatures, train: Any, val: Any | None, head: nn.Module) -> FittedHead:
    """Tip-Adapter caching the training shots on ``head``; (alpha, beta) searched on the selection
    shots, the defaults at k = 1."""
    if val is None or feats.val is None:
        with torch.no_grad():
            classes = int(head(feats.train[:1]).shape[-1])
        adapter = TipAdapter(feats.train, train.labels, head, num_classes=classes)
        return adapter, None, {"alpha": adapter.alpha, "beta": adapter.beta}
    adapter, _ = tip_adapter_search(feats.train, train.labels, head, feats.val, val.labels)
    return adapter, score(adapter(feats.val), val), {"alpha": adapter.alpha, "beta": adapter.beta}


def fit_lpp_on_shots(feats: ShotFeatures, train: Any, val: Any | None, head: nn.Module, iterations: int) -> FittedHead:
    """LP++ on the training shots, blended with ``head`` (nothing to select: its step sizes come from
    Lipschitz bounds); the selection shots are only scored."""
    with torch.enable_grad():
        model = LPPlusPlus.fit(feats.train, train.labels, head, iterations=iterations)
    metric = None if val is None or feats.val is None else score(model(feats.val), val)
    return model, metric, {"final_loss": model.train_losses[-1]}


class FewShotTarget:
    """A target held out of the suite's bank: its splits, the head that scores it
    (:func:`suite_scoring_head`), the other tasks' vectors and its pre-trained test features, each made
    on first use (a resumed run loads nothing it does not need)."""

    def __init__(self, suite: Suite, base: nn.Module, name: str, tasks: Sequence[str], head_from: str = "own") -> None:
        self.suite, self.base, self.name, self.tasks = suite, base, name, tuple(tasks)
        self.splits = suite.splits(name)
        self.head_task, self.head = suite_scoring_head(suite, name, head_from)

    @cached_property
    def vectors(self) -> list[TaskVector]:
        return self.suite.vectors([t for t in self.tasks if t != self.name])

    @cached_property
    def test_pretrained(self) -> torch.Tensor:
        return self.suite.features(self.base, self.splits.test)


class FewShotJob:
    """One (target, k, seed): k shots per class from ``suite.few_shot_pool`` cut by :func:`few_shot_split`,
    and what several methods share (shot features of a backbone, the aTLAS-merged model and its test
    features), each made once; ``costs`` holds the seconds each took."""

    def __init__(self, target: FewShotTarget, k: int, seed: int, schedule: CoefficientSchedule) -> None:
        self.target, self.suite, self.base, self.head = target, target.suite, target.base, target.head
        self.k, self.seed, self.schedule = k, seed, schedule
        self.train, self.val = few_shot_split(self.suite.few_shot_pool(target.splits), k, seed)
        self.costs: dict[str, float] = {}
        self._made: dict[str, Any] = {}

    def shared(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._made:
            tic = time.perf_counter()
            self._made[name] = make()
            self.costs[name] = time.perf_counter() - tic
        return self._made[name]

    def features(self, name: str, model: Callable[[], nn.Module]) -> ShotFeatures:
        """Shot features of ``model()``, extracted once under ``name``."""
        return self.shared(name, lambda: ShotFeatures.extract(self.suite, model(), self.train, self.val))

    def atlas(self, label: str = "aTLAS") -> tuple[nn.Module, float | None, dict]:
        """:func:`learn_atlas` on the shots (merged model, selection accuracy, detail), learned once."""
        return self.shared("atlas", lambda: learn_atlas(self.base, self.target.vectors, self.head, self.train,
                                                        self.val, self.suite, self.schedule, self.seed, label=label,
                                                        progress=self.schedule.progress))

    def atlas_test(self) -> torch.Tensor:
        return self.shared("atlas_test", lambda: self.suite.features(self.atlas()[0], self.target.splits.test))


def atlas_transfer(
    suite: Suite, base: nn.Module, source: str, target: str, shots: Sequence[int], seeds: Sequence[int],
    schedule: CoefficientSchedule, evaluator: Callable[[torch.Tensor, Any], dict],
) -> list[dict]:
    """Out of distribution: aTLAS learned on ``source`` shots, tested in domain and on ``target`` (the same
    classes in another style, scored by ``source``'s head), neither task's vector in the bank. One record
    per (k, seed) with pre-trained and aTLAS accuracies in and out of domain."""
    sources = [t for t in suite.tasks if t not in (source, target)]
    origin, other = FewShotTarget(suite, base, source, sources), suite.splits(target)
    if list(origin.splits.classes) != list(other.classes):
        raise ValueError(f"OOD pair {source} -> {target}: the class lists differ, so one head cannot serve both")
    if not sources:
        raise ValueError(f"OOD: no task vector left once {source} and {target} are excluded from {list(suite.tasks)}")

    def scores(test_source: torch.Tensor, model: nn.Module) -> dict:
        with torch.no_grad():
            return {"in_domain": evaluator(origin.head(test_source), origin.splits.test)["acc"],
                    "ood": evaluator(origin.head(suite.features(model, other.test)), other.test)["acc"]}

    pre, records = scores(origin.test_pretrained, base), []
    for k in shots:
        for seed in seeds:
            job = FewShotJob(origin, k, seed, schedule)
            merged, selection, detail = job.atlas("aTLAS (OOD)")
            atlas = scores(job.atlas_test(), merged)
            records.append({"source": source, "target": target, "k": k, "seed": seed, "sources": sources,
                            **{f"pretrained_{n}": v for n, v in pre.items()},
                            **{f"atlas_{n}": v for n, v in atlas.items()},
                            "selection_acc": selection, "seconds": job.costs["atlas"], "detail": detail})
    return records


TRANSFER_COLUMNS = {"pretrained_in_domain": "pre-trained (ID)", "atlas_in_domain": "aTLAS (ID)",
                    "pretrained_ood": "pre-trained (OOD)", "atlas_ood": "aTLAS (OOD)"}
TRANSFER_CHANGES = {"ood_change_vs_pretrained": ("atlas_ood", "pretrained_ood", "Δ OOD vs pre-trained"),
                    "ood_minus_in_domain": ("atlas_ood", "atlas_in_domain", "aTLAS OOD − ID"),
                    "in_domain_change_vs_pretrained": ("atlas_in_domain", "pretrained_in_domain", None)}


def transfer_summary(records: Sequence[dict]) -> tuple[list[dict], str]:
    """Per k, mean +- s.e. over seeds of :func:`atlas_transfer`'s accuracies and of their paired changes
    (aTLAS OOD - pre-trained OOD, aTLAS OOD - aTLAS in domain): (rows, markdown table)."""
    return paired_summary(records, by="k", columns=TRANSFER_COLUMNS, changes=TRANSFER_CHANGES)


def coefficient_summary(composer: Composer) -> dict:
    """What a report keeps of learned coefficients: the mean per vector and the largest magnitude."""
    coefficients = composer.coefficients.detach()
    return {"mean_coefficient_per_vector": dict(zip(composer.vector_names, coefficients.mean(1).tolist(), strict=True)),
            "max_abs_coefficient": float(coefficients.abs().max())}
