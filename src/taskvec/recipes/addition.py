"""Task addition (aTLAS section 4.1): merge every task vector of a suite into one backbone, then score
each task on its test split through its own frozen head.

Methods (``--methods``, the :data:`METHODS` registry): ``pretrained`` (the bank's ``head_test_acc``);
``task_arithmetic`` (one alpha); ``ties`` (TIES-merging, density 0.2, its scale searched like alpha);
``adamerging`` (layer-wise AdaMerging, :mod:`taskvec.adamerging`: entropy on the unlabelled *test
inputs* as its authors do, from 0.3, Adam at a constant 1e-3, clamped to [0, 1]; it never sees a
label); ``isotropic`` (one learned coefficient per vector); ``atlas`` (one per parameter block per
vector, the sum of per-task cross-entropies, every batch mixing all tasks); ``atlas_lin`` (aTLAS over
the linearised suite, vectors fine-tuned in tangent space).

Data: each task's *validation* split is cut (seeded) into a selection part, on which every choice is
made (alpha, the TIES scale, the epoch: mean accuracy over tasks), and a fitting part the supervised
coefficients are trained on. Test labels are read only for the report: absolute and normalised
accuracy (absolute / the fine-tuned accuracy of the bank the row composes, so ``atlas_lin`` over the
linearised bank's, as aTLAS and Ortiz-Jimenez et al.), a bar plot and the aTLAS coefficient heatmaps.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskvec import experiment, workflow
from taskvec.adamerging import AdaMergingConfig
from taskvec.compose import Composer
from taskvec.report import markdown_table, plot_composer, publish
from taskvec.suites import Suite, add_suite_arguments, make_suite, suite_from_args
from taskvec.suites.multitask import SuiteMultiTaskData


@dataclass
class _Run:
    """What every method's function reads: the settings, the standard (and linearised) data, the output."""

    config: AdditionConfig
    ctx: SuiteMultiTaskData
    lin: SuiteMultiTaskData | None
    out: Path


@dataclass(frozen=True)
class Method:
    """A row of the table: its label and ``run(run, key) -> (row, composer whose coefficients to keep)``."""

    label: str
    run: Callable[[_Run, str], tuple[dict, Composer | None]]
    linearized: bool = False
    heatmap: bool = False  # block coefficients worth a heatmap


def _row(key: str, ctx: SuiteMultiTaskData, test: dict, selection: float, tic: float, **extra) -> dict:
    return {"key": key, "method": METHODS[key].label, "selection_acc": selection,
            **workflow.normalized_accuracy(test, ctx.finetuned),
            "finetuned_reference": "linearised bank" if METHODS[key].linearized else "standard bank",
            "seconds": time.perf_counter() - tic, **extra}


def _pretrained(run: _Run, key: str) -> tuple[dict, None]:
    ctx, tic = run.ctx, time.perf_counter()
    test = {t: float(ctx.meta[t]["head_test_acc"]) for t in ctx.tasks}  # base + head on test, from the bank
    return _row(key, ctx, test, ctx.selection_score(ctx.base), tic, learned=0), None


def _task_arithmetic(run: _Run, key: str) -> tuple[dict, None]:
    ctx, tic = run.ctx, time.perf_counter()
    alpha, merged, table = workflow.task_arithmetic_search(ctx.base, ctx.vectors(), ctx.selection_score,
                                                           run.config.alpha_grid)
    selected = time.perf_counter() - tic
    return _row(key, ctx, ctx.test_scores(merged), dict(table)[alpha], tic, learned=1, alpha=alpha,
                alpha_table=table, select_seconds=selected), None


def _ties(run: _Run, key: str) -> tuple[dict, None]:
    ctx, config, tic = run.ctx, run.config, time.perf_counter()
    scale, merged, table = workflow.ties_search(ctx.base, ctx.vectors(), ctx.selection_score, config.ties_grid,
                                                config.ties_density)
    selected = time.perf_counter() - tic
    return _row(key, ctx, ctx.test_scores(merged), dict(table)[scale], tic, learned=1, scale=scale,
                density=config.ties_density, alpha_table=table, select_seconds=selected), None


def _adamerging(run: _Run, key: str) -> tuple[dict, Composer]:
    ctx, config, tic = run.ctx, run.config, time.perf_counter()
    settings = AdaMergingConfig(granularity="layer", steps=config.adamerging_steps, lr=config.adamerging_lr,
                                init=config.adamerging_init, clamp=config.adamerging_clamp, seed=config.seed,
                                progress=config.progress)
    composer = workflow.adamerge_tasks(ctx, settings, config.adamerging_batch_per_task,
                                       run.out / "addition_adamerging.ckpt", config.resume)
    merged, coefficients = composer.merge(), composer.coefficients.detach()
    selected = time.perf_counter() - tic
    return _row(key, ctx, ctx.test_scores(merged), ctx.selection_score(merged), tic, learned=coefficients.numel(),
                train_seconds=selected, steps=config.adamerging_steps,
                mean_coefficient_per_vector=workflow.per_vector_means(composer),
                coefficient_range=[float(coefficients.min()), float(coefficients.max())]), composer


def _learned(granularity: str) -> Callable[[_Run, str], tuple[dict, Composer]]:
    """Supervised multi-task coefficients at ``granularity`` (isotropic, aTLAS, linearised aTLAS)."""

    def learn(run: _Run, key: str) -> tuple[dict, Composer]:
        method, tic = METHODS[key], time.perf_counter()
        use = run.lin if method.linearized else run.ctx
        assert use is not None
        composer = Composer(use.base, use.vectors(), granularity, init=run.config.init, linearized=method.linearized)
        result = workflow.train_multitask(composer, use, run.config, method.label, run.out / f"addition_{key}.ckpt")
        selected = time.perf_counter() - tic
        test = use.test_scores(composer.merge())
        extra: dict = {"learned": composer.coefficients.numel(), "best_epoch": result.best_epoch,
                       "history": experiment.history(result), "train_seconds": selected}
        if method.linearized:
            extra["normalized_by_standard_finetuned"] = {t: test[t] / run.ctx.finetuned[t] for t in use.tasks}
        extra["mean_coefficient_per_vector"] = workflow.per_vector_means(composer)
        return _row(key, use, test, float(result.best_metric), tic, **extra), composer  # type: ignore[arg-type]

    return learn


METHODS: dict[str, Method] = {
    "pretrained": Method("pre-trained", _pretrained),
    "task_arithmetic": Method("task arithmetic", _task_arithmetic),
    "ties": Method("TIES-merging", _ties),
    "adamerging": Method("AdaMerging (layer-wise)", _adamerging),
    "isotropic": Method("learned isotropic", _learned("isotropic")),
    "atlas": Method("aTLAS (block)", _learned("block"), heatmap=True),
    "atlas_lin": Method("aTLAS (block, linearised)", _learned("block"), linearized=True, heatmap=True),
}


@dataclass
class AdditionConfig(workflow.MultiTaskSetup):
    """Settings (the multi-task learning ones are :class:`~taskvec.workflow.MultiTaskSetup`'s); the defaults
    are sized for a 2-core CPU (about 10 minutes when the machine is free)."""

    methods: tuple[str, ...] = field(default=tuple(METHODS), metadata={
        "help": "methods to run", "choices": list(METHODS), "metavar": "METHOD"})
    alpha_grid: tuple[float, ...] = field(default=tuple(round(0.1 * i, 2) for i in range(11)), metadata={
        "help": "task arithmetic's alpha grid"})
    ties_grid: tuple[float, ...] = field(default=tuple(round(0.2 * i, 2) for i in range(11)), metadata={
        "help": "TIES-merging's scale grid"})
    ties_density: float = field(default=0.2, metadata={"help": "TIES kept fraction"})
    # AdaMerging: the authors' defaults but the number of steps and the batch (theirs: 500 steps of 2 x 16).
    adamerging_steps: int = field(default=150, metadata={"help": "AdaMerging steps"})
    adamerging_lr: float = field(default=1e-3, metadata={"help": "AdaMerging learning rate (Adam, constant)"})
    adamerging_init: float = field(default=0.3, metadata={"help": "AdaMerging initial coefficient"})
    adamerging_batch_per_task: int = field(default=8, metadata={"help": "AdaMerging test inputs per task per step"})
    adamerging_clamp: tuple[float, float] | None = (0.0, 1.0)
    out: Path = field(default=workflow.DEFAULT_RESULTS / "addition", metadata={"help": "results directory"})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods {unknown or '[]'}: choose a non-empty subset of {list(METHODS)}")
        sizes = ("epochs", "adamerging_steps", "select_per_task", "fit_per_task", "batch_per_task",
                 "adamerging_batch_per_task")
        if bad := {name: getattr(self, name) for name in sizes if getattr(self, name) < 1}:
            raise ValueError(f"{bad}: these settings must be >= 1")
        if not self.alpha_grid or not self.ties_grid or not 0.0 < self.ties_density <= 1.0:
            raise ValueError(f"alpha_grid {self.alpha_grid} and ties_grid {self.ties_grid} must be non-empty, "
                             f"ties_density {self.ties_density} in (0, 1]")


def run_addition(config: AdditionConfig | None = None, *, suite: Suite | None = None,
                 linear_suite: Suite | None = None, evaluator: workflow.Evaluator | None = None) -> dict:
    """Merge the suite's tasks by every method; returns the payload written to ``<out>/addition.json``.

    ``suite`` defaults to ``make_suite("vision")``; ``linear_suite`` (for ``atlas_lin``) to
    ``suite.linearized()``. ``evaluator(model, head, split)`` computes every accuracy (default: the suite's)."""
    config = config or AdditionConfig()
    suite = suite or make_suite("vision", progress=config.progress)
    tasks = tuple(suite.tasks)
    if len(tasks) < 2:
        raise ValueError(f"task addition merges at least two tasks; got {list(tasks)}")
    started = time.perf_counter()
    linearized = any(METHODS[m].linearized for m in config.methods)
    suites = workflow.standard_and_linearized(suite, linear_suite, linearized, tasks, config.progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(config).items() if k not in ("methods", "out", "resume", "progress")}
    identity = {**settings, "tasks": tasks, "suites": [s.identity() for s in suites]}
    records = experiment.RecordStore(out / "addition_records.jsonl", experiment.fingerprint(identity), config.resume)
    contexts = [SuiteMultiTaskData(s, tasks, config, evaluator) for s in suites]
    run = _Run(config, contexts[0], contexts[1] if len(contexts) > 1 else None, out)

    def job(spec: Mapping[str, Any]) -> dict:
        key = spec["method"]
        row, composer = METHODS[key].run(run, key)
        if composer is not None:
            composer.save_coefficients(out / f"addition_{key}_coefficients.safetensors",
                                       extra={"recipe": "addition", "method": key})
        if composer is not None and METHODS[key].heatmap:
            plot_composer(composer, out / f"addition_{key}_coefficients.png",
                          title=f"{METHODS[key].label} coefficients, task addition")
        return row

    rows = experiment.run_grid(experiment.grid(method=config.methods), job, records, key=lambda spec: spec["method"])
    return _report(rows, run, contexts, started)


def _report(rows: list[dict], run: _Run, contexts: list[SuiteMultiTaskData], started: float) -> dict:
    ctx, config, out, tasks = run.ctx, run.config, run.out, run.ctx.tasks
    short = {t: t[:12] for t in tasks}
    absolute = [{"method": r["method"], **{short[t]: r["test_acc"][t] for t in tasks}, "avg": r["avg_acc"],
                 "selection (val)": r["selection_acc"], "seconds": r["seconds"]} for r in rows]
    normalized = [{"method": r["method"], **{short[t]: r["normalized"][t] for t in tasks}, "avg": r["avg_normalized"]}
                  for r in rows]
    choices = [f"task arithmetic alpha = {r['alpha']:g}" if "alpha" in r
               else f"TIES scale = {r['scale']:g} (density {r['density']:g})" if "scale" in r
               else f"{r['method']}: epoch {r['best_epoch']} of {config.epochs}"
               for r in rows if {"alpha", "scale", "best_epoch"} & set(r)]
    header = (
        f"Task addition over {len(tasks)} tasks ({', '.join(tasks)}) on {ctx.bank.config.label()}; selection on "
        f"{len(ctx.select[tasks[0]])} held-out validation images per task, coefficients fitted "
        f"on up to {config.fit_per_task} other validation images per task; test splits for the report only."
    )
    table = "\n\n".join([
        header,
        "**Absolute test accuracy**\n\n" + markdown_table(absolute),
        "**Normalised test accuracy** (absolute / fine-tuned; the linearised row over the linearised bank's "
        "fine-tuned accuracy)\n\n" + markdown_table(normalized),
        "Choices made on validation data: " + "; ".join(choices) + ".",
    ])
    bars = experiment.plot_bars({r["method"]: r["avg_normalized"] for r in rows}, out / "addition_normalized.png",
                                ylabel="normalised accuracy (avg over tasks)", title="Task addition",
                                points={r["method"]: r["normalized"] for r in rows}, reference=1.0)
    files: dict[str, str] = {"bars": str(bars)}
    for key in config.methods:  # heatmaps of this run or of the run whose records were reused
        heatmap = out / f"addition_{key}_coefficients.png"
        if METHODS[key].heatmap and heatmap.is_file():
            files[f"heatmap_{key}"] = str(heatmap)
            files[f"coefficients_{key}"] = str(out / f"addition_{key}_coefficients.safetensors")
    sizes = {t: {"select": len(ctx.select[t]), "fit": len(ctx.fit[t]), "test": len(ctx.test[t])} for t in tasks}
    payload = {"config": {**asdict(config), "out": str(config.out), "bank": asdict(ctx.bank.config),
                          "tasks": list(tasks), "sizes": sizes},
               "banks": workflow.banks_table([c.bank for c in contexts]), "rows": rows,
               "seconds": time.perf_counter() - started}
    return publish(out, "addition", payload, table, files)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run addition``: options generated from :class:`AdditionConfig` plus the suite's."""
    parser = subparsers.add_parser(
        "addition",
        help="task addition: merge the whole bank (task arithmetic, TIES, AdaMerging, aTLAS, linearised aTLAS)",
        description="Merge every bank task into one backbone and evaluate each task with its own head. "
        "Choices are made on held-out validation samples; test splits are only reported.",
    )
    experiment.add_config_arguments(parser, AdditionConfig, names={"progress": "--quiet"})
    add_suite_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to merge (default: all of the suite's)")
    parser.add_argument("--linear-bank-root", type=Path, default=None,
                        help="linearised bank directory, for atlas_lin (default: next to the bank)")
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    config = experiment.config_from_args(AdditionConfig, args)
    suite = suite_from_args(args, progress=config.progress, tasks=args.tasks)
    linear = (make_suite(args.suite, root=args.linear_bank_root, tasks=args.tasks, progress=config.progress,
                         linearized=True) if args.linear_bank_root else None)
    result = run_addition(config, suite=suite, linear_suite=linear)
    files = "\n".join(f"{k}: {v}" for k, v in result["files"].items())
    print(f"{result['table']}\n\n{files}\ntotal {result['seconds']:.0f} s")
    return 0
