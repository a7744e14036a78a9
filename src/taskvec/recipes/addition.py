"""Task addition (aTLAS section 4.1) as a recipe: merge the whole bank into one backbone.

Every task is then evaluated on its test split with its own frozen head. Methods (keys for
``--methods``):

- ``pretrained``: the pre-trained backbone (its test accuracies are the bank's ``head_test_acc``).
- ``task_arithmetic``: ``theta_0 + alpha * sum_i tau_i``, alpha chosen on validation data.
- ``ties``: TIES-merging (density 0.2), its scale chosen on validation data the same way.
- ``adamerging``: layer-wise AdaMerging (Yang et al., 2024). Their "layer-wise" coefficients are per
  parameter tensor, i.e. the composer's ``block`` granularity. As its authors do, it minimises the
  prediction entropy on the unlabelled *test inputs* (each task through its own head), from 0.3, with
  Adam at a constant rate of 1e-3, coefficients clamped to [0, 1] and the last step kept. It never
  sees a label; with fewer steps than their 500 (CPU budget), it moves less far from 0.3.
- ``isotropic``: one learned coefficient per task vector (multi-task cross-entropy, as aTLAS).
- ``atlas``: aTLAS, one coefficient per parameter block per vector, trained with the sum of per-task
  cross-entropies, each task through its own head, every batch mixing all tasks.
- ``atlas_lin``: aTLAS over the linearised bank (vectors fine-tuned in tangent space), composed with
  ``Composer(..., linearized=True)``.

Data: each task's *validation* split is cut (seeded) into two disjoint parts, a fitting part the
supervised coefficients are trained on and a selection part on which every choice is made (the
alpha of task arithmetic and TIES, the epoch of the learned methods: mean accuracy over tasks).
Test labels are read only for the final report. Normalised accuracy is absolute accuracy over the
fine-tuned accuracy of the bank the method composes (``bank.meta(task)["finetuned_test_acc"]``): the
standard bank for every row but ``atlas_lin``, whose denominator is the linearised bank's fine-tuned
accuracy (the convention of aTLAS and Ortiz-Jimenez et al.); the JSON also holds it over the standard
fine-tuned accuracy.

The helpers at the top (validation split, mixed-task loader, constant-rate Adam, bar plot, resumable
records) are shared with :mod:`taskvec.recipes.negation`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from taskvec.bank import DEFAULT_TASKS, Bank, BankConfig
from taskvec.compose import Composer
from taskvec.data import ImageSet, augment, to_input
from taskvec.evaluate import accuracy
from taskvec.io import CheckpointError, atomic_write_text, write_json
from taskvec.merging import alpha_search, ties_merge
from taskvec.objectives import multitask_cross_entropy, softmax_entropy
from taskvec.recipes.common import DEFAULT_RESULTS, bank_and_norm, task_arithmetic_search
from taskvec.report import _save_figure, markdown_table, plot_coefficients, write_results
from taskvec.train import Batch, Loader, LossFn, TrainConfig, TrainResult, fit

METHODS: dict[str, str] = {
    "pretrained": "pre-trained",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES-merging",
    "adamerging": "AdaMerging (layer-wise)",
    "isotropic": "learned isotropic",
    "atlas": "aTLAS (block)",
    "atlas_lin": "aTLAS (block, linearised)",
}
LINEARISED = ("atlas_lin",)


# ----------------------------------------------------------------------------------------------
# Shared helpers (also used by the negation recipe)
# ----------------------------------------------------------------------------------------------


def split_validation(val: ImageSet, select: int, fit_size: int, seed: int, name: str = "") -> tuple[ImageSet, ImageSet]:
    """Disjoint (selection, fitting) parts of a validation split, drawn by a seeded permutation.

    Holding the selection part out of coefficient training keeps model selection honest without
    touching test data. ``name`` varies the permutation between tasks. A split too small for both
    parts gives the fitting part what is left.
    """
    if select < 1 or fit_size < 1:
        raise ValueError(f"selection and fitting parts need >= 1 image each; got {select} and {fit_size}")
    if len(val) < select + 1:
        raise ValueError(f"validation split of {name or 'a task'} has {len(val)} images; "
                         f"cannot hold out {select} for selection and still fit on any")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    order = torch.randperm(len(val), generator=generator)
    return val.subset(order[:select]), val.subset(order[select : select + fit_size])


def mixed_loader(
    parts: Sequence[ImageSet],
    batch_sizes: int | Sequence[int],
    resolution: int,
    norm: dict,
    *,
    steps: int | None = None,
    augmentation: str | None = None,
    labels: bool = True,
) -> Loader:
    """Every batch holds ``batch_sizes[i]`` images of every part ``i``: a list ``[(x, y), ...]`` (or
    ``[x, ...]`` with ``labels=False``, for unsupervised objectives that must not see labels).

    Each epoch draws a fresh permutation per part; by default an epoch is one pass over the part with
    the fewest batches (aTLAS's primary iterator); larger parts are cut short, smaller ones wrap.
    """
    sizes = [batch_sizes] * len(parts) if isinstance(batch_sizes, int) else list(batch_sizes)
    if len(sizes) != len(parts) or min(sizes, default=0) < 1:
        raise ValueError(f"need one batch size >= 1 per part; got {sizes} for {len(parts)} parts")
    if any(len(part) == 0 for part in parts):
        raise ValueError("mixed_loader: a part is empty")
    if steps is None:
        steps = min(math.ceil(len(part) / size) for part, size in zip(parts, sizes, strict=True))

    def make(generator: torch.Generator) -> Iterator[list]:
        orders = [torch.randperm(len(part), generator=generator) for part in parts]
        for step in range(steps):
            batch = []
            for part, size, order in zip(parts, sizes, orders, strict=True):
                idx = order[torch.arange(step * size, (step + 1) * size) % len(part)]
                x = to_input(part.images[idx], resolution, **norm)
                if augmentation:
                    x = augment(x, generator, augmentation, **norm)
                batch.append((x, part.labels[idx]) if labels else x)
            yield batch

    return Loader(make, steps)


class ConstantRateAdam(torch.optim.Adam):
    """Adam at a fixed rate: ``fit`` always installs a warm-up/cosine schedule, but AdaMerging uses a
    constant rate, so the rate is reset before every update."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.rate = lr

    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            group["lr"] = self.rate
        return super().step(closure)


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
    unlabelled inputs, each through its own frozen head. Batches: ``[x_task0, x_task1, ...]``."""
    for head in heads:
        head.requires_grad_(False)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        if not isinstance(batch, Sequence) or len(batch) != len(heads) or not all(isinstance(x, Tensor) for x in batch):
            raise TypeError(f"multitask_entropy: expected a list of {len(heads)} input tensors, one per task")
        features = model(torch.cat(list(batch))).split([len(x) for x in batch])
        terms = [softmax_entropy(head(f)).mean() for head, f in zip(heads, features, strict=True)]
        return torch.stack(terms).sum()

    return loss_fn


def plot_bars(
    values: Mapping[str, float], path: Path | str, *, ylabel: str, title: str,
    points: Mapping[str, Mapping[str, float]] | None = None, reference: float | None = None,
) -> Path:
    """One bar per method (``values``), with optional per-task points on top and a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    figure, axis = plt.subplots(figsize=(1.2 + 1.1 * len(names), 4.2))
    axis.bar(range(len(names)), [values[n] for n in names], color="#4c72b0", alpha=0.85)
    if points:
        tasks = sorted({t for per in points.values() for t in per})
        markers = "os^vD<>p*h"
        for j, task in enumerate(tasks):
            xs = [i for i, n in enumerate(names) if task in points.get(n, {})]
            ys = [points[names[i]][task] for i in xs]
            axis.scatter(xs, ys, s=18, marker=markers[j % len(markers)], zorder=3, label=task)
        axis.legend(fontsize=7, ncol=2, loc="lower right")
    if reference is not None:
        axis.axhline(reference, color="grey", lw=0.8, ls="--")
    for i, n in enumerate(names):
        axis.text(i, values[n], f"{values[n]:.3f}", ha="center", va="bottom", fontsize=7)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    try:
        return _save_figure(figure, Path(path))
    finally:
        plt.close(figure)


class Records:
    """Finished results of a recipe, kept in ``path`` under a fingerprint of the settings, so an
    interrupted run resumes where it stopped and a run with other settings starts afresh."""

    def __init__(self, path: Path, fingerprint: str, resume: bool) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.rows: dict[str, dict] = {}
        if resume and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except ValueError:
                saved = None
            if not (isinstance(saved, dict) and isinstance(saved.get("rows", {}), dict)):
                raise CheckpointError(f"{path}: unreadable results records; delete it or rerun with --no-resume "
                                      "to start over")
            if saved.get("fingerprint") == fingerprint:
                self.rows = saved.get("rows", {})

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = row
        atomic_write_text(self.path, json.dumps({"fingerprint": self.fingerprint, "rows": self.rows}, indent=1))


def fingerprint(settings: dict, banks: Sequence[Bank], tasks: Sequence[str]) -> str:
    """Settings plus the identity of every bank entry used: a rebuilt bank invalidates old records."""
    identity = [
        [str(bank.root), [bank.meta(t).get("vector_norm") for t in tasks if bank.has(t)]] for bank in banks
    ]
    blob = json.dumps({"settings": settings, "banks": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def history(result: TrainResult) -> list[dict]:
    return [{"epoch": r.epoch, "loss": None if r.loss != r.loss else r.loss, "selection": r.metric}
            for r in result.history]


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


@dataclass
class AdditionConfig:
    """Settings; the defaults are sized for a 2-core CPU (about 10 minutes when the machine is free)."""

    methods: tuple[str, ...] = tuple(METHODS)
    seed: int = 0
    select_per_task: int = 64  # validation images per task held out for model selection
    fit_per_task: int = 192  # validation images per task the coefficients are trained on
    alpha_grid: tuple[float, ...] = tuple(round(0.1 * i, 2) for i in range(11))
    ties_grid: tuple[float, ...] = tuple(round(0.2 * i, 2) for i in range(11))
    ties_density: float = 0.2
    # Learned coefficients (isotropic, aTLAS, linearised aTLAS): aTLAS's AdamW, init 0, weight decay
    # 0.1; aTLAS runs 20 epochs at 1e-3 (about 480 steps); with ~100 steps the rate is 1e-2 instead.
    epochs: int = 4
    lr: float = 1e-2
    weight_decay: float = 0.1
    batch_per_task: int = 8
    augmentation: str | None = None
    init: float = 0.0
    # AdaMerging (authors' defaults but the number of steps and the batch: 500 steps of 2 x 16 per task).
    adamerging_steps: int = 150
    adamerging_lr: float = 1e-3
    adamerging_init: float = 0.3
    adamerging_batch_per_task: int = 8
    adamerging_clamp: tuple[float, float] | None = (0.0, 1.0)
    bank: BankConfig = field(default_factory=BankConfig)
    out: Path = DEFAULT_RESULTS / "addition"
    resume: bool = True
    progress: bool = True


class AdditionContext:
    """What every method needs: base, norm, heads, data parts, fine-tuned accuracies of one bank."""

    def __init__(self, bank: Bank, tasks: Sequence[str], config: AdditionConfig) -> None:
        self.bank = bank
        self.tasks = list(tasks)
        self.base, self.norm, self.resolution = bank_and_norm(bank)
        self.heads = {t: bank.head(t).freeze() for t in tasks}
        self.meta = {t: bank.meta(t) for t in tasks}
        data = {t: bank.loader(t, seed=bank.config.seed) for t in tasks}
        self.test = {t: data[t].test for t in tasks}
        parts = {t: split_validation(data[t].val, config.select_per_task, config.fit_per_task, config.seed, t)
                 for t in tasks}
        self.select = {t: parts[t][0] for t in tasks}
        self.fit = {t: parts[t][1] for t in tasks}
        self.finetuned = {t: float(self.meta[t]["finetuned_test_acc"]) for t in tasks}

    def selection_scores(self, model: nn.Module) -> dict[str, float]:
        """Accuracy on each task's selection part (validation data)."""
        return {t: accuracy(model, self.heads[t], self.select[t], self.resolution, **self.norm) for t in self.tasks}

    def selection_score(self, model: nn.Module) -> float:
        scores = self.selection_scores(model)
        return sum(scores.values()) / len(scores)

    def test_scores(self, model: nn.Module) -> dict[str, float]:
        """Accuracy on each task's test split: the report, never a choice."""
        return {t: accuracy(model, self.heads[t], self.test[t], self.resolution, **self.norm) for t in self.tasks}

    def vectors(self):
        return self.bank.vectors(self.tasks)


def _train(
    composer: nn.Module, ctx: AdditionContext, config: AdditionConfig, label: str, checkpoint: Path
) -> TrainResult:
    loader = mixed_loader([ctx.fit[t] for t in ctx.tasks], config.batch_per_task, ctx.resolution, ctx.norm,
                          augmentation=config.augmentation)
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


def _adamerging(ctx: AdditionContext, config: AdditionConfig, checkpoint: Path) -> tuple[Composer, dict]:
    composer = Composer(ctx.base, ctx.vectors(), "block", init=config.adamerging_init)
    model: nn.Module = composer
    if config.adamerging_clamp is not None:
        model = ClampedComposer(composer, *config.adamerging_clamp)
    # Unlabelled test inputs, as AdaMerging does: the loader drops the labels.
    loader = mixed_loader([ctx.test[t] for t in ctx.tasks], config.adamerging_batch_per_task, ctx.resolution,
                          ctx.norm, steps=config.adamerging_steps, labels=False)
    fit(
        model,
        multitask_entropy([ctx.heads[t] for t in ctx.tasks]),
        loader,
        TrainConfig(epochs=1, lr=config.adamerging_lr, weight_decay=0.0, warmup_fraction=0.0, max_grad_norm=None,
                    seed=config.seed, progress=config.progress, description="AdaMerging", checkpoint=checkpoint,
                    resume=config.resume),
        optimizer_factory=lambda params: ConstantRateAdam(params, config.adamerging_lr),
    )
    checkpoint.unlink(missing_ok=True)
    if isinstance(model, ClampedComposer):
        model.settle()
    coefficients = composer.coefficients.detach()
    return composer, {"steps": config.adamerging_steps, "mean_coefficient_per_vector":
                      dict(zip(composer.vector_names, coefficients.mean(1).tolist(), strict=True)),
                      "coefficient_range": [float(coefficients.min()), float(coefficients.max())]}


def _row(method: str, ctx: AdditionContext, test: dict[str, float], selection: float, seconds: float, **extra) -> dict:
    normalized = {t: test[t] / ctx.finetuned[t] for t in ctx.tasks}
    row = {
        "key": method,
        "method": METHODS[method],
        "selection_acc": selection,
        "test_acc": test,
        "normalized": normalized,
        "avg_acc": sum(test.values()) / len(test),
        "avg_normalized": sum(normalized.values()) / len(normalized),
        "finetuned_reference": "linearised bank" if method in LINEARISED else "standard bank",
        "seconds": seconds,
    }
    row.update(extra)
    return row


def _check(config: AdditionConfig, tasks: Sequence[str]) -> None:
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise ValueError(f"methods {unknown or '[]'}: choose a non-empty subset of {list(METHODS)}")
    if len(tasks) < 2:
        raise ValueError(f"task addition merges at least two tasks; got {list(tasks)}")
    if config.epochs < 1 or config.adamerging_steps < 1:
        raise ValueError("epochs and adamerging_steps must be >= 1")


def run_addition(
    config: AdditionConfig | None = None,
    *,
    bank: Bank | None = None,
    linear_bank: Bank | None = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
) -> dict:
    """Merge the bank by every method; returns the payload written to ``<out>/addition.json``.

    ``bank`` defaults to the standard bank, ``linear_bank`` to the linearised bank of the same
    settings (built if missing, when ``atlas_lin`` is asked for).
    """
    config = config or AdditionConfig()
    tasks = tuple(tasks)
    _check(config, tasks)
    started = time.perf_counter()
    bank = bank or Bank(config.bank)
    bank.build(tasks, progress=config.progress)
    banks = [bank]
    if any(m in LINEARISED for m in config.methods):
        linear_bank = linear_bank or Bank(replace(bank.config, linearized=True), loader=bank.loader)
        if not linear_bank.config.linearized:
            raise ValueError(f"linear_bank {linear_bank.root} was not built with linearized=True")
        linear_bank.build(tasks, progress=config.progress)
        banks.append(linear_bank)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(config).items() if k not in ("methods", "out", "resume", "progress")}
    records = Records(out / "addition_records.json", fingerprint({**settings, "tasks": tasks}, banks, tasks),
                      config.resume)
    ctx = AdditionContext(bank, tasks, config)
    lin_ctx = AdditionContext(linear_bank, tasks, config) if len(banks) > 1 else None
    composers: dict[str, Composer] = {}

    bar = tqdm(config.methods, desc="task addition", disable=not config.progress)
    for method in bar:
        bar.set_postfix(method=method)
        row = records.get(method)
        coefficient_file = out / f"addition_{method}_coefficients.safetensors"
        if row is not None:
            if method in ("atlas", "atlas_lin", "adamerging", "isotropic") and coefficient_file.is_file():
                use = lin_ctx if method in LINEARISED else ctx
                assert use is not None
                granularity = "isotropic" if method == "isotropic" else "block"
                composer = Composer(use.base, use.vectors(), granularity, linearized=method in LINEARISED)
                composer.load_coefficients(coefficient_file)
                composers[method] = composer
            continue
        tic = time.perf_counter()
        extra: dict = {}
        if method == "pretrained":
            test = {t: float(ctx.meta[t]["head_test_acc"]) for t in tasks}  # base + head on test, from the bank
            selection = ctx.selection_score(ctx.base)
            row = _row(method, ctx, test, selection, time.perf_counter() - tic, learned=0)
        elif method == "task_arithmetic":
            alpha, merged, table = task_arithmetic_search(ctx.base, ctx.vectors(), ctx.selection_score,
                                                          config.alpha_grid)
            selected = time.perf_counter() - tic
            row = _row(method, ctx, ctx.test_scores(merged), dict(table)[alpha], time.perf_counter() - tic,
                       learned=1, alpha=alpha, alpha_table=table, select_seconds=selected)
        elif method == "ties":
            merged_vector = ties_merge(ctx.vectors(), density=config.ties_density, alpha=1.0)
            scale, table = alpha_search(
                lambda a, v=merged_vector: ctx.selection_score(v.apply_to(ctx.base, a)), config.ties_grid)
            selected = time.perf_counter() - tic
            merged = merged_vector.apply_to(ctx.base, scale)
            row = _row(method, ctx, ctx.test_scores(merged), dict(table)[scale], time.perf_counter() - tic,
                       learned=1, scale=scale, density=config.ties_density, alpha_table=table,
                       select_seconds=selected)
        elif method == "adamerging":
            composer, extra = _adamerging(ctx, config, out / "addition_adamerging.ckpt")
            composers[method] = composer
            merged = composer.merge()
            selected = time.perf_counter() - tic
            row = _row(method, ctx, ctx.test_scores(merged), ctx.selection_score(merged), time.perf_counter() - tic,
                       learned=composer.coefficients.numel(), train_seconds=selected, **extra)
        else:  # isotropic, atlas, atlas_lin
            use = lin_ctx if method in LINEARISED else ctx
            assert use is not None
            granularity = "isotropic" if method == "isotropic" else "block"
            composer = Composer(use.base, use.vectors(), granularity, init=config.init,
                                linearized=method in LINEARISED)
            result = _train(composer, use, config, METHODS[method], out / f"addition_{method}.ckpt")
            composers[method] = composer
            selected = time.perf_counter() - tic
            merged = composer.merge()
            test = use.test_scores(merged)
            extra = {"learned": composer.coefficients.numel(), "best_epoch": result.best_epoch,
                     "history": history(result), "train_seconds": selected}
            if method in LINEARISED:
                extra["normalized_by_standard_finetuned"] = {t: test[t] / ctx.finetuned[t] for t in tasks}
            coefficients = composer.coefficients.detach()
            extra["mean_coefficient_per_vector"] = dict(zip(composer.vector_names, coefficients.mean(1).tolist(),
                                                            strict=True))
            row = _row(method, use, test, float(result.best_metric), time.perf_counter() - tic, **extra)
        if method in composers:
            composers[method].save_coefficients(coefficient_file, extra={"recipe": "addition", "method": method})
        records.put(method, row)

    rows = [records.rows[m] for m in config.methods]
    return _report(rows, ctx, lin_ctx, composers, config, tasks, banks, out, started)


def _report(rows, ctx, lin_ctx, composers, config, tasks, banks, out: Path, started: float) -> dict:
    short = {t: t[:12] for t in tasks}
    absolute = [{"method": r["method"], **{short[t]: r["test_acc"][t] for t in tasks}, "avg": r["avg_acc"],
                 "selection (val)": r["selection_acc"], "seconds": r["seconds"]} for r in rows]
    normalized = [{"method": r["method"], **{short[t]: r["normalized"][t] for t in tasks}, "avg": r["avg_normalized"]}
                  for r in rows]
    choices = []
    for r in rows:
        if "alpha" in r:
            choices.append(f"task arithmetic alpha = {r['alpha']:g}")
        if "scale" in r:
            choices.append(f"TIES scale = {r['scale']:g} (density {r['density']:g})")
        if "best_epoch" in r:
            choices.append(f"{r['method']}: epoch {r['best_epoch']} of {config.epochs}")
    some = next(iter(ctx.select.values()))
    header = (
        f"Task addition over {len(tasks)} tasks ({', '.join(tasks)}) on {ctx.bank.config.backbone} @ "
        f"{ctx.resolution}px; selection on {len(some)} held-out validation images per task, coefficients fitted "
        f"on up to {config.fit_per_task} other validation images per task; test splits for the report only."
    )
    table = "\n\n".join([
        header,
        "**Absolute test accuracy**\n\n" + markdown_table(absolute),
        "**Normalised test accuracy** (absolute / fine-tuned; the linearised row over the linearised bank's "
        "fine-tuned accuracy)\n\n" + markdown_table(normalized),
        "Choices made on validation data: " + "; ".join(choices) + ".",
    ])
    files: dict[str, str] = {}
    bars = plot_bars({r["method"]: r["avg_normalized"] for r in rows}, out / "addition_normalized.png",
                     ylabel="normalised accuracy (avg over tasks)", title="Task addition",
                     points={r["method"]: r["normalized"] for r in rows}, reference=1.0)
    files["bars"] = str(bars)
    for method in ("atlas", "atlas_lin"):
        if method in composers:
            c = composers[method]
            path = plot_coefficients(c.block_coefficients(), c.block_names, c.vector_names,
                                     out / f"addition_{method}_coefficients.png",
                                     title=f"{METHODS[method]} coefficients, task addition")
            files[f"heatmap_{method}"] = str(path)
            files[f"coefficients_{method}"] = str(out / f"addition_{method}_coefficients.safetensors")
    payload = {
        "config": {**{k: v for k, v in asdict(config).items() if k not in ("bank",)}, "out": str(config.out),
                   "bank": asdict(ctx.bank.config), "tasks": list(tasks),
                   "sizes": {t: {"select": len(ctx.select[t]), "fit": len(ctx.fit[t]), "test": len(ctx.test[t])}
                             for t in tasks}},
        "banks": {("linearised" if b.config.linearized else "standard"): {"root": str(b.root), "entries": b.table()}
                  for b in banks},
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    json_path, md_path = write_results(out, "addition", payload, table)
    files.update({"json": str(json_path), "markdown": str(md_path)})
    payload["files"] = files
    write_json(json_path, payload)
    payload["table"] = table
    return payload


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run addition``."""
    d = AdditionConfig()
    parser = subparsers.add_parser(
        "addition",
        help="task addition: merge the whole bank (task arithmetic, TIES, AdaMerging, aTLAS, linearised aTLAS)",
        description="Merge every bank task into one backbone and evaluate each task with its own head. "
        "Choices are made on held-out validation images; test splits are only reported.",
    )
    add = parser.add_argument
    add("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="bank tasks to merge (default: all six)")
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
        help=f"among {', '.join(METHODS)} (default: all)")
    add("--seed", type=int, default=d.seed, help="validation split and training seed (default: %(default)s)")
    add("--select-per-task", type=int, default=d.select_per_task, help="held-out validation images per task")
    add("--fit-per-task", type=int, default=d.fit_per_task, help="validation images per task to fit coefficients")
    add("--epochs", type=int, default=d.epochs, help="epochs of the learned methods (default: %(default)s)")
    add("--lr", type=float, default=d.lr, help="coefficient learning rate (default: %(default)s)")
    add("--batch-per-task", type=int, default=d.batch_per_task, help="images per task per step (%(default)s)")
    add("--ties-density", type=float, default=d.ties_density, help="TIES kept fraction (default: %(default)s)")
    add("--adamerging-steps", type=int, default=d.adamerging_steps, help="AdaMerging steps (default: %(default)s)")
    add("--bank-root", type=Path, default=None, help="standard bank directory (default: the cache)")
    add("--linear-bank-root", type=Path, default=None, help="linearised bank directory (default: the cache)")
    add("--out", type=Path, default=d.out, help="results directory (default: %(default)s)")
    add("--no-resume", action="store_true", help="recompute methods already recorded under the same settings")
    add("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    config = AdditionConfig(
        methods=tuple(args.methods), seed=args.seed, select_per_task=args.select_per_task,
        fit_per_task=args.fit_per_task, epochs=args.epochs, lr=args.lr, batch_per_task=args.batch_per_task,
        ties_density=args.ties_density, adamerging_steps=args.adamerging_steps, out=args.out,
        resume=not args.no_resume, progress=not args.quiet,
    )
    bank = Bank(config.bank, root=args.bank_root) if args.bank_root else None
    linear = Bank(replace(config.bank, linearized=True), root=args.linear_bank_root) if args.linear_bank_root else None
    result = run_addition(config, bank=bank, linear_bank=linear, tasks=tuple(args.tasks))
    print(result["table"])
    print("\n" + "\n".join(f"{k}: {v}" for k, v in result["files"].items()))
    print(f"total {result['seconds']:.0f} s")
    return 0
