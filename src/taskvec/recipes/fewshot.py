"""Few-shot adaptation (aTLAS section 4.2) on any suite: every target held out of the bank, k shots per class.

For each target t the bank is the other tasks' vectors (leave-one-out) and t is scored through a frozen
head: the suite's (vision: t's own probe, fitted on t's whole training split, or with ``head_from`` a
same-class partner's; text: t's zero-shot head, which never saw a label). For each k and seed
:func:`~taskvec.workflow.few_shot_split` draws k labelled samples per class from the split the head
never saw (``suite.few_shot_pool``: vision validation, text training) and holds a quarter of them out
(k >= 2) for selection. Every method trains on the same training shots and makes every choice (epoch,
weight decay, Tip-Adapter's alpha and beta) on the same selection shots, by accuracy with ties broken by
cross-entropy; at k = 1 the last epoch and default hyper-parameters are kept. Test labels are read only
by the final ``evaluator`` call of each method.

Methods: ``pretrained`` (no shots), ``probe`` (linear probe on frozen features), ``tip`` (Tip-Adapter on
the suite's head), ``lpp`` (LP++ blended with the suite's head: for text, the zero-shot text weights, as
the paper does), ``finetune`` (the whole backbone through the frozen head, eval mode: BatchNorm
statistics frozen, dropout off), ``atlas`` (one coefficient per parameter block per vector), and
``atlas_tip`` / ``atlas_lpp`` (Tip-Adapter / LP++ on the aTLAS-merged backbone's features). Probe-type
methods share features extracted once per backbone (:class:`~taskvec.workflow.ShotFeatures`).

Out of distribution (vision): aTLAS learned on ``ood_source`` shots is tested on ``ood_target`` (same
classes, same head), both vectors left out of the bank; skipped with a note where the suite lacks them.

Report: test accuracy and balanced accuracy per (method, k), the mean over seeds of the per-seed mean
over targets, +- its standard error; per target; runtime; JSON; a plot of accuracy against k.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taskvec.evaluate import logit_scores
from taskvec.experiment import (RecordStore, add_config_arguments, config_from_args, fingerprint, grid, grid_table,
                                json_safe, mean_se, mean_se_cell, markdown_table, plot_summary, run_grid, summarize,
                                write_results)
from taskvec.suites import add_suite_arguments, make_suite, suite_from_args
from taskvec.workflow import (DEFAULT_RESULTS, CoefficientSchedule, ShotFeatures, few_shot_split, fit_lpp_on_shots,
                              fit_probe_on_shots, fit_tip_on_shots, learn_atlas, resolve_head, suite_scoring_head,
                              train_through_backbone)

Outcome = tuple[Tensor, float | None, dict]  # test logits, selection score (None at k = 1), what was chosen
ALL_SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Method:
    label: str
    run: Callable[[Job], Outcome]
    uses: tuple[str, ...] = ()  # shared computations whose time the method's runtime includes


class Target:
    """What every job of one target shares, computed on first use (a resumed run loads nothing)."""

    def __init__(self, suite: Any, base: nn.Module, name: str, tasks: Sequence[str], head_from: str) -> None:
        self.suite, self.base, self.name, self.tasks = suite, base, name, tasks
        self.splits = suite.splits(name)
        self.head_task, self.head = suite_scoring_head(suite, name, head_from)

    @cached_property
    def vectors(self) -> list:
        return self.suite.vectors([t for t in self.tasks if t != self.name])

    @cached_property
    def test_pretrained(self) -> Tensor:
        return self.suite.features(self.base, self.splits.test)


class Job:
    """One (target, k, seed): its shots, and the computations several methods share (timed once)."""

    def __init__(self, target: Target, k: int, seed: int, config: FewShotConfig) -> None:
        self.target, self.suite, self.base, self.head = target, target.suite, target.base, target.head
        self.k, self.seed, self.config = k, seed, config
        self.train, self.val = few_shot_split(self.suite.few_shot_pool(target.splits), k, seed)
        self.costs: dict[str, float] = {}
        self._shared: dict[str, Any] = {}

    def shared(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._shared:
            tic = time.perf_counter()
            self._shared[name] = make()
            self.costs[name] = time.perf_counter() - tic
        return self._shared[name]

    def features(self, name: str, model: Callable[[], nn.Module]) -> ShotFeatures:
        return self.shared(name, lambda: ShotFeatures.extract(self.suite, model(), self.train, self.val))

    def atlas(self) -> tuple[nn.Module, float | None, dict]:
        return self.shared("atlas", lambda: learn_atlas(
            self.base, self.target.vectors, self.head, self.train, self.val, self.suite, self.config.schedule,
            self.seed, progress=self.config.progress))

    def atlas_test(self) -> Tensor:
        return self.shared("atlas_test", lambda: self.suite.features(self.atlas()[0], self.target.splits.test))


def _on_pretrained(fit: Callable[[Job, ShotFeatures], tuple[nn.Module, float | None, dict]]) -> Callable:
    def run(job: Job) -> Outcome:
        model, selection, detail = fit(job, job.features("pre", lambda: job.base))
        return model(job.target.test_pretrained), selection, detail
    return run


def _on_atlas(fit: Callable[[Job, ShotFeatures], tuple[nn.Module, float | None, dict]]) -> Callable:
    def run(job: Job) -> Outcome:
        model, selection, detail = fit(job, job.features("atlas_features", lambda: job.atlas()[0]))
        return model(job.atlas_test()), selection, {**detail, "atlas_best_epoch": job.atlas()[2]["best_epoch"]}
    return run


def _probe(job: Job, feats: ShotFeatures):
    return fit_probe_on_shots(feats, job.train, job.val, len(job.target.splits.classes), job.config.probe_decays,
                              job.config.probe_default_decay)


def _tip(job: Job, feats: ShotFeatures):
    return fit_tip_on_shots(feats, job.train, job.val, job.head)


def _lpp(job: Job, feats: ShotFeatures):
    return fit_lpp_on_shots(feats, job.train, job.val, job.head, job.config.lpp_iterations)


def _finetune(job: Job) -> Outcome:
    model = copy.deepcopy(job.base).requires_grad_(True)
    selection, detail = train_through_backbone(model, job.head, job.train, job.val, job.suite, job.config.schedule,
                                               job.seed, job.config.finetune_lr, "full fine-tuning", job.config.progress)
    return job.head(job.suite.features(model.eval(), job.target.splits.test)), selection, detail


def _atlas(job: Job) -> Outcome:
    _, selection, detail = job.atlas()
    return job.head(job.atlas_test()), selection, detail


METHODS: dict[str, Method] = {
    "pretrained": Method("pre-trained + bank head", lambda job: (job.head(job.target.test_pretrained), None, {})),
    "probe": Method("linear probe", _on_pretrained(_probe), ("pre",)),
    "tip": Method("Tip-Adapter", _on_pretrained(_tip), ("pre",)),
    "lpp": Method("LP++", _on_pretrained(_lpp), ("pre",)),
    "finetune": Method("full fine-tuning", _finetune),
    "atlas": Method("aTLAS (block)", _atlas, ("atlas",)),
    "atlas_tip": Method("aTLAS + Tip-Adapter", _on_atlas(_tip), ("atlas", "atlas_features")),
    "atlas_lpp": Method("aTLAS + LP++", _on_atlas(_lpp), ("atlas", "atlas_features")),
}


@dataclass
class FewShotConfig(CoefficientSchedule):
    """The grid and its schedule. Defaults: a vision subset sized for 2 cores (~15 min). Text (MiniLM,
    1 thread) needs a shorter schedule, e.g. ``--epochs 4 --min-steps-per-epoch 3 --batch-size 16``:
    12 steps x 16 texts per aTLAS / fine-tuning run (results/text_fewshot.md)."""

    targets: tuple[str, ...] = field(default=("fashion_mnist", "emoji_twitter"), metadata={
        "help": "target tasks (each held out of the bank), or 'all'"})
    shots: tuple[int, ...] = field(default=(1, 4, 16), metadata={"help": "k values (shots per class)"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "seeds"})
    methods: tuple[str, ...] = field(default=tuple(METHODS), metadata={
        "help": "methods", "choices": list(METHODS), "metavar": "METHOD"})
    epochs: int = field(default=10, metadata={"help": "aTLAS / fine-tuning epochs"})
    lr: float = field(default=0.1, metadata={"help": "aTLAS coefficient learning rate"})
    batch_size: int = field(default=32, metadata={"help": "aTLAS / fine-tuning batch size"})
    min_steps_per_epoch: int = field(default=10, metadata={"help": "small shot sets are repeated to this many "
                                                                   "batches per epoch"})
    augmentation: str = field(default="weak", metadata={"help": "augmentation of the training shots (the suite's)"})
    finetune_lr: float = field(default=1e-4, metadata={"help": "full fine-tuning learning rate"})
    probe_decays: tuple[float, ...] = field(default=(1e-4, 1e-3, 1e-2, 1e-1), metadata={
        "help": "linear-probe weight decays, chosen on the selection shots"})
    probe_default_decay: float = field(default=1e-4, metadata={"help": "linear-probe weight decay at k = 1"})
    lpp_iterations: int = field(default=300, metadata={"help": "LP++ iterations"})
    head_from: str = field(default="own", metadata={"metavar": "auto|own|TASK", "help": (
        "whose head scores each target: its own, 'auto' (a same-class partner's where there is one, e.g. "
        "Emoji-Google's for Emoji-Twitter) or a task")})
    ood: bool = field(default=True, metadata={"help": "skip the out-of-distribution check"})
    ood_source: str = field(default="emoji_google", metadata={"help": "OOD: task whose shots aTLAS learns on"})
    ood_target: str = field(default="emoji_twitter", metadata={"help": "OOD: task it is tested on"})
    ood_shots: tuple[int, ...] = field(default=(16,), metadata={"help": "k values of the OOD check"})
    out: Path = field(default=DEFAULT_RESULTS / "fewshot", metadata={"help": "results directory"})
    resume: bool = field(default=True, metadata={"help": "recompute jobs already recorded under the same settings"})
    progress: bool = field(default=True, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: unknown few-shot methods {unknown}; choose from {list(METHODS)}")
        for name in ("targets", "shots", "seeds", "probe_decays"):
            if not getattr(self, name):
                raise ValueError(f"few-shot: {name} must name at least one value")
        for name in ("shots", "ood_shots"):
            if any(k < 1 for k in getattr(self, name)):
                raise ValueError(f"{name} must be >= 1; got {list(getattr(self, name))}")
        for name in ("epochs", "batch_size", "min_steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")

    @property
    def schedule(self) -> CoefficientSchedule:
        return CoefficientSchedule(**{f.name: getattr(self, f.name) for f in fields(CoefficientSchedule)})


def run_job(job: Job, methods: Sequence[str], evaluator: Callable[[Tensor, Any], dict]) -> list[dict]:
    """Every requested method on one (target, k, seed), in :data:`METHODS` order: one record each."""
    records = []
    for name in methods:
        spent, tic = sum(job.costs.values()), time.perf_counter()
        logits, selection, detail = METHODS[name].run(job)
        own = time.perf_counter() - tic - (sum(job.costs.values()) - spent)
        with torch.no_grad():
            test = evaluator(logits.detach(), job.target.splits.test)
        records.append({"target": job.target.name, "k": job.k, "seed": job.seed, "method": name,
                        "test_acc": test["acc"], "test_bal": test.get("balanced_acc"), "selection_acc": selection,
                        "seconds": own + sum(job.costs.get(u, 0.0) for u in METHODS[name].uses),
                        "train_images": len(job.train), "selection_images": 0 if job.val is None else len(job.val),
                        "detail": detail})
    return records


def run_ood(suite: Any, base: nn.Module, tasks: Sequence[str], config: FewShotConfig,
            evaluator: Callable[[Tensor, Any], dict]) -> list[dict]:
    """aTLAS on ``ood_source`` shots, tested in domain and on ``ood_target`` (same classes, same head)."""
    source = Target(suite, base, config.ood_source, [t for t in tasks if t != config.ood_target], "own")
    target = suite.splits(config.ood_target)
    if list(source.splits.classes) != list(target.classes):
        raise ValueError(f"OOD pair {config.ood_source} -> {config.ood_target}: the class lists differ, "
                         "so one head cannot serve both")
    sources = [t for t in tasks if t not in (config.ood_source, config.ood_target)]
    if not sources:
        raise ValueError(f"OOD: no task vector left once both OOD tasks are excluded from {list(tasks)}")
    with torch.no_grad():
        pre = {"in_domain": evaluator(source.head(source.test_pretrained), source.splits.test)["acc"],
               "ood": evaluator(source.head(suite.features(base, target.test)), target.test)["acc"]}
    records = []
    for job in grid(k=config.ood_shots, seed=config.seeds):
        one = Job(source, job["k"], job["seed"], config)
        merged, selection, detail = one.atlas()
        with torch.no_grad():
            atlas = {"in_domain": evaluator(source.head(one.atlas_test()), source.splits.test)["acc"],
                     "ood": evaluator(source.head(suite.features(merged, target.test)), target.test)["acc"]}
        records.append({"source": config.ood_source, "target": config.ood_target, **job, "sources": sources,
                        **{f"pretrained_{n}": v for n, v in pre.items()}, **{f"atlas_{n}": v for n, v in atlas.items()},
                        "selection_acc": selection, "seconds": one.costs["atlas"], "detail": detail})
    return records


OOD_COLUMNS = {"pretrained_in_domain": "pre-trained (ID)", "atlas_in_domain": "aTLAS (ID)",
               "pretrained_ood": "pre-trained (OOD)", "atlas_ood": "aTLAS (OOD)"}
OOD_CHANGES = {"ood_change_vs_pretrained": ("atlas_ood", "pretrained_ood", "Δ OOD vs pre-trained"),
               "ood_minus_in_domain": ("atlas_ood", "atlas_in_domain", "aTLAS OOD − ID"),
               "in_domain_change_vs_pretrained": ("atlas_in_domain", "pretrained_in_domain", None)}


def _ood_table(records: Sequence[dict]) -> tuple[list[dict], str]:
    rows, shown = [], []
    for k in sorted({r["k"] for r in records}):
        rs = [r for r in records if r["k"] == k]
        row: dict = {"k": k, "seeds": len(rs), **{n: mean_se([r[n] for r in rs]) for n in OOD_COLUMNS}}
        row.update({n: mean_se([r[a] - r[b] for r in rs]) for n, (a, b, _) in OOD_CHANGES.items()})
        rows.append(row)
        shown.append({"k": k, **{label: mean_se_cell(*row[n]) for n, label in OOD_COLUMNS.items()},
                      **{label: mean_se_cell(*row[n], signed=True) for n, (_, _, label) in OOD_CHANGES.items() if label}})
    return rows, markdown_table(shown)


def settings_fingerprint(config: FewShotConfig, suite: Any) -> str:
    """What changes the numbers: the schedule, the heads' settings, and the suite (bank and entries)."""
    keep = ("epochs", "lr", "batch_size", "min_steps_per_epoch", "weight_decay", "augmentation", "finetune_lr",
            "probe_decays", "probe_default_decay", "lpp_iterations", "head_from")
    return fingerprint({**{n: getattr(config, n) for n in keep}, "suite": suite.identity()})


def run_fewshot(config: FewShotConfig | None = None, *, suite: Any = None,
                evaluator: Callable[[Tensor, Any], dict] = logit_scores) -> dict:
    """The few-shot grid (and the OOD check) on ``suite`` (default: vision); each target leaves itself
    out of ``suite.tasks``. ``evaluator(test logits, test split)`` is the only reader of test labels.
    Returns the payload written to ``<out>/fewshot.json``."""
    config = config or FewShotConfig()
    suite = suite if suite is not None else make_suite("vision", progress=config.progress)
    tasks, started = tuple(suite.tasks), time.perf_counter()
    missing = [t for t in config.targets if t not in tasks]
    heads = {resolve_head(t, config.head_from) for t in config.targets} - set(tasks)
    if missing or heads or len(tasks) < 2:
        raise ValueError(f"targets {missing} / heads {sorted(heads)} (head_from={config.head_from!r}) are not bank "
                         f"tasks {list(tasks)} (leave-one-out needs two or more): a target's head comes from the bank")
    ood = config.ood and {config.ood_source, config.ood_target} <= set(tasks)
    suite.build(tasks)
    base, out, methods = suite.backbone(), Path(config.out), [m for m in METHODS if m in config.methods]
    store = RecordStore(out / "fewshot_records.jsonl", settings_fingerprint(config, suite), config.resume)
    targets: dict[str, Target] = {}

    def one(job: dict) -> list[dict]:
        if job["target"] not in targets:
            targets[job["target"]] = Target(suite, base, job["target"], tasks, config.head_from)
        return run_job(Job(targets[job["target"]], job["k"], job["seed"], config), methods, evaluator)

    jobs = grid(target=config.targets, k=config.shots, seed=config.seeds)
    records = [r for done in run_grid(jobs, one, store, key=lambda j: "{target}/{k}/{seed}/".format(**j)
                                      + "+".join(methods)) for r in done]
    ood_records = run_ood(suite, base, tasks, config, evaluator) if ood else []

    labels = {m: METHODS[m].label for m in methods}
    summary = {"acc": summarize(records), "balanced_acc": summarize(records, key="test_bal")}
    runtime = [{"method": METHODS[m].label, "runs": len(s), "mean_seconds": sum(s) / len(s), "total_seconds": sum(s)}
               for m in methods if (s := [r["seconds"] for r in records if r["method"] == m])]
    full = set(config.targets) == set(tasks) and tuple(sorted(config.shots)) == ALL_SHOTS
    borrowed = {t: h for t in config.targets if (h := resolve_head(t, config.head_from)) != t}
    head_text = f"each target scored by {suite.head_description}" + ("" if not borrowed else "; borrowed heads "
                "that never saw the target's labels: " + ", ".join(f"{t} scored by {h}'s" for t, h in borrowed.items()))
    s = config
    header = (f"Few-shot adaptation: test accuracy (%) averaged over targets {', '.join(s.targets)}; mean ± s.e. over "
              f"seeds {list(s.seeds)} (per seed: mean over targets). {suite.name} suite, bank leave-one-out over "
              f"{list(tasks)}; {head_text}. Schedule: {s.epochs} epochs x >= {s.min_steps_per_epoch} steps x batch "
              f"{s.batch_size} (aTLAS lr {s.lr:g}, fine-tuning lr {s.finetune_lr:g}); selection on a quarter of the "
              "k shots (k >= 2), none at k = 1." + ("" if full else f" **Subset of the full grid** (shots "
              f"{list(s.shots)}; full grid: all targets, `--shots {' '.join(map(str, ALL_SHOTS))}`)."))
    table_of = lambda rows: grid_table(rows, row_key="method", column_key="k", row_order=methods,  # noqa: E731
                                       columns=s.shots, labels=labels, column_label="k={}")
    sections = [header, "", table_of(summary["acc"]["average"]), "", "Balanced accuracy (%), the same runs:", "",
                table_of(summary["balanced_acc"]["average"])]
    for target in s.targets:
        rows = [r for r in summary["acc"]["per_target"] if r["target"] == target]
        sections += ["", f"**{target}** (mean ± s.e. over seeds)", "", table_of(rows)]
    sections += ["", "Runtime per method (seconds per (target, k, seed) run, shared feature extraction included; "
                 "aTLAS + X includes aTLAS):", "",
                 markdown_table(runtime, ["method", "runs", "mean_seconds", "total_seconds"], digits=1)]
    ood_rows: list[dict] = []
    if ood_records:
        ood_rows, ood_md = _ood_table(ood_records)
        sections += ["", f"Out of distribution: aTLAS learned on **{s.ood_source}** shots, tested on **{s.ood_target}"
                     f"** (same classes, {s.ood_source}'s head); bank without either "
                     f"({', '.join(ood_records[0]['sources'])}). Accuracy %, mean ± s.e. over seeds.", "", ood_md]
    elif s.ood:
        sections += ["", f"(Out-of-distribution check skipped: {s.ood_source} / {s.ood_target} are not tasks of the "
                     f"{suite.name} suite.)"]
    table = "\n".join(sections)
    plot = plot_summary(summary["acc"]["average"], out / "fewshot_accuracy.png", row_key="method", column_key="k",
                        row_order=methods, labels=labels, xlabel="shots per class (k)",
                        ylabel="test accuracy (mean over targets)", title=f"Few-shot adaptation ({suite.name})",
                        logx=True)
    payload: dict = json_safe({
        "config": {**asdict(config), "tasks": list(tasks), "full_grid": full, "suite": suite.identity()},
        "records": records, "summary": summary["acc"], "summary_balanced": summary["balanced_acc"],
        "runtime": runtime, "ood": {"records": ood_records, "summary": ood_rows}, "plot": str(plot),
        "seconds": time.perf_counter() - started})
    json_path, md_path = write_results(out, "fewshot", payload, table)
    return {**payload, "files": {"json": str(json_path), "markdown": str(md_path), "plot": str(plot)}, "table": table}


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run fewshot``: options generated from :class:`FewShotConfig`, plus ``--suite`` / ``--bank-root``."""
    parser = subparsers.add_parser(
        "fewshot", help="few-shot aTLAS vs linear probe, Tip-Adapter, LP++, fine-tuning (leave-one-out bank)",
        description="Few-shot adaptation on targets held out of the bank, k shots per class, several seeds. "
        "Default: a vision subset sized for a 2-core CPU; the full grid is --targets all --shots 1 2 4 8 16.")
    add_config_arguments(parser, FewShotConfig, skip=("seed", "weight_decay", "extra"),
                         names={"ood": "--no-ood", "resume": "--no-resume", "progress": "--quiet"})
    add_suite_arguments(parser)
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    suite = suite_from_args(args, progress=args.progress)
    overrides = {"targets": tuple(suite.tasks)} if args.targets == ["all"] else {}
    result = run_fewshot(config_from_args(FewShotConfig, args, **overrides), suite=suite)
    print(result["table"])
    print(f"\nresults: {result['files']['json']}\ntable:   {result['files']['markdown']}")
    print(f"plot:    {result['files']['plot']}\ntotal {result['seconds']:.0f} s")
    return 0
