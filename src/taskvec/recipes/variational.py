"""Variational task vector composition (sample-specific coefficients under a spike-and-slab prior) side
by side with aTLAS on the same data, on any suite.

Parts (``--parts``):

- ``addition``: the whole bank merged for every task. aTLAS (block coefficients, multi-task
  cross-entropy) and the variational composer (multi-task ELBO, each task through its own frozen
  head, KL warm-up) train on the same fitting parts of every task's validation split; the epoch is
  chosen on the selection parts. Test labels are read only for the report.
- ``fewshot``: leave-one-out targets, k shots per class from the split the target's head never saw
  (the suite's choice: vision validation, text training), the same training and held-out selection
  shots for both methods per (k, seed).

At test time the variational composer uses its deterministic gate. The report: test accuracy and
balanced accuracy, the fraction of coefficients the gate keeps (a heatmap per vector and block), and
the inference cost per batch relative to the merged aTLAS network (the plain backbone's speed).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import taskvec.variational.experiment as vx
from taskvec import experiment as ex
from taskvec import workflow
from taskvec.compose import Composer
from taskvec.report import write_results
from taskvec.suites import add_suite_arguments, make_suite, suite_from_args
from taskvec.suites.multitask import SuiteMultiTaskData
from taskvec.variational import VariationalConfig, plot_kept_fraction
from taskvec.workflow import DEFAULT_RESULTS, CoefficientSchedule, MultiTaskSetup, learn_atlas, train_multitask

PARTS = ("addition", "fewshot")


@dataclass
class VariationalRecipeConfig:
    """What to run; defaults sized for a 2-core CPU on the vision suite (see the README for times)."""

    parts: tuple[str, ...] = field(default=PARTS, metadata={"help": "which experiments to run", "choices": PARTS})
    tasks: tuple[str, ...] = field(default=(), metadata={
        "help": "bank tasks; task addition merges all of them (default: the suite's tasks)"})
    granularity: str = field(default="block", metadata={
        "help": "latent coefficients per vector and 'block', or per 'layer' (groups of blocks)",
        "choices": ("block", "layer")})
    variational: VariationalConfig = field(default_factory=VariationalConfig)
    lr: float = field(default=1e-2, metadata={"help": "inference network learning rate (task addition)"})
    weight_decay: float = 0.0
    kl_weight: float = field(default=1.0, metadata={"help": "weight of the KL term (beta; 1 is the ELBO)"})
    kl_normalizer: str = "sample"  # "dataset" divides the per-sample KL by the number of fitting samples
    kl_warmup_fraction: float = 0.5  # of all training steps
    addition: MultiTaskSetup = field(default_factory=MultiTaskSetup)  # splits, epochs, batch: aTLAS's
    targets: tuple[str, ...] = field(default=("emoji_twitter",), metadata={
        "help": "few-shot targets, each held out of the bank (text: e.g. wordnet_noun)"})
    shots: tuple[int, ...] = field(default=(4, 16), metadata={"help": "k labelled samples per class"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "few-shot seeds"})
    schedule: CoefficientSchedule = field(default_factory=CoefficientSchedule)
    fewshot_lr: float = 1e-2
    test_limit: int = field(default=0, metadata={
        "help": "report on a seeded subset of at most this many test samples per task (0: all)"})
    timing_batch: int = field(default=64, metadata={"help": "inputs per batch in the inference-cost timing"})
    timing_rounds: int = field(default=5, metadata={"help": "timing rounds (the best is reported)"})
    timing_runners: tuple[str, ...] = vx.RUNNERS
    out: Path = field(default=DEFAULT_RESULTS / "variational", metadata={"help": "results directory"})
    resume: bool = field(default=True, metadata={"help": "recompute finished parts"})
    progress: bool = field(default=True, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        for name in ("parts", "tasks", "targets", "shots", "seeds", "timing_runners"):
            setattr(self, name, tuple(getattr(self, name)))
        problems = {
            "parts": (not self.parts or not set(self.parts) <= set(PARTS), f"a non-empty subset of {list(PARTS)}"),
            "targets": (bool(self.tasks) and not set(self.targets) <= set(self.tasks), f"among tasks {self.tasks}"),
            "shots": (not self.shots or min(self.shots) < 1, "non-empty, each >= 1"), "seeds": (not self.seeds, ""),
            "kl_warmup_fraction": (not 0.0 <= self.kl_warmup_fraction <= 1.0, "in [0, 1]"),
            "test_limit": (self.test_limit < 0, ">= 0"), "timing_batch": (self.timing_batch < 1, ">= 1"),
            "timing_rounds": (self.timing_rounds < 1, ">= 1"),
            "timing_runners": (not set(self.timing_runners) <= set(vx.RUNNERS), f"among {vx.RUNNERS}")}
        for name, (bad, expected) in problems.items():
            if bad:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be {expected or 'non-empty'}")


@dataclass(frozen=True)
class Method:
    """One compared method: ``addition(ctx, config, out, found) -> (row, model)`` (``found``: its recorded
    row, whose saved coefficients or network are reloaded instead of retrained); ``fewshot(job) -> record``."""

    label: str
    addition: Callable[..., tuple[dict, nn.Module]]
    fewshot: Callable[[dict], dict]


def _elbo(config: VariationalRecipeConfig) -> dict:
    return {"kl_weight": config.kl_weight, "kl_normalizer": config.kl_normalizer, "weight_decay": config.weight_decay,
            "kl_warmup_fraction": config.kl_warmup_fraction}


def _setup(config: VariationalRecipeConfig) -> MultiTaskSetup:
    return replace(config.addition, progress=config.progress, resume=config.resume)


def _add_row(key: str, ctx: Any, test: dict[str, dict], selection: float, **extra: Any) -> dict:
    acc = {t: test[t]["acc"] for t in ctx.tasks}
    normalized = {t: acc[t] / ctx.finetuned[t] for t in ctx.tasks}
    return {"key": key, "method": METHODS[key].label, "selection_acc": selection, "test_acc": acc,
            "test_balanced_acc": {t: test[t]["balanced_acc"] for t in ctx.tasks}, "normalized": normalized,
            "avg_acc": sum(acc.values()) / len(acc), "avg_normalized": sum(normalized.values()) / len(acc), **extra}


def _atlas_addition(ctx: Any, config: VariationalRecipeConfig, out: Path, found: dict | None) -> tuple[dict, nn.Module]:
    file = out / "addition_atlas_coefficients.safetensors"
    composer = Composer(ctx.base, ctx.vectors(), "block", init=config.addition.init)
    if found is not None and file.is_file():
        composer.load_coefficients(file)
        return found, composer.merge()
    tic = time.perf_counter()
    result = train_multitask(composer, ctx, _setup(config), "aTLAS (block)", out / "addition_atlas.ckpt")
    train_seconds, merged = time.perf_counter() - tic, composer.merge()
    test = {t: ctx.suite.scores(merged, ctx.heads[t], ctx.test[t]) for t in ctx.tasks}
    composer.save_coefficients(file, extra={"recipe": "variational", "method": "atlas"})
    return _add_row("atlas", ctx, test, float(result.best_metric), learned=composer.coefficients.numel(),
                    best_epoch=result.best_epoch, history=ex.history(result), train_seconds=train_seconds,
                    seconds=time.perf_counter() - tic), merged


def _variational_addition(ctx: Any, config: VariationalRecipeConfig, out: Path,
                          found: dict | None) -> tuple[dict, nn.Module]:
    tic, file = time.perf_counter(), out / "variational_addition_inference.safetensors"
    model = vx.variational_composer(ctx.suite, ctx.suite.backbone(), ctx.vectors(), config.granularity,
                                    config.variational, init=config.addition.init, probe=ctx.fit[ctx.tasks[0]])
    if found is not None and file.is_file():
        model.load_inference(file)
        return found, model
    result = vx.learn_variational_multitask(model, ctx, _setup(config), lr=config.lr, **_elbo(config),
                                            checkpoint=out / "variational_addition.ckpt")
    train_seconds = time.perf_counter() - tic
    model.save(file, extra={"recipe": "variational", "part": "addition"})
    gated = {t: vx.gated_scores(model, ctx.heads[t], ctx.test[t], ctx.suite) for t in ctx.tasks}
    kept = {t: float(gated[t][1].mean()) for t in ctx.tasks}
    return _add_row("variational", ctx, {t: gated[t][0] for t in ctx.tasks}, float(result.best_metric),
                    kept_fraction=kept, kept_fraction_avg=sum(kept.values()) / len(kept),
                    kept_per_block=torch.stack([gated[t][1] for t in ctx.tasks]).mean(0).tolist(),
                    best_epoch=result.best_epoch, history=ex.history(result), train_seconds=train_seconds,
                    learned=sum(p.numel() for p in model.inference.parameters()),
                    seconds=time.perf_counter() - tic), model


def _atlas_fewshot(job: dict) -> dict:
    merged, selection, detail = learn_atlas(job["base"], job["vectors"], job["head"], job["train"], job["val"],
                                            job["suite"], job["schedule"], job["seed"], progress=job["progress"])
    scores = job["suite"].scores(merged, job["head"], job["test"])
    return {"test_acc": scores["acc"], "test_balanced_acc": scores["balanced_acc"], "selection_acc": selection,
            "best_epoch": detail["best_epoch"]}


def _variational_fewshot(job: dict) -> dict:
    config, suite, head, val = job["config"], job["suite"], job["head"], job["val"]
    model = vx.variational_composer(suite, job["base"], job["vectors"], config.granularity, config.variational,
                                    probe=job["train"])
    result = vx.learn_variational(model, head, job["train"], val, suite, job["schedule"], lr=config.fewshot_lr,
                                  **_elbo(config), description=f"variational {job['target']} k={job['k']}")
    scores, kept = vx.gated_scores(model, head, job["test"], suite)
    return {"test_acc": scores["acc"], "test_balanced_acc": scores["balanced_acc"],
            "selection_acc": None if val is None else vx.gated_scores(model, head, val, suite)[0]["acc"],
            "best_epoch": result.best_epoch, "kept_fraction": float(kept.mean())}


METHODS: dict[str, Method] = {
    "atlas": Method("aTLAS (block)", _atlas_addition, _atlas_fewshot),
    "variational": Method("variational (gated)", _variational_addition, _variational_fewshot),
}


def run_addition_part(config: VariationalRecipeConfig, suite: Any, tasks: tuple[str, ...], out: Path,
                      settings: dict, evaluator: Any = None) -> dict:
    """aTLAS and the variational composer over the whole bank; the gate's kept fraction; inference cost."""
    ctx = SuiteMultiTaskData(suite, tasks, _setup(config), evaluator)
    ctx.test = {t: vx.seeded_subset(ctx.test[t], config.test_limit) for t in tasks}
    records = ex.RecordStore(out / "variational_addition_records.jsonl",
                             ex.fingerprint({**settings, "part": "addition"}), config.resume)
    rows, models = {}, {}
    for key, method in METHODS.items():
        found = records.get(key)
        rows[key], models[key] = method.addition(ctx, config, out, found)
        if rows[key] is not found:
            records.put(key, rows[key])
    variational = models["variational"]
    kept_plot = plot_kept_fraction(torch.tensor(rows["variational"]["kept_per_block"]),
                                   variational.composer.block_names, variational.vector_names,
                                   out / "variational_addition_kept.png", title="variational composition, task "
                                   "addition: fraction of test inputs for which the gate keeps each (vector, block)")
    probe = vx.probe_batch(suite, ctx.test[tasks[0]], config.timing_batch)
    cost = vx.inference_cost(variational, models["atlas"], probe, config.timing_rounds, config.timing_runners)
    return {"atlas": rows["atlas"], "variational": rows["variational"], "cost": cost, "kept_plot": str(kept_plot),
            "tasks": list(tasks), "sizes": {t: {"select": len(ctx.select[t]), "fit": len(ctx.fit[t]),
                                                "test": len(ctx.test[t])} for t in tasks}}


def run_fewshot_part(config: VariationalRecipeConfig, suite: Any, tasks: tuple[str, ...], out: Path,
                     settings: dict) -> dict:
    """Per (target, k, seed) job: the same shots for every method; records kept per job (resumable)."""
    base = suite.backbone()

    def run_job(job: Any) -> dict:
        splits = suite.splits(job["target"])
        train, val = workflow.few_shot_split(suite.few_shot_pool(splits), job["k"], job["seed"])
        context = {**job, "config": config, "suite": suite, "base": base, "head": suite.head(job["target"]),
                   "vectors": suite.vectors([t for t in tasks if t != job["target"]]), "train": train, "val": val,
                   "test": vx.seeded_subset(splits.test, config.test_limit), "progress": config.progress,
                   "schedule": replace(config.schedule, progress=config.progress, seed=job["seed"])}
        common = {**job, "train_images": len(train), "selection_images": 0 if val is None else len(val)}
        done = []
        for key, method in METHODS.items():
            tic = time.perf_counter()
            done.append({**common, "method": key, **method.fewshot(context), "seconds": time.perf_counter() - tic})
        return {"records": done}

    records = ex.RecordStore(out / "variational_fewshot_records.jsonl",
                             ex.fingerprint({**settings, "part": "fewshot"}), config.resume)
    jobs = ex.grid(target=config.targets, k=config.shots, seed=config.seeds)
    done = [r for value in ex.run_grid(jobs, run_job, records) for r in value["records"]]
    kept = [r for r in done if "kept_fraction" in r]
    return {"records": done, "summary": {
        "acc": ex.summarize(done)["average"], "balanced_acc": ex.summarize(done, "test_balanced_acc")["average"],
        "kept_fraction": ex.summarize(kept, "kept_fraction")["average"] if kept else []}}


PART_RUNNERS = {"addition": run_addition_part, "fewshot": run_fewshot_part}


def run_variational(config: VariationalRecipeConfig | None = None, *, suite: Any = None,
                    evaluator: Any = None) -> dict:
    """Run the requested parts on ``suite`` (default: vision); returns what ``<out>/variational.json`` holds.
    ``evaluator`` scores task addition's selection parts (tests inject spies through it)."""
    config = config or VariationalRecipeConfig()
    suite = suite if suite is not None else make_suite("vision", progress=config.progress)
    tasks = config.tasks or tuple(suite.tasks)
    missing = [t for t in config.targets if t not in tasks] if "fewshot" in config.parts else []
    if missing:
        raise ValueError(f"few-shot targets {missing} are not among the suite's tasks {list(tasks)}; pass --targets")
    started, out = time.perf_counter(), Path(config.out)
    suite.bank.build(tasks, progress=config.progress)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**{k: v for k, v in asdict(config).items() if k not in ("out", "resume", "progress", "parts")},
                "tasks": tasks, "suite": suite.identity()}
    payload: dict = {"config": ex.json_safe({**asdict(config), "tasks": tasks,
                                             "variational": json.loads(config.variational.to_json())}),
                     "suite": ex.json_safe(suite.identity())}
    for part in config.parts:
        tic = time.perf_counter()
        extra = {"evaluator": evaluator} if part == "addition" else {}
        payload[part] = {**PART_RUNNERS[part](config, suite, tasks, out, settings, **extra),
                         "seconds": time.perf_counter() - tic}
    payload["seconds"] = time.perf_counter() - started
    table = vx.report_table(payload, config, {key: method.label for key, method in METHODS.items()})
    payload["files"] = {"json": str(out / "variational.json"), "markdown": str(out / "variational.md"),
                        **({"kept_plot": payload["addition"]["kept_plot"]} if "addition" in payload else {})}
    write_results(out, "variational", ex.json_safe(payload), table)
    return {**payload, "table": table}


# Options for the nested settings (flag destination -> section, field, help); the rest is generated.
NESTED = {"epochs": ("addition", "epochs", "task-addition epochs (aTLAS and variational)"),
          "select_per_task": ("addition", "select_per_task", "task addition: validation samples per task to select"),
          "fit_per_task": ("addition", "fit_per_task", "task addition: validation samples per task to fit on"),
          "batch_per_task": ("addition", "batch_per_task", "task addition: samples per task per step"),
          "fewshot_epochs": ("schedule", "epochs", "few-shot epochs (aTLAS and variational)"),
          "batch_size": ("schedule", "batch_size", "few-shot batch size"),
          "min_steps_per_epoch": ("schedule", "min_steps_per_epoch", "few-shot: minimum steps per epoch")}


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run variational``: options generated from :class:`VariationalRecipeConfig` (and the gate's
    from :class:`~taskvec.variational.VariationalConfig`), plus ``--suite`` / ``--bank-root``."""
    parser = subparsers.add_parser("variational", description=__doc__.split("\n\n")[0], help="variational "
                                   "(sample-specific, spike-and-slab) composition vs aTLAS: task addition and few-shot")
    ex.add_config_arguments(parser, VariationalRecipeConfig)
    ex.add_config_arguments(parser, VariationalConfig)
    ex.add_nested_arguments(parser, VariationalRecipeConfig(), NESTED)
    add_suite_arguments(parser)
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    nested = ex.nested_from_args(VariationalRecipeConfig(), args, NESTED)
    gate = ex.config_from_args(VariationalConfig, args)
    config = ex.config_from_args(VariationalRecipeConfig, args, variational=gate, **nested)
    payload = run_variational(config, suite=suite_from_args(args, progress=config.progress))
    print(payload["table"] + "\n\nresults: " + ", ".join(f"{k}: {v}" for k, v in payload["files"].items()))
    return 0
