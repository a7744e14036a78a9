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

The validation split and mixed-task batches are :mod:`taskvec.batching`'s, AdaMerging is
:mod:`taskvec.adamerging`'s, records, bar plots and JSON are :mod:`taskvec.experiment`'s.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from taskvec.adamerging import AdaMergingConfig, adamerge
from taskvec.bank import DEFAULT_TASKS, Bank, BankConfig
from taskvec.compose import Composer
from taskvec.evaluate import accuracy
from taskvec.experiment import RecordStore, fingerprint, history, plot_bars
from taskvec.io import write_json
from taskvec.merging import alpha_search, ties_merge
from taskvec.report import markdown_table, plot_coefficients, write_results
from taskvec.workflow import (
    DEFAULT_RESULTS,
    Evaluator,
    MultiTaskData,
    bank_identity,
    task_arithmetic_search,
    train_multitask,
)

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


def _adamerging(ctx: MultiTaskData, config: AdditionConfig, checkpoint: Path) -> tuple[Composer, dict]:
    # Unlabelled test inputs, as AdaMerging does: the loader drops the labels.
    loader = ctx.mixed([ctx.test[t] for t in ctx.tasks], config.adamerging_batch_per_task,
                       steps=config.adamerging_steps, labels=False)
    settings = AdaMergingConfig(granularity="layer", steps=config.adamerging_steps, lr=config.adamerging_lr,
                                init=config.adamerging_init, clamp=config.adamerging_clamp, seed=config.seed,
                                progress=config.progress)
    composer, _ = adamerge(ctx.base, ctx.vectors(), [ctx.heads[t] for t in ctx.tasks], loader, settings,
                           checkpoint=checkpoint, resume=config.resume)
    checkpoint.unlink(missing_ok=True)
    coefficients = composer.coefficients.detach()
    return composer, {"steps": config.adamerging_steps, "mean_coefficient_per_vector":
                      dict(zip(composer.vector_names, coefficients.mean(1).tolist(), strict=True)),
                      "coefficient_range": [float(coefficients.min()), float(coefficients.max())]}


def _row(method: str, ctx: MultiTaskData, test: dict[str, float], selection: float, seconds: float, **extra) -> dict:
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
    tasks: Sequence[str] | None = None,
    evaluator: Evaluator | None = None,
    suite: Any = None,
) -> dict:
    """Merge the bank by every method; returns the payload written to ``<out>/addition.json``.

    ``evaluator`` computes every accuracy (selection and report): tests inject spies through it.
    ``bank`` defaults to the standard bank, ``linear_bank`` to the linearised bank of the same
    settings (built if missing, when ``atlas_lin`` is asked for).
    """
    config = config or AdditionConfig()
    tasks = tuple(tasks or (suite.tasks if suite is not None else DEFAULT_TASKS))
    _check(config, tasks)
    started = time.perf_counter()
    linear_suite = None
    if suite is not None:  # the suite's own bank(s); its batches and scores (text: tokens, zero-shot heads)
        bank = suite.bank
        if any(m in LINEARISED for m in config.methods):
            linear_suite = suite.linearized()
            linear_bank = linear_suite.bank
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
    identity = {**settings, "tasks": tasks, "banks": bank_identity(banks, tasks)}
    records = RecordStore(out / "addition_records.jsonl", fingerprint(identity), config.resume)
    if suite is not None:
        from taskvec.suites.multitask import SuiteMultiTaskData

        ctx = SuiteMultiTaskData(suite, tasks, config, evaluator)
        lin_ctx = SuiteMultiTaskData(linear_suite, tasks, config, evaluator) if linear_suite is not None else None
    else:
        ctx = MultiTaskData(bank, tasks, config, evaluator or accuracy)
        lin_ctx = MultiTaskData(linear_bank, tasks, config, evaluator or accuracy) if len(banks) > 1 else None
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
            result = train_multitask(composer, use, config, METHODS[method], out / f"addition_{method}.ckpt")
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

    rows = [records.get(m) for m in config.methods]
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
    add("--tasks", nargs="+", default=None, help="bank tasks to merge (default: all of the suite's)")
    add("--suite", choices=("vision", "text"), default="vision",
        help="vision (MobileNetV2 bank) or text (MiniLM bank, zero-shot heads) (default: %(default)s)")
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
    suite = None
    if args.suite == "text":
        from taskvec.suites.text import TextSuite

        suite = TextSuite(root=args.bank_root, progress=not args.quiet)
        bank = linear = None
    result = run_addition(config, bank=bank, linear_bank=linear, tasks=args.tasks, suite=suite)
    print(result["table"])
    print("\n" + "\n".join(f"{k}: {v}" for k, v in result["files"].items()))
    print(f"total {result['seconds']:.0f} s")
    return 0
