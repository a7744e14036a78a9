"""Few-shot adaptation (aTLAS section 4.2) on any suite: every target held out of the bank, k shots per class.

Each target t is adapted with the other tasks' vectors (leave-one-out) and scored through the suite's frozen
head (vision: t's probe fitted on its whole training split, or with ``head_from`` a same-class partner's;
text: t's zero-shot head, which never saw a label). Per k and seed, k shots per class come from the split
that head never saw (``suite.few_shot_pool``: vision validation, text training); a quarter (k >= 2) is held
out, and every choice (epoch, weight decay, Tip-Adapter's alpha and beta) is made on those selection shots
(accuracy, ties broken by cross-entropy); k = 1 keeps the last epoch and default settings. Test labels are
read only by the ``evaluator``, once per method. Methods: see :data:`METHODS` (LP++ and Tip-Adapter build on
the suite's head: for text the zero-shot text weights, as the paper does; full fine-tuning runs in eval
mode: BatchNorm statistics frozen, dropout off). OOD (vision): aTLAS on ``ood_source`` shots tested on
``ood_target``, a note where the suite lacks them. Report: accuracy and balanced accuracy per (method, k),
mean over seeds of the per-seed mean over targets +- s.e.; per target; runtime; JSON; accuracy against k.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taskvec import experiment as ex
from taskvec import workflow as wf
from taskvec.evaluate import logit_scores
from taskvec.suites import add_suite_arguments, make_suite, suite_from_args
from taskvec.workflow import CoefficientSchedule, FewShotJob, ShotFeatures

Outcome = tuple[Tensor, float | None, dict]  # test logits, selection score (None at k = 1), what was chosen
Fitted = tuple[nn.Module, float | None, dict]
ALL_SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Method:
    """A registered method: its table label and ``run(job, config) -> (test logits, selection, detail)``."""

    label: str
    run: Callable[[FewShotJob, FewShotConfig], Outcome]
    uses: tuple[str, ...] = ()  # shared computations (FewShotJob.costs) counted in the method's runtime


def _on_pretrained(fit: Callable[[FewShotJob, ShotFeatures, FewShotConfig], Fitted]) -> Callable:
    def run(job: FewShotJob, config: FewShotConfig) -> Outcome:
        model, selection, detail = fit(job, job.features("pre", lambda: job.base), config)
        return model(job.target.test_pretrained), selection, detail
    return run


def _on_atlas(fit: Callable[[FewShotJob, ShotFeatures, FewShotConfig], Fitted]) -> Callable:
    def run(job: FewShotJob, config: FewShotConfig) -> Outcome:
        model, selection, detail = fit(job, job.features("atlas_features", lambda: job.atlas()[0]), config)
        return model(job.atlas_test()), selection, {**detail, "atlas_best_epoch": job.atlas()[2]["best_epoch"]}
    return run


FITTERS: dict[str, Callable[[FewShotJob, ShotFeatures, FewShotConfig], Fitted]] = {
    "probe": lambda job, f, c: wf.fit_probe_on_shots(f, job.train, job.val, len(job.target.splits.classes),
                                                     c.probe_decays, c.probe_default_decay),
    "tip": lambda job, f, c: wf.fit_tip_on_shots(f, job.train, job.val, job.head),
    "lpp": lambda job, f, c: wf.fit_lpp_on_shots(f, job.train, job.val, job.head, c.lpp_iterations),
}


def _finetune(job: FewShotJob, config: FewShotConfig) -> Outcome:
    model = copy.deepcopy(job.base).requires_grad_(True)
    selection, detail = wf.train_through_backbone(model, job.head, job.train, job.val, job.suite, job.schedule,
                                                  job.seed, config.finetune_lr, "full fine-tuning", config.progress)
    return job.head(job.suite.features(model.eval(), job.target.splits.test)), selection, detail


def _atlas(job: FewShotJob, config: FewShotConfig) -> Outcome:
    return job.head(job.atlas_test()), job.atlas()[1], job.atlas()[2]


METHODS: dict[str, Method] = {
    "pretrained": Method("pre-trained + bank head", lambda job, _: (job.head(job.target.test_pretrained), None, {})),
    "probe": Method("linear probe", _on_pretrained(FITTERS["probe"]), ("pre",)),
    "tip": Method("Tip-Adapter", _on_pretrained(FITTERS["tip"]), ("pre",)),
    "lpp": Method("LP++", _on_pretrained(FITTERS["lpp"]), ("pre",)),
    "finetune": Method("full fine-tuning", _finetune),
    "atlas": Method("aTLAS (block)", _atlas, ("atlas",)),
    "atlas_tip": Method("aTLAS + Tip-Adapter", _on_atlas(FITTERS["tip"]), ("atlas", "atlas_features")),
    "atlas_lpp": Method("aTLAS + LP++", _on_atlas(FITTERS["lpp"]), ("atlas", "atlas_features")),
}


def _opt(default: Any, text: str, **more: Any) -> Any:
    return field(default=default, metadata={"help": text, **more})


@dataclass
class FewShotConfig(CoefficientSchedule):
    """The grid and its schedule (aTLAS: init 0, lr 0.1; fine-tuning at the bank's rate). Defaults: a vision
    subset sized for 2 cores (~15 min). The text grid (MiniLM, 1 thread, results/text_fewshot.md) runs
    ``--epochs 4 --min-steps-per-epoch 3 --batch-size 16``: 12-32 steps of 16 texts per aTLAS or
    fine-tuning run, so that 5 k x 3 seeds x all methods cost ~15 CPU-minutes."""

    targets: tuple[str, ...] = _opt(("fashion_mnist", "emoji_twitter"), "targets (each held out of the bank), or 'all'")
    shots: tuple[int, ...] = _opt((1, 4, 16), "k values (shots per class)")
    seeds: tuple[int, ...] = _opt((0, 1, 2), "seeds")
    methods: tuple[str, ...] = _opt(tuple(METHODS), "methods", choices=list(METHODS), metavar="METHOD")
    epochs: int = _opt(10, "aTLAS / fine-tuning epochs")
    lr: float = _opt(0.1, "aTLAS coefficient learning rate")
    batch_size: int = _opt(32, "aTLAS / fine-tuning batch size")
    min_steps_per_epoch: int = _opt(10, "small shot sets are repeated to this many batches per epoch")
    augmentation: str = _opt("weak", "augmentation of the training shots (the suite's)")
    finetune_lr: float = _opt(1e-4, "full fine-tuning learning rate")
    probe_decays: tuple[float, ...] = _opt((1e-4, 1e-3, 1e-2, 1e-1), "linear-probe weight decays (selected)")
    probe_default_decay: float = _opt(1e-4, "linear-probe weight decay at k = 1")
    lpp_iterations: int = _opt(300, "LP++ iterations")
    head_from: str = _opt("own", "whose head scores each target: its own, 'auto' (a same-class partner's where "
                          "there is one, e.g. Emoji-Google's for Emoji-Twitter) or a task", metavar="auto|own|TASK")
    ood: bool = _opt(True, "skip the out-of-distribution check")
    ood_source: str = _opt("emoji_google", "OOD: the task whose shots aTLAS learns on")
    ood_target: str = _opt("emoji_twitter", "OOD: the task it is tested on (same classes)")
    ood_shots: tuple[int, ...] = _opt((16,), "k values of the OOD check")
    out: Path = field(default=wf.DEFAULT_RESULTS / "fewshot", metadata={"help": "results directory"})
    resume: bool = _opt(True, "recompute jobs already recorded under the same settings")
    progress: bool = _opt(True, "no progress bars")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: unknown few-shot methods {unknown}; choose from {list(METHODS)}")
        for name in ("targets", "shots", "seeds", "probe_decays"):
            if not getattr(self, name):
                raise ValueError(f"few-shot: {name} must name at least one value")
        for name in ("shots", "ood_shots", "epochs", "batch_size", "min_steps_per_epoch", "lpp_iterations"):
            value = getattr(self, name)
            if any(v < 1 for v in (value if isinstance(value, tuple) else [value])):
                raise ValueError(f"{name} must be >= 1; got {value}")

    @property
    def schedule(self) -> CoefficientSchedule:
        return CoefficientSchedule(**{f.name: getattr(self, f.name) for f in fields(CoefficientSchedule)})


def run_job(job: FewShotJob, config: FewShotConfig, evaluator: Callable[[Tensor, Any], dict]) -> list[dict]:
    """Every requested method on one (target, k, seed), in :data:`METHODS` order: one record each."""
    records = []
    for name in (m for m in METHODS if m in config.methods):
        spent, tic = sum(job.costs.values()), time.perf_counter()
        logits, selection, detail = METHODS[name].run(job, config)
        own = time.perf_counter() - tic - (sum(job.costs.values()) - spent)
        with torch.no_grad():
            test = evaluator(logits.detach(), job.target.splits.test)
        records.append({"target": job.target.name, "k": job.k, "seed": job.seed, "method": name,
                        "test_acc": test["acc"], "test_bal": test.get("balanced_acc"), "selection_acc": selection,
                        "seconds": own + sum(job.costs.get(u, 0.0) for u in METHODS[name].uses),
                        "train_images": len(job.train), "selection_images": 0 if job.val is None else len(job.val),
                        "detail": detail})
    return records


def settings_fingerprint(config: FewShotConfig, suite: Any) -> str:
    """What changes the numbers: the schedule, the heads' settings, and the suite (bank and entries)."""
    keep = ("epochs", "lr", "batch_size", "min_steps_per_epoch", "weight_decay", "augmentation", "finetune_lr",
            "probe_decays", "probe_default_decay", "lpp_iterations", "head_from")
    return ex.fingerprint({**{n: getattr(config, n) for n in keep}, "suite": suite.identity()})


def _header(s: FewShotConfig, suite: Any, full: bool) -> str:
    borrowed = {t: h for t in s.targets if (h := wf.resolve_head(t, s.head_from)) != t}
    heads = f"each target scored by {suite.head_description}" + ("" if not borrowed else "; borrowed heads that "
            "never saw the target's labels: " + ", ".join(f"{t} scored by {h}'s" for t, h in borrowed.items()))
    subset = "" if full else (f" **Subset of the full grid** (shots {list(s.shots)}; full grid: all targets, "
                              f"`--shots {' '.join(map(str, ALL_SHOTS))}`).")
    return (f"Few-shot adaptation: test accuracy (%) averaged over targets {', '.join(s.targets)}; mean ± s.e. "
            f"over seeds {list(s.seeds)} (per seed: mean over targets). {suite.name} suite, bank leave-one-out "
            f"over {list(suite.tasks)}; {heads}. Schedule: {s.epochs} epochs x >= {s.min_steps_per_epoch} steps "
            f"x batch {s.batch_size} (aTLAS lr {s.lr:g}, fine-tuning lr {s.finetune_lr:g}); selection on a "
            f"quarter of the k shots (k >= 2), none at k = 1.{subset}")


def run_fewshot(config: FewShotConfig | None = None, *, suite: Any = None,
                evaluator: Callable[[Tensor, Any], dict] = logit_scores) -> dict:
    """The few-shot grid (and the OOD check) on ``suite`` (default: vision); each target leaves itself
    out of ``suite.tasks``. ``evaluator(test logits, test split)`` is the only reader of test labels.
    Returns the payload written to ``<out>/fewshot.json``."""
    config = config or FewShotConfig()
    suite = suite if suite is not None else make_suite("vision", progress=config.progress)
    tasks, started = tuple(suite.tasks), time.perf_counter()
    missing = [t for t in config.targets if t not in tasks]
    heads = {wf.resolve_head(t, config.head_from) for t in config.targets} - set(tasks)
    if missing or heads or len(tasks) < 2:
        raise ValueError(f"targets {missing} / heads {sorted(heads)} (head_from={config.head_from!r}) are not bank "
                         f"tasks {list(tasks)} (leave-one-out needs two or more): a target's head comes from the bank")
    suite.build(tasks)
    base, out, methods = suite.backbone(), Path(config.out), [m for m in METHODS if m in config.methods]
    store = ex.RecordStore(out / "fewshot_records.jsonl", settings_fingerprint(config, suite), config.resume)
    targets: dict[str, wf.FewShotTarget] = {}

    def one(job: Mapping[str, Any]) -> list[dict]:
        if job["target"] not in targets:
            targets[job["target"]] = wf.FewShotTarget(suite, base, job["target"], tasks, config.head_from)
        return run_job(FewShotJob(targets[job["target"]], job["k"], job["seed"], config.schedule), config, evaluator)

    jobs = ex.grid(target=config.targets, k=config.shots, seed=config.seeds)
    key = lambda j: "{target}/{k}/{seed}/".format(**j) + "+".join(methods)  # noqa: E731
    records = [r for done in ex.run_grid(jobs, one, store, key=key) for r in done]
    ood = config.ood and {config.ood_source, config.ood_target} <= set(tasks)
    ood_records = wf.atlas_transfer(suite, base, config.ood_source, config.ood_target, config.ood_shots,
                                    config.seeds, config.schedule, evaluator) if ood else []

    labels = {m: METHODS[m].label for m in methods}
    full = set(config.targets) == set(tasks) and tuple(sorted(config.shots)) == ALL_SHOTS
    summary, tables = ex.grid_report(records, labels, config.shots, metrics={
        "test_acc": "", "test_bal": "Balanced accuracy (%), the same runs:"}, runtime="Runtime per method (seconds "
        "per (target, k, seed) run, shared feature extraction included; aTLAS + X includes aTLAS):")
    sections = [_header(config, suite, full), "", *tables]
    ood_rows: list[dict] = []
    if ood_records:
        ood_rows, ood_md = wf.transfer_summary(ood_records)
        sections += ["", f"Out of distribution: aTLAS learned on **{config.ood_source}** shots, tested on "
                     f"**{config.ood_target}** (same classes, {config.ood_source}'s head); bank without either "
                     f"({', '.join(ood_records[0]['sources'])}). Accuracy %, mean ± s.e. over seeds.", "", ood_md]
    elif config.ood:
        sections += ["", f"(Out-of-distribution check skipped: {config.ood_source} / {config.ood_target} are not "
                     f"tasks of the {suite.name} suite.)"]
    table = "\n".join(sections)
    plot = ex.plot_summary(summary["test_acc"]["average"], out / "fewshot_accuracy.png", row_key="method",
                           column_key="k", row_order=methods, labels=labels, xlabel="shots per class (k)", logx=True,
                           ylabel="test accuracy (mean over targets)", title=f"Few-shot adaptation ({suite.name})")
    payload: Any = ex.json_safe({
        "config": {**asdict(config), "tasks": list(tasks), "full_grid": full, "suite": suite.identity()},
        "records": records, "summary": summary["test_acc"], "summary_balanced": summary["test_bal"],
        "runtime": ex.runtime_rows(records, labels), "ood": {"records": ood_records, "summary": ood_rows},
        "plot": str(plot), "seconds": time.perf_counter() - started})
    json_path, md_path = ex.write_results(out, "fewshot", payload, table)
    return {**payload, "files": {"json": str(json_path), "markdown": str(md_path), "plot": str(plot)}, "table": table}


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run fewshot``: options generated from :class:`FewShotConfig`, plus ``--suite`` / ``--bank-root``."""
    parser = subparsers.add_parser(
        "fewshot", help="few-shot aTLAS vs linear probe, Tip-Adapter, LP++, fine-tuning (leave-one-out bank)",
        description="Few-shot adaptation on targets held out of the bank, k shots per class, several seeds. "
        "Default: a vision subset sized for a 2-core CPU; the full grid is --targets all --shots 1 2 4 8 16.")
    ex.add_config_arguments(parser, FewShotConfig, skip=("seed", "weight_decay", "extra"),
                            names={"ood": "--no-ood", "resume": "--no-resume", "progress": "--quiet"})
    add_suite_arguments(parser)
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    suite = suite_from_args(args, progress=args.progress)
    overrides = {"targets": tuple(suite.tasks)} if args.targets == ["all"] else {}
    result = run_fewshot(ex.config_from_args(FewShotConfig, args, **overrides), suite=suite)
    print(result["table"])
    print(f"\nresults: {result['files']['json']}\ntable:   {result['files']['markdown']}")
    print(f"plot:    {result['files']['plot']}\ntotal {result['seconds']:.0f} s")
    return 0
