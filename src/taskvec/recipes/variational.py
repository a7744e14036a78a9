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

from taskvec.compose import Composer
from taskvec.evaluate import selection_metric
from taskvec.experiment import (
    RecordStore,
    add_config_arguments,
    config_from_args,
    fingerprint,
    grid,
    history,
    json_safe,
    mean_se,
    run_grid,
)
from taskvec.report import markdown_table, write_results
from taskvec.suites import add_suite_arguments, make_suite, suite_from_args
from taskvec.suites.multitask import SuiteMultiTaskData
from taskvec.variational import ELBOLoss, MultitaskELBOLoss, VariationalComposer, VariationalConfig, plot_kept_fraction
from taskvec.variational.experiment import (
    RUNNERS,
    gated_logits,
    gated_scores,
    inference_cost,
    probe_batch,
    train_variational,
)
from taskvec.workflow import (
    DEFAULT_RESULTS,
    CoefficientSchedule,
    MultiTaskSetup,
    few_shot_pool,
    few_shot_split,
    learn_atlas,
    train_multitask,
)

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
    timing_runners: tuple[str, ...] = RUNNERS
    out: Path = field(default=DEFAULT_RESULTS / "variational", metadata={"help": "results directory"})
    resume: bool = field(default=True, metadata={"help": "recompute finished parts"})
    progress: bool = field(default=True, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        self.parts, self.tasks, self.targets = tuple(self.parts), tuple(self.tasks), tuple(self.targets)
        self.shots, self.seeds = tuple(self.shots), tuple(self.seeds)
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"parts {unknown or '[]'}: choose a non-empty subset of {list(PARTS)}")
        if self.tasks and [t for t in self.targets if t not in self.tasks]:
            raise ValueError(f"few-shot targets {[t for t in self.targets if t not in self.tasks]} are not among "
                             f"tasks {list(self.tasks)}")
        if "fewshot" in self.parts and (not self.targets or not self.seeds or any(k < 1 for k in self.shots)
                                        or not self.shots):
            raise ValueError(f"few-shot needs targets, shots >= 1 and seeds; got targets={self.targets}, "
                             f"shots={self.shots}, seeds={self.seeds}")
        if not 0.0 <= self.kl_warmup_fraction <= 1.0:
            raise ValueError(f"kl_warmup_fraction must lie in [0, 1], got {self.kl_warmup_fraction}")
        if self.test_limit < 0 or self.timing_batch < 1 or self.timing_rounds < 1:
            raise ValueError(f"test_limit must be >= 0, timing_batch and timing_rounds >= 1; got {self.test_limit}, "
                             f"{self.timing_batch}, {self.timing_rounds}")


@dataclass(frozen=True)
class Method:
    """A row of both parts: ``addition(ctx, config, out, found) -> (row, model)`` (``found``: the recorded
    row, whose saved state is reloaded), ``fewshot(job) -> record``."""

    label: str
    addition: Callable[..., tuple[dict, nn.Module]]
    fewshot: Callable[[dict], dict]


def shot_pool(suite: Any, splits: Any) -> Any:
    """The split a target's shots come from: the suite's choice where it makes one (``few_shot_pool``),
    else :func:`taskvec.workflow.few_shot_pool` (the validation split)."""
    choose = getattr(suite, "few_shot_pool", None)
    return choose(splits) if callable(choose) else few_shot_pool(splits)


def _limited(split: Any, limit: int) -> Any:
    """A seeded subset of at most ``limit`` samples (0: the split): the same for every method."""
    if limit == 0 or len(split) <= limit:
        return split
    return split.subset(torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:limit].sort()[0])


def _variational(config: VariationalRecipeConfig, base: nn.Module, vectors: list, suite: Any, probe: Any,
                 init: float) -> VariationalComposer:
    dim = getattr(base, "feature_dim", None)
    dim = dim if isinstance(dim, int) else int(suite.features(base, probe.subset(torch.arange(1))).shape[-1])
    return VariationalComposer(Composer(base, vectors, config.granularity, init=init), feature_dim=dim,
                               config=replace(config.variational))


def _setup(config: VariationalRecipeConfig) -> MultiTaskSetup:
    return replace(config.addition, progress=config.progress, resume=config.resume)


def _add_row(key: str, ctx: Any, test: dict[str, dict], selection: float, **extra: Any) -> dict:
    acc = {t: test[t]["acc"] for t in ctx.tasks}
    normalized = {t: acc[t] / ctx.finetuned[t] for t in ctx.tasks}
    return {"key": key, "method": METHODS[key].label, "selection_acc": selection, "test_acc": acc,
            "test_balanced_acc": {t: test[t]["balanced_acc"] for t in ctx.tasks}, "normalized": normalized,
            "avg_acc": sum(acc.values()) / len(acc), "avg_normalized": sum(normalized.values()) / len(acc), **extra}


def _atlas_addition(ctx: Any, config: VariationalRecipeConfig, out: Path, found: dict | None) -> tuple[dict, nn.Module]:
    composer = Composer(ctx.base, ctx.vectors(), "block", init=config.addition.init)
    file = out / "addition_atlas_coefficients.safetensors"
    if found is not None and file.is_file():
        composer.load_coefficients(file)
        return found, composer.merge()
    tic = time.perf_counter()
    result = train_multitask(composer, ctx, _setup(config), "aTLAS (block)", out / "addition_atlas.ckpt")
    train_seconds = time.perf_counter() - tic
    merged = composer.merge()
    test = {t: ctx.suite.scores(merged, ctx.heads[t], ctx.test[t]) for t in ctx.tasks}
    composer.save_coefficients(file, extra={"recipe": "variational", "method": "atlas"})
    return _add_row("atlas", ctx, test, float(result.best_metric), learned=composer.coefficients.numel(),
                    best_epoch=result.best_epoch, history=history(result), train_seconds=train_seconds,
                    seconds=time.perf_counter() - tic), merged


def _variational_addition(ctx: Any, config: VariationalRecipeConfig, out: Path,
                          found: dict | None) -> tuple[dict, nn.Module]:
    tic = time.perf_counter()
    model = _variational(config, ctx.suite.backbone(), ctx.vectors(), ctx.suite, ctx.fit[ctx.tasks[0]],
                         config.addition.init)
    file = out / "variational_addition_inference.safetensors"
    if found is not None and file.is_file():
        model.load_inference(file)
        return found, model
    setup = _setup(config)
    loss = MultitaskELBOLoss([ctx.heads[t] for t in ctx.tasks], sum(len(ctx.fit[t]) for t in ctx.tasks), 0,
                             kl_weight=config.kl_weight, kl_normalizer=config.kl_normalizer)
    result = train_variational(
        model, loss, ctx.mixed([ctx.fit[t] for t in ctx.tasks], setup.batch_per_task, augmentation=setup.augmentation),
        epochs=setup.epochs, lr=config.lr, weight_decay=config.weight_decay, seed=setup.seed,
        kl_warmup_fraction=config.kl_warmup_fraction, evaluate=ctx.selection_score, progress=config.progress,
        description="variational (addition)", checkpoint=out / "variational_addition.ckpt", resume=config.resume)
    train_seconds = time.perf_counter() - tic
    model.save(file, extra={"recipe": "variational", "part": "addition"})
    gated = {t: gated_scores(model, ctx.heads[t], ctx.test[t], ctx.suite) for t in ctx.tasks}
    kept = {t: float(gated[t][1].mean()) for t in ctx.tasks}
    row = _add_row("variational", ctx, {t: gated[t][0] for t in ctx.tasks},
                   float(result.best_metric), kept_fraction=kept, kept_fraction_avg=sum(kept.values()) / len(kept),
                   kept_per_block=torch.stack([gated[t][1] for t in ctx.tasks]).mean(0).tolist(),
                   best_epoch=result.best_epoch, history=history(result), train_seconds=train_seconds,
                   learned=sum(p.numel() for p in model.inference.parameters()), seconds=time.perf_counter() - tic)
    return row, model


def _atlas_fewshot(job: dict) -> dict:
    merged, selection, detail = learn_atlas(job["base"], job["vectors"], job["head"], job["train"], job["val"],
                                            job["suite"], job["schedule"], job["seed"], progress=job["progress"])
    scores = job["suite"].scores(merged, job["head"], job["test"])
    return {"test_acc": scores["acc"], "test_balanced_acc": scores["balanced_acc"], "selection_acc": selection,
            "best_epoch": detail["best_epoch"]}


def _variational_fewshot(job: dict) -> dict:
    config, suite, head, train, val, schedule = (job[k] for k in ("config", "suite", "head", "train", "val",
                                                                  "schedule"))
    model = _variational(config, job["base"], job["vectors"], suite, train, 0.0)
    loader = suite.loader(train, batch_size=schedule.batch_size, augmentation=schedule.augmentation,
                          min_steps=schedule.min_steps_per_epoch)
    loss = ELBOLoss(head, len(train), 0, kl_weight=config.kl_weight, kl_normalizer=config.kl_normalizer)
    evaluate = None if val is None else (lambda m: selection_metric(gated_logits(m, head, val, suite)[0], val))
    result = train_variational(model, loss, loader, epochs=schedule.epochs, lr=config.fewshot_lr,
                               weight_decay=config.weight_decay, kl_warmup_fraction=config.kl_warmup_fraction,
                               seed=job["seed"], evaluate=evaluate, progress=config.progress,
                               description=f"variational {job['target']} k={job['k']} s={job['seed']}")
    scores, kept = gated_scores(model, head, job["test"], suite)
    return {"test_acc": scores["acc"], "test_balanced_acc": scores["balanced_acc"],
            "selection_acc": None if val is None else gated_scores(model, head, val, suite)[0]["acc"],
            "best_epoch": result.best_epoch, "kept_fraction": float(kept.mean())}


METHODS: dict[str, Method] = {
    "atlas": Method("aTLAS (block)", _atlas_addition, _atlas_fewshot),
    "variational": Method("variational (gated)", _variational_addition, _variational_fewshot),
}


def run_addition_part(config: VariationalRecipeConfig, suite: Any, tasks: tuple[str, ...], out: Path,
                      settings: dict, evaluator: Any = None) -> dict:
    """aTLAS and the variational composer over the whole bank; the gate's kept fraction; inference cost."""
    ctx = SuiteMultiTaskData(suite, tasks, _setup(config), evaluator)
    ctx.test = {t: _limited(ctx.test[t], config.test_limit) for t in tasks}
    records = RecordStore(out / "variational_addition_records.jsonl", fingerprint({**settings, "part": "addition"}),
                          config.resume)
    rows, models = {}, {}
    for key, method in METHODS.items():
        found = records.get(key)
        rows[key], models[key] = method.addition(ctx, config, out, found)
        if rows[key] is not found:
            records.put(key, rows[key])
    variational = models["variational"]
    kept_plot = plot_kept_fraction(torch.tensor(rows["variational"]["kept_per_block"]),
                                   variational.composer.block_names, variational.vector_names,
                                   out / "variational_addition_kept.png",
                                   title="variational composition, task addition: fraction of test inputs for "
                                         "which the gate keeps each (vector, block)")
    probe = probe_batch(suite, ctx.test[tasks[0]], config.timing_batch)
    cost = inference_cost(variational, models["atlas"], probe, config.timing_rounds, config.timing_runners)
    return {"atlas": rows["atlas"], "variational": rows["variational"], "cost": cost, "kept_plot": str(kept_plot),
            "atlas_coefficients": str(out / "addition_atlas_coefficients.safetensors"), "tasks": list(tasks),
            "sizes": {t: {"select": len(ctx.select[t]), "fit": len(ctx.fit[t]), "test": len(ctx.test[t])}
                      for t in tasks}}


def run_fewshot_part(config: VariationalRecipeConfig, suite: Any, tasks: tuple[str, ...], out: Path,
                     settings: dict) -> dict:
    """Per (target, k, seed): the same shots for every method, records kept per job (resumable)."""
    base = suite.backbone()
    records = RecordStore(out / "variational_fewshot_records.jsonl", fingerprint({**settings, "part": "fewshot"}),
                          config.resume)

    def run_job(job: Any) -> dict:
        target, k, seed = job["target"], job["k"], job["seed"]
        splits = suite.splits(target)
        train, val = few_shot_split(shot_pool(suite, splits), k, seed)
        context = {"config": config, "suite": suite, "base": base, "target": target, "k": k, "seed": seed,
                   "vectors": suite.vectors([t for t in tasks if t != target]), "head": suite.head(target),
                   "train": train, "val": val, "test": _limited(splits.test, config.test_limit),
                   "schedule": replace(config.schedule, progress=config.progress, seed=seed),
                   "progress": config.progress}
        common = {"target": target, "k": k, "seed": seed, "train_images": len(train),
                  "selection_images": 0 if val is None else len(val)}
        done = []
        for key, method in METHODS.items():
            tic = time.perf_counter()
            done.append({**common, "method": key, **method.fewshot(context), "seconds": time.perf_counter() - tic})
        return {"records": done}

    jobs = grid(target=config.targets, k=config.shots, seed=config.seeds)
    done = [r for value in run_grid(jobs, run_job, records) for r in value["records"]]
    summary = []
    for key in METHODS:
        for k in config.shots:
            mine = [r for r in done if r["method"] == key and r["k"] == k]
            per_seed = [sum(accs) / len(accs) for s in config.seeds
                        if (accs := [r["test_acc"] for r in mine if r["seed"] == s])]
            mean, se = mean_se(per_seed)
            balanced = mean_se([r["test_balanced_acc"] for r in mine])
            kept = [r["kept_fraction"] for r in mine if "kept_fraction" in r]
            summary.append({"method": key, "k": k, "mean": mean, "se": se, "balanced_mean": balanced[0],
                            "balanced_se": balanced[1], "kept_fraction": sum(kept) / len(kept) if kept else None,
                            "seconds": sum(r["seconds"] for r in mine)})
    return {"records": done, "summary": summary}


def run_variational(config: VariationalRecipeConfig | None = None, *, suite: Any = None,
                    evaluator: Any = None) -> dict:
    """Run the requested parts on ``suite`` (default: vision); returns what ``<out>/variational.json`` holds."""
    config = config or VariationalRecipeConfig()
    suite = suite if suite is not None else make_suite("vision", progress=config.progress)
    tasks = config.tasks or tuple(suite.tasks)
    missing = [t for t in config.targets if t not in tasks] if "fewshot" in config.parts else []
    if missing:
        raise ValueError(f"few-shot targets {missing} are not among the suite's tasks {list(tasks)}; pass --targets")
    started = time.perf_counter()
    suite.bank.build(tasks, progress=config.progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**{k: v for k, v in asdict(config).items() if k not in ("out", "resume", "progress", "parts")},
                "tasks": tasks, "suite": suite.identity()}
    payload: dict = {"config": json_safe({**asdict(config), "tasks": tasks,
                                          "variational": json.loads(config.variational.to_json())}),
                     "suite": json_safe(suite.identity())}
    sections = []
    for part in config.parts:
        tic = time.perf_counter()
        if part == "addition":
            payload[part] = run_addition_part(config, suite, tasks, out, settings, evaluator)
        else:
            payload[part] = run_fewshot_part(config, suite, tasks, out, settings)
        payload[part]["seconds"] = time.perf_counter() - tic
        sections.append(TABLES[part](payload[part], config))
    payload["seconds"] = time.perf_counter() - started
    kl_scale = "per-sample ELBO" if config.kl_normalizer == "sample" else "KL divided by the number of fitting samples"
    sections.append(f"Objective: {kl_scale}, KL weight beta = {config.kl_weight:g} (warm-up over "
                    f"{config.kl_warmup_fraction:.0%} of the steps); per-sample runner {config.variational.method!r}.")
    table = "\n\n".join(sections)
    json_path, md_path = write_results(out, "variational", json_safe(payload), table)
    payload["files"] = {"json": str(json_path), "markdown": str(md_path)}
    if "addition" in payload:
        payload["files"]["kept_plot"] = payload["addition"]["kept_plot"]
    write_results(out, "variational", json_safe(payload), table)
    payload["table"] = table
    return payload


def _addition_table(part: dict, config: VariationalRecipeConfig) -> str:
    tasks = part["tasks"]
    rows = [{"method": row["method"], **{t[:12]: row["test_acc"][t] for t in tasks}, "avg": row["avg_acc"],
             "avg balanced": sum(row["test_balanced_acc"].values()) / len(tasks),
             "avg normalised": row["avg_normalized"], "kept": row.get("kept_fraction_avg", 1.0),
             "seconds": row["seconds"]} for row in (part["atlas"], part["variational"])]
    cost = [{"inference": r["method"], "ms / batch": r["ms_per_batch"], "x merged": r["relative"]}
            for r in part["cost"]]
    return "\n\n".join([
        f"**Task addition** over {len(tasks)} tasks, test accuracy (normalised by each task's fine-tuned "
        "accuracy); same fitting and selection parts of the validation splits for both rows. 'kept' is the "
        "fraction of coefficients the gate keeps, averaged over test inputs.",
        markdown_table(rows),
        f"**Inference cost** per batch of {config.timing_batch} (CPU, best of {config.timing_rounds}), relative "
        "to the merged aTLAS network:",
        markdown_table(cost),
    ])


def _fewshot_table(part: dict, config: VariationalRecipeConfig) -> str:
    rows = []
    for key, method in METHODS.items():
        row: dict = {"method": method.label}
        for s in (s for s in part["summary"] if s["method"] == key):
            row[f"k={s['k']}"] = f"{100 * s['mean']:.1f} ± {100 * s['se']:.1f}"
            row[f"balanced k={s['k']}"] = f"{100 * s['balanced_mean']:.1f} ± {100 * s['balanced_se']:.1f}"
            if s["kept_fraction"] is not None:
                row[f"kept k={s['k']}"] = s["kept_fraction"]
        rows.append(row)
    return (f"**Few-shot** on {', '.join(config.targets)} (leave-one-out bank), test accuracy in %, mean ± s.e. "
            f"over seeds {list(config.seeds)}; both methods on the same shots.\n\n" + markdown_table(rows))


TABLES = {"addition": _addition_table, "fewshot": _fewshot_table}
# Options of the nested settings: flag destination -> (section, field, help).
NESTED = {
    "epochs": ("addition", "epochs", "task-addition epochs (aTLAS and variational)"),
    "select_per_task": ("addition", "select_per_task", "task addition: validation samples per task for selection"),
    "fit_per_task": ("addition", "fit_per_task", "task addition: validation samples per task to fit on"),
    "batch_per_task": ("addition", "batch_per_task", "task addition: samples per task per step"),
    "fewshot_epochs": ("schedule", "epochs", "few-shot epochs (aTLAS and variational)"),
    "batch_size": ("schedule", "batch_size", "few-shot batch size"),
    "min_steps_per_epoch": ("schedule", "min_steps_per_epoch", "few-shot: small shot sets repeated to this many steps"),
}


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run variational``: options generated from :class:`VariationalRecipeConfig`."""
    parser = subparsers.add_parser(
        "variational", description=__doc__.split("\n\n")[0],
        help="variational (sample-specific, spike-and-slab) composition vs aTLAS: task addition and few-shot")
    add_config_arguments(parser, VariationalRecipeConfig)
    add_config_arguments(parser, VariationalConfig)
    defaults = VariationalRecipeConfig()
    for dest, (section, name, text) in NESTED.items():
        default = getattr(getattr(defaults, section), name)
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, type=type(default), default=default,
                            help=f"{text} (default: %(default)s)")
    add_suite_arguments(parser)
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    nested: dict[str, dict] = {}
    for dest, (section, name, _) in NESTED.items():
        nested.setdefault(section, {})[name] = getattr(args, dest)
    defaults = VariationalRecipeConfig()
    config = config_from_args(
        VariationalRecipeConfig, args, variational=config_from_args(VariationalConfig, args),
        **{section: replace(getattr(defaults, section), **values) for section, values in nested.items()})
    payload = run_variational(config, suite=suite_from_args(args, progress=config.progress))
    print(payload["table"])
    print(f"\nresults: {payload['files']['json']}, {payload['files']['markdown']}")
    if "kept_plot" in payload["files"]:
        print(f"kept-fraction heatmap: {payload['files']['kept_plot']}")
    return 0
