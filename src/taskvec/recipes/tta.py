"""Test-time adaptation (aTLAS section 4.3) on any suite: unlabelled test inputs only.

Per target the bank holds the *other* tasks' vectors (the target's own would leak its labels); the frozen
head comes from the suite (a probe on vision, the zero-shot head on text). Adaptation holds the test inputs
through ``suite.unlabelled`` (labels -1); labels are read once per model, by the final scoring. Trained:
``atlas`` block coefficients from 0 (AdamW 1e-2: unsupervised objectives drift, so ten times below few-shot's
0.1), or the Tent/SAR baseline ``norm``, the normalisation affines (BN on a CNN, LN on a transformer: the
paper's "LN" row), statistics frozen, Tent's SGD. Objectives: Tent, SAR, SimCLR (two strong views, on the
features: C logits are too few to contrast) and UFM (the weak view trains the strong one; half of every
batch from the trusted set, the pre-trained model's k most confident inputs per class); views come from
``suite.augment_inputs`` on the global generator that ``fit`` reseeds per epoch. Selection reads no label:
last epoch, or lowest objective in a fixed-seed pass (aTLAS's code picks the best *test* epoch). Report:
change from pre-trained, accuracy and balanced accuracy, a label-free collapse check.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from taskvec import experiment as ex
from taskvec.batching import seeded_subset
from taskvec.compose import Composer
from taskvec.evaluate import logit_scores, prediction_spread
from taskvec.norm_tuning import norm_affine_model, norm_label, norm_sgd
from taskvec.objectives import default_trusted_k, entropy, sar, simclr, trusted_set, ufm, unlabelled_selection
from taskvec.suites import Suite, add_suite_arguments, make_suite, suite_from_args
from taskvec.train import LossFn, TrainConfig, fit
from taskvec.workflow import DEFAULT_RESULTS, coefficient_summary


@dataclass(frozen=True)
class Objective:
    label: str
    make: Callable[[nn.Module, TTAConfig, Callable], LossFn]  # (frozen head, config, strength -> view) -> loss
    trusted: bool = False  # batches carry UFM's trusted stream


@dataclass(frozen=True)
class Tuned:
    label: Callable[[nn.Module], str]  # of the base: the baseline names the norm layers it tunes
    model: Callable[[nn.Module, Sequence], nn.Module]  # (base, vectors) -> what fit trains
    optimizer: Callable[[TTAConfig], tuple[float, Any]]  # -> (lr, optimizer factory, or None for AdamW)


OBJECTIVES: dict[str, Objective] = {
    "tent": Objective("Tent", lambda head, c, view: entropy(head)),
    "sar": Objective("SAR", lambda head, c, view: sar(head, e_margin=c.sar_margin, rho=c.sar_rho)),
    "simclr": Objective("SimCLR", lambda head, c, view: simclr(
        None if c.simclr_projection == "features" else head, view("strong"), c.simclr_temperature)),
    "ufm": Objective("UFM", lambda head, c, view: ufm(head, view("weak"), view("strong"), threshold=c.ufm_threshold),
                     trusted=True),
}
TUNED: dict[str, Tuned] = {
    "atlas": Tuned(lambda base: "aTLAS (block)", lambda base, vectors: Composer(base, vectors, "block", init=0.0),
                   lambda c: (c.atlas_lr, None)),
    "norm": Tuned(norm_label, lambda base, vectors: norm_affine_model(base),
                  lambda c: (c.norm_lr, norm_sgd(c.norm_lr, c.weight_decay) if c.norm_optimizer == "sgd" else None)),
}
PRETRAINED = ("pretrained_acc", "pretrained_balanced_acc")
_RUN_ONLY = ("targets", "objectives", "tuned", "seeds", "out", "resume", "progress")  # not in the fingerprint


def option(default: Any, help: str, **more: Any) -> Any:
    return field(default=default, metadata={"help": help, **more})


@dataclass
class TTAConfig:
    """What to run; defaults are fixed a priori (no test label ever chooses them)."""

    targets: tuple[str, ...] = option(("all",), "target tasks, or 'all' (every task of the suite)", min_items=1)
    objectives: tuple[str, ...] = option(tuple(OBJECTIVES), "objectives", choices=list(OBJECTIVES))
    tuned: tuple[str, ...] = option(tuple(TUNED), "what is trained", choices=list(TUNED))
    seeds: tuple[int, ...] = option((0,), "seeds", min_items=1)
    epochs: int = option(2, "adaptation epochs", min=1)
    batch_size: int = option(64, "inputs per batch", min=2)
    atlas_lr: float = option(1e-2, "coefficient learning rate (AdamW)", min=0.0)
    norm_lr: float = option(2.5e-4, "normalisation-affine learning rate", min=0.0)
    norm_optimizer: str = option("sgd", "norm-affine optimiser: SGD momentum 0.9 as Tent", choices=["sgd", "adamw"])
    weight_decay: float = option(0.0, "weight decay", min=0.0)
    selection: str = option("fixed", "last epoch, or lowest unlabelled objective", choices=["fixed", "objective"])
    max_inputs: int | None = option(None, "adapt on a seeded subset of this many test inputs; score all", min=2)
    sar_rho: float = option(0.05, "SAR: neighbourhood radius", min=0.0)
    sar_margin: float | None = option(None, "SAR: entropy margin (None: 0.4 ln C)")
    simclr_temperature: float = option(0.5, "SimCLR: NT-Xent temperature", min=1e-6)
    simclr_projection: str = option("features", "SimCLR embedding", choices=["features", "head"])
    ufm_threshold: float = option(0.99, "UFM: weak-view confidence that makes a pseudo-label (< 1)", min=0.0)
    trusted_k: int | None = option(None, "UFM: trusted inputs per class (None: aTLAS's min(N / C / 10, 100))", min=1)
    out: Path = field(default=DEFAULT_RESULTS / "tta", metadata={"help": "results directory"})
    resume: bool = option(True, "recompute runs already recorded under the same settings")
    progress: bool = option(True, "no progress bars")

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        ex.check_fields(self)
        if self.ufm_threshold >= 1:
            raise ValueError(f"TTAConfig.ufm_threshold must be below 1; got {self.ufm_threshold}")


def adapt(tuned: str, objective: str, base: nn.Module, vectors: Sequence, head: nn.Module, pool: Any, suite: Suite,
          config: TTAConfig, seed: int, trusted: tuple[Tensor, Tensor] | None) -> tuple[nn.Module, dict]:
    """Adapt on the unlabelled ``pool``; returns the adapted plain network and what training recorded."""
    model = TUNED[tuned].model(base, vectors)
    lr, factory = TUNED[tuned].optimizer(config)
    loss_fn = OBJECTIVES[objective].make(head, config, lambda s: lambda x: suite.augment_inputs(x, None, s))
    loader = suite.unlabelled_loader(pool, batch_size=config.batch_size,
                                     trusted=trusted if OBJECTIVES[objective].trusted else None)
    evaluate = unlabelled_selection(loss_fn, loader.epoch, seed) if config.selection == "objective" else None
    result = fit(model, loss_fn, loader, TrainConfig(
        epochs=config.epochs, lr=lr, weight_decay=config.weight_decay, warmup_fraction=0.0, seed=seed,
        train_mode=False, progress=config.progress, description=f"{tuned} + {objective}"),
        evaluate=evaluate, optimizer_factory=factory)
    detail: dict = {
        "best_epoch": result.best_epoch, "losses": [r.loss for r in result.history if r.epoch > 0],
        "selection_objective": None if evaluate is None else -float(result.best_metric),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer": f"SGD(lr={lr:g}, momentum=0.9)" if factory else f"AdamW(lr={lr:g})",
    }
    if not isinstance(model, Composer):
        return model.eval(), detail
    return model.merge(), detail | coefficient_summary(model)


def run_tta(config: TTAConfig | None = None, *, suite: Suite | None = None,
            scorer: Callable[[Tensor, Any], dict] = logit_scores) -> dict:
    """Every (target, seed, tuned part, objective); returns the payload written to ``<out>/tta.json``.
    ``scorer(logits, test split)`` is the only reader of test labels (tests inject a guard)."""
    config, started = config or TTAConfig(), time.perf_counter()
    suite = suite or make_suite("vision", progress=config.progress)
    tasks = tuple(suite.tasks)
    targets = tasks if config.targets == ("all",) else config.targets
    if not set(targets) <= set(tasks) or len(tasks) < 2:
        raise ValueError(f"targets {list(targets)} must be bank tasks of the {suite.name} suite {list(tasks)} "
                         "(a target's head comes from it; leave-one-out needs two tasks)")
    suite.build(tasks)  # type: ignore[union-attr]
    base = suite.backbone()
    labels = {f"{t}+{o}": f"{TUNED[t].label(base)} + {OBJECTIVES[o].label}" for t in TUNED for o in OBJECTIVES}
    settings = {k: v for k, v in asdict(config).items() if k not in _RUN_ONLY} | {"suite": suite.identity()}
    store = ex.RecordStore(config.out / "tta_records.jsonl", ex.fingerprint(settings), config.resume)

    @functools.cache
    def target_data(target: str) -> tuple:
        head, test = suite.head(target), suite.splits(target).test
        logits = suite.logits(base, head, suite.unlabelled(test))  # predictions made without labels...
        vectors = suite.vectors([t for t in tasks if t != target])
        return head, test, vectors, scorer(logits, test), prediction_spread(logits)  # ...scored here, once

    @functools.cache
    def adaptation_pool(target: str, seed: int) -> tuple:
        head, test = target_data(target)[:2]
        pool = seeded_subset(suite.unlabelled(test), config.max_inputs, seed)
        classes = (logits := suite.logits(base, head, pool)).shape[1]
        k = min(config.trusted_k or default_trusted_k(len(pool), classes), len(pool) // classes)
        return pool, trusted_set(logits, k), classes

    def run_job(job: Mapping[str, Any]) -> dict:
        (tuned, objective), (head, test, vectors, pre, spread) = job["method"].split("+"), target_data(job["target"])
        pool, trusted, classes = adaptation_pool(job["target"], job["seed"])
        tic = time.perf_counter()
        model, detail = adapt(tuned, objective, base, vectors, head, pool, suite, config, job["seed"], trusted)
        seconds, logits = time.perf_counter() - tic, suite.logits(model, head, suite.unlabelled(test))
        after = scorer(logits, test)
        return {**job, "key": job["method"], "tuned": tuned, "objective": objective, "method": labels[job["method"]],
                "classes": classes, "pretrained_acc": pre["acc"], "pretrained_balanced_acc": pre["balanced_acc"],
                "test_acc": after["acc"], "balanced_acc": after["balanced_acc"], "change": after["acc"] - pre["acc"],
                "balanced_change": after["balanced_acc"] - pre["balanced_acc"], "seconds": seconds,
                "adaptation_inputs": len(pool), "trusted_per_class": len(trusted[0]) // classes,
                "pretrained_spread": spread, "spread": prediction_spread(logits), "detail": detail}

    methods = [f"{t}+{o}" for t in TUNED if t in config.tuned for o in OBJECTIVES if o in config.objectives]
    records = ex.run_grid(ex.grid(target=targets, seed=config.seeds, method=methods), run_job, store)
    table, summary = report(records, targets, tasks, config, suite.name)
    change = summary["change"]
    plot = ex.plot_bars({m: 100 * per["average"]["mean"] for m, per in change.items()}, config.out / "tta_change.png",
                        points={m: {t: 100 * per[t]["mean"] for t in targets} for m, per in change.items()},
                        reference=0.0, ylabel="accuracy change from pre-trained (pp)", title=f"TTA on {suite.name}: "
                        "mean change over targets (points: per target)")
    payload: Any = ex.json_safe({
        "config": {**asdict(config), "targets": list(targets)}, "suite": suite.identity(),
        "pretrained": {r["target"]: r["pretrained_acc"] for r in records}, "records": records, "summary": summary,
        "plot": str(plot), "seconds": time.perf_counter() - started})
    json_path, md_path = ex.write_results(config.out, "tta", payload, table)
    return {**payload, "files": {"json": str(json_path), "markdown": str(md_path), "plot": str(plot)}, "table": table}


def report(records: Sequence[dict], targets: Sequence[str], tasks: Sequence[str], config: TTAConfig,
           suite_name: str) -> tuple[str, dict]:
    """The tables and their statistics ``summary[number][method][target or "average"]``: per target mean +-
    s.e. over seeds; the average is per seed the mean over targets, then mean +- s.e. over seeds."""
    methods, columns = list(dict.fromkeys(r["method"] for r in records)), [*targets, "average"]
    summary = ex.summarize_by_method(records, ["change", "test_acc", "balanced_acc", *PRETRAINED])

    def cell(key: str, method: str, column: str, sign: str = "") -> str:
        return ex.format_mean_se(summary[key][method].get(column), sign=sign)

    change_rows = [{"method": m, **{c: cell("change", m, c, "+") for c in columns},
                    "s/run": f"{ex.mean_se([r['seconds'] for r in records if r['method'] == m])[0]:.0f}"}
                   for m in methods]
    acc_rows = [{"method": name, **{c: f"{cell(acc, m, c)} ({cell(balanced, m, c)})" for c in columns}}
                for name, m, acc, balanced in [("pre-trained", methods[0], *PRETRAINED),
                                               *((m, m, "test_acc", "balanced_acc") for m in methods)]]
    spread_rows = [{"method": name, **{t: "{} · {:.2f}".format(
        min(s["classes_predicted"] for s in found), sum(s["marginal_entropy"] for s in found) / len(found))
        for t in targets if (found := [r[key] for r in records if r["target"] == t and m in (None, r["method"])])}}
        for name, m, key in [("pre-trained", None, "pretrained_spread"), *((m, m, "spread") for m in methods)]]
    classes = ", ".join(f"{t}: {next(r['classes'] for r in records if r['target'] == t)}" for t in targets)
    return "\n".join([
        f"Test-time adaptation on unlabelled test inputs ({', '.join(targets)}), {suite_name} suite, bank without "
        f"the target (leave-one-out over {list(tasks)}), target head from the suite. {config.epochs} epochs, batch "
        f"{config.batch_size}, lr {config.atlas_lr:g} (aTLAS) / {config.norm_lr:g} ({config.norm_optimizer}, norm "
        f"affine), selection: {config.selection} (no labels); seeds {list(config.seeds)}; adaptation inputs per "
        f"target {sorted({r['adaptation_inputs'] for r in records})}."
        + ("" if set(targets) == set(tasks) else f" **Subset of targets** (all: `--targets {' '.join(tasks)}`)."),
        "", "Accuracy change from the pre-trained model (percentage points; ± s.e. over seeds when > 1):", "",
        ex.markdown_table(change_rows, ["method", *columns, "s/run"]), "",
        "Test accuracy (%), balanced accuracy (%) in parentheses:", "",
        ex.markdown_table(acc_rows, ["method", *columns]), "",
        f"Label-free collapse check on the test inputs: classes predicted (fewest over seeds; of {classes}) · "
        "entropy of the mean prediction / ln C (1 = balanced):", "",
        ex.markdown_table(spread_rows, ["method", *targets]),
    ]), summary


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run tta``: options generated from :class:`TTAConfig`, plus ``--suite`` / ``--bank-root``."""
    parser = subparsers.add_parser(
        "tta", help="test-time adaptation: aTLAS coefficients vs norm affine with Tent/SAR/SimCLR/UFM (no labels)",
        description="Unsupervised adaptation on each target's unlabelled test inputs; bank without the target.")
    ex.add_config_arguments(parser, TTAConfig, names={"progress": "--quiet", "resume": "--no-resume"})
    add_suite_arguments(parser)
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    config = ex.config_from_args(TTAConfig, args)
    result = run_tta(config, suite=suite_from_args(args, progress=config.progress))
    files = result["files"]
    print(f"{result['table']}\n\nresults: {files['json']}\ntable:   {files['markdown']}\nplot:    {files['plot']}\n"
          f"total {result['seconds']:.0f} s")
    return 0
