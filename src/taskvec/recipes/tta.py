"""Test-time adaptation (aTLAS section 4.3) as a recipe: unlabelled test inputs only.

For each target task the bank holds the *other* tasks' vectors (leave-one-out, as aTLAS's TTA code
removes the target's own vector: a vector fine-tuned on the target's labels would be label leakage),
and the target's frozen head comes from the bank. The adaptation data are the target's test images
without their labels (transductive, as Tent and aTLAS); the labels are read once, by :func:`score`,
for the final accuracy and for nothing else.

What is trained (keys for ``--tuned``):

- ``atlas``: aTLAS block coefficients (one per parameter block per vector, init 0), base frozen.
- ``norm``: the Tent-style baseline, only the normalisation layers' affine parameters (BatchNorm
  weight and bias), with their running statistics frozen (the network stays in eval mode), trained
  as Tent and SAR do on ImageNet: SGD, momentum 0.9, lr 2.5e-4 at batch 64. (AdamW at 1e-3, the first
  choice here, moves every one of MobileNetV2's small BN scales, median 0.18, by the same step and
  collapsed the predictions to one class within an epoch; ``norm_optimizer="adamw"`` keeps it.)

Objectives (keys for ``--objectives``), all from :mod:`taskvec.objectives`:

- ``tent``: mean prediction entropy (Tent) on the un-augmented inputs.
- ``sar``: sharpness-aware minimisation of the reliable (low-entropy) samples' entropy (SAR).
- ``simclr``: NT-Xent between two strongly augmented views. The embedding is the backbone's
  features themselves (``simclr_projection="features"``): the frozen head's logits are only C numbers,
  too few for a contrastive embedding, and a learned projection would add parameters that the
  methods do not share. ``"head"`` switches to the logits.
- ``ufm``: unsupervised FixMatch. The trusted set (the most confident ``k`` samples per class,
  :func:`~taskvec.objectives.trusted_set`) is computed once from the pre-trained model; each batch is
  half untrusted and half trusted samples (aTLAS's two-stream sampler); the weakly augmented view's
  prediction supervises the strongly augmented view, trusted samples use their fixed pseudo-label.

Model selection cannot use labels. ``selection="fixed"`` (default) keeps the last of a fixed number of
epochs; ``"objective"`` keeps the epoch (or the untouched start) with the lowest objective on the
unlabelled inputs, measured in a fixed-seed pass. (aTLAS's released TTA code keeps the epoch with the
best *test* accuracy; this recipe does not.) Learning rates are fixed a priori, not tuned on any
test data: AdamW at 1e-2 for coefficients (the paper's few-shot 0.1 is for tens of steps with
labels; an unsupervised objective drifts, so ten times smaller) and Tent's SGD for the affines.

Collapse is visible without labels: every run records how many classes the adapted model still
predicts on the test inputs and the normalised entropy of its mean prediction (1 = balanced).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from taskvec.bank import DEFAULT_TASKS, Bank, BankConfig
from taskvec.batching import unlabelled, unlabelled_loader
from taskvec.compose import Composer
from taskvec.data import augment
from taskvec.evaluate import logits as predict
from taskvec.evaluate import score
from taskvec.experiment import RecordStore, fingerprint, json_safe, mean_se
from taskvec.norm_tuning import norm_affine_model, norm_sgd
from taskvec.objectives import default_trusted_k, entropy, sar, simclr, trusted_set, ufm
from taskvec.report import markdown_table, write_results
from taskvec.train import Loader, LossFn, TrainConfig, fit
from taskvec.workflow import DEFAULT_RESULTS, bank_and_norm

OBJECTIVES: dict[str, str] = {"tent": "Tent", "sar": "SAR", "simclr": "SimCLR", "ufm": "UFM"}
TUNED: dict[str, str] = {"atlas": "aTLAS (block)", "norm": "BN affine"}
# Sized for a 2-core CPU (about 15 minutes); --targets all runs the six.
DEFAULT_TTA_TARGETS = ("fashion_mnist", "digits", "emoji_twitter")


@dataclass
class TTAConfig:
    """What to run; defaults are fixed a priori (no test labels are ever used to choose them)."""

    targets: tuple[str, ...] = DEFAULT_TTA_TARGETS
    objectives: tuple[str, ...] = tuple(OBJECTIVES)
    tuned: tuple[str, ...] = tuple(TUNED)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 2
    batch_size: int = 64
    atlas_lr: float = 1e-2
    norm_lr: float = 2.5e-4
    norm_optimizer: str = "sgd"  # "sgd" (momentum 0.9, Tent/SAR) or "adamw"
    weight_decay: float = 0.0
    selection: str = "fixed"  # "fixed" (last epoch) or "objective" (lowest unlabelled objective)
    max_inputs: int | None = None  # adapt on a seeded subset of the test inputs; evaluate on all of them
    sar_rho: float = 0.05
    sar_margin: float | None = None  # None: 0.4 ln C (SAR's default)
    simclr_temperature: float = 0.5
    simclr_projection: str = "features"  # or "head"
    ufm_threshold: float = 0.99
    trusted_k: int | None = None  # None: aTLAS's min(N / C / 10, 100)
    bank: BankConfig = field(default_factory=BankConfig)
    out: Path = DEFAULT_RESULTS / "tta"
    resume: bool = True
    progress: bool = True


def method_name(tuned: str, objective: str) -> str:
    return f"{TUNED[tuned]} + {OBJECTIVES[objective]}"


# ----------------------------------------------------------------------------------------------
# Objectives and what they train
# ----------------------------------------------------------------------------------------------


def make_objective(name: str, head: nn.Module, config: TTAConfig, norm: dict) -> LossFn:
    """The loss for ``name``; augmentations draw from torch's global generator, which ``fit`` reseeds
    every epoch, so runs are reproducible."""

    def weak(x: Tensor) -> Tensor:
        return augment(x, None, "weak", **norm)

    def strong(x: Tensor) -> Tensor:
        return augment(x, None, "strong", **norm)

    if name == "tent":
        return entropy(head)
    if name == "sar":
        return sar(head, e_margin=config.sar_margin, rho=config.sar_rho)
    if name == "simclr":
        if config.simclr_projection not in ("features", "head"):
            raise ValueError(f"simclr_projection must be 'features' or 'head'; got {config.simclr_projection!r}")
        return simclr(None if config.simclr_projection == "features" else head, strong, config.simclr_temperature)
    if name == "ufm":
        return ufm(head, weak, strong, threshold=config.ufm_threshold)
    raise ValueError(f"unknown TTA objective {name!r}; choose from {list(OBJECTIVES)}")


def _objective_score(loss_fn: LossFn, loader: Loader, seed: int):
    """Model selection without labels: minus the mean objective over a fixed-seed pass of the inputs."""

    def evaluate(model: nn.Module) -> float:
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            values = [float(loss_fn(model, batch).detach()) for batch in loader.epoch(generator)]
        return -sum(values) / len(values)

    return evaluate


def adapt(
    tuned: str, objective: str, base: nn.Module, vectors: Sequence, head: nn.Module, images: Tensor,
    resolution: int, norm: dict, config: TTAConfig, seed: int, trusted: tuple[Tensor, Tensor] | None,
) -> tuple[nn.Module, dict]:
    """Adapt on unlabelled ``images``; returns the adapted plain network and what training recorded."""
    if tuned == "atlas":
        model: nn.Module = Composer(base, vectors, "block", init=0.0)
        lr = config.atlas_lr
    elif tuned == "norm":
        model = norm_affine_model(base)
        lr = config.norm_lr
    else:
        raise ValueError(f"unknown tuned part {tuned!r}; choose from {list(TUNED)}")
    factory = None
    if tuned == "norm" and config.norm_optimizer == "sgd":
        factory = norm_sgd(lr, config.weight_decay)
    elif tuned == "norm" and config.norm_optimizer != "adamw":
        raise ValueError(f"norm_optimizer must be 'sgd' or 'adamw'; got {config.norm_optimizer!r}")
    loss_fn = make_objective(objective, head, config, norm)
    loader = unlabelled_loader(images, resolution, norm, config.batch_size, trusted if objective == "ufm" else None)
    if config.selection not in ("fixed", "objective"):
        raise ValueError(f"selection must be 'fixed' or 'objective'; got {config.selection!r}")
    evaluate = _objective_score(loss_fn, loader, seed) if config.selection == "objective" else None
    result = fit(
        model, loss_fn, loader,
        TrainConfig(epochs=config.epochs, lr=lr, weight_decay=config.weight_decay, warmup_fraction=0.0, seed=seed,
                    train_mode=False, progress=config.progress, description=method_name(tuned, objective)),
        evaluate=evaluate,
        optimizer_factory=factory,
    )
    detail: dict = {
        "best_epoch": result.best_epoch,
        "losses": [record.loss for record in result.history if record.epoch > 0],
        "selection_objective": None if evaluate is None else -float(result.best_metric),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer": f"SGD(lr={lr:g}, momentum=0.9)" if factory else f"AdamW(lr={lr:g})",
    }
    if isinstance(model, Composer):
        coefficients = model.coefficients.detach()
        detail["mean_coefficient_per_vector"] = dict(
            zip(model.vector_names, coefficients.mean(1).tolist(), strict=True))
        detail["max_abs_coefficient"] = float(coefficients.abs().max())
        return model.merge(), detail
    return model.eval(), detail


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def prediction_spread(logits: Tensor) -> dict:
    """Label-free collapse check: classes predicted at least once, and the entropy of the mean
    prediction over ln C (1 = every class equally likely on average, 0 = one class)."""
    classes = logits.shape[-1]
    mean = logits.float().softmax(-1).mean(0)
    marginal = float(-(mean * mean.clamp_min(1e-12).log()).sum()) / math.log(classes)
    return {"classes_predicted": int(logits.argmax(-1).unique().numel()), "marginal_entropy": marginal}


def _fingerprint(config: TTAConfig, bank: Bank) -> str:
    settings = {k: v for k, v in asdict(config).items() if k not in ("targets", "objectives", "tuned", "seeds",
                                                                     "out", "resume", "progress")}
    settings["bank"] = str(bank.root)
    return fingerprint(settings)


def _check(config: TTAConfig, tasks: Sequence[str]) -> None:
    for what, given, allowed in (("objectives", config.objectives, OBJECTIVES), ("tuned", config.tuned, TUNED)):
        unknown = [x for x in given if x not in allowed]
        if unknown or not given:
            raise ValueError(f"TTA {what}: {list(given)} is not a non-empty subset of {list(allowed)}")
    missing = [t for t in config.targets if t not in tasks]
    if missing or not config.targets:
        raise ValueError(f"targets {missing or '[]'} must be bank tasks {list(tasks)}: a target's head comes from it")
    if len(tasks) < 2:
        raise ValueError(f"leave-one-out needs at least two bank tasks; got {list(tasks)}")
    if config.epochs < 1 or not config.seeds:
        raise ValueError("TTA needs epochs >= 1 and at least one seed")


def _adaptation_inputs(images: Tensor, max_inputs: int | None, seed: int) -> Tensor:
    if max_inputs is None or max_inputs >= len(images):
        return images
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_inputs]
    return images[pick.sort().values]


def run_tta(config: TTAConfig | None = None, *, bank: Bank | None = None, tasks: Sequence[str] = DEFAULT_TASKS) -> dict:
    """Run every (target, tuned part, objective, seed); returns the payload written to ``<out>/tta.json``."""
    config = config or TTAConfig()
    tasks = tuple(tasks)
    _check(config, tasks)
    started = time.perf_counter()
    bank = bank or Bank(config.bank)
    bank.build(tasks, progress=config.progress)
    base, norm, resolution = bank_and_norm(bank)
    out = Path(config.out)
    store = RecordStore(out / "tta_records.jsonl", _fingerprint(config, bank), config.resume)
    methods = [(t, o) for t in TUNED if t in config.tuned for o in OBJECTIVES if o in config.objectives]

    records: list[dict] = []
    pretrained: dict[str, float] = {}
    spread: dict[str, dict] = {}
    bar = tqdm(total=len(config.targets) * len(methods) * len(config.seeds), desc="TTA runs",
               disable=not config.progress)
    for target in config.targets:
        task = bank.loader(target, seed=bank.config.seed)
        head = bank.head(target).freeze()
        vectors = bank.vectors([name for name in tasks if name != target])
        evaluation = unlabelled(task.test.images)  # predictions are made without labels...
        pre_logits = predict(base, head, evaluation, resolution, **norm)
        pretrained[target] = score(pre_logits, task.test)  # ...and scored here, once
        spread[target] = prediction_spread(pre_logits)
        for seed in config.seeds:
            images = _adaptation_inputs(task.test.images, config.max_inputs, seed)
            pool_logits = predict(base, head, unlabelled(images), resolution, **norm)
            k = config.trusted_k or default_trusted_k(len(images), task.num_classes)
            trusted = trusted_set(pool_logits, min(k, len(images) // task.num_classes))
            for tuned, objective in methods:
                job = f"{target}/{tuned}/{objective}/{seed}"
                done = store.get_methods(job, [method_name(tuned, objective)])
                if done is None:
                    bar.set_postfix(target=target, method=f"{tuned}+{objective}")
                    tic = time.perf_counter()
                    model, detail = adapt(tuned, objective, base, vectors, head, images, resolution, norm,
                                          config, seed, trusted)
                    seconds = time.perf_counter() - tic
                    adapted_logits = predict(model, head, evaluation, resolution, **norm)
                    test_acc = score(adapted_logits, task.test)
                    done = [{
                        "target": target, "tuned": tuned, "objective": objective, "seed": seed,
                        "method": method_name(tuned, objective), "pretrained_acc": pretrained[target],
                        "test_acc": test_acc, "change": test_acc - pretrained[target], "seconds": seconds,
                        "adaptation_inputs": len(images), "trusted_per_class": int(len(trusted[0]) // task.num_classes),
                        "classes": task.num_classes, "pretrained_spread": spread[target],
                        "spread": prediction_spread(adapted_logits),
                        "detail": detail,
                    }]
                    store.put(job, done)
                records.extend(done)
                bar.update()
    bar.close()

    summary = summarize_tta(records, config.targets)
    table = _tables(summary, records, pretrained, config, bank, resolution, tasks)
    plot = plot_changes(summary, config.targets, out / "tta_change.png")
    payload = {
        "config": {**asdict(config), "out": str(config.out), "tasks": list(tasks)},
        "bank": {"root": str(bank.root), "entries": bank.table()},
        "pretrained": pretrained,
        "records": records,
        "summary": summary,
        "plot": str(plot),
        "seconds": time.perf_counter() - started,
    }
    payload = json_safe(payload)
    json_path, md_path = write_results(out, "tta", payload, table)
    payload["files"] = {"json": str(json_path), "markdown": str(md_path), "plot": str(plot)}
    payload["table"] = table
    return payload


def summarize_tta(records: Sequence[dict], targets: Sequence[str]) -> list[dict]:
    """Per method: accuracy and change per target (mean +- s.e. over seeds) and on average (per seed the
    mean over targets, then mean +- s.e. over seeds), and mean seconds per run."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        row: dict = {"method": method, "per_target": {}}
        for target in targets:
            rs = [r for r in mine if r["target"] == target]
            if rs:
                row["per_target"][target] = {
                    "acc": mean_se([r["test_acc"] for r in rs]), "change": mean_se([r["change"] for r in rs])}
        seeds = sorted({r["seed"] for r in mine})
        per_seed = {"acc": [], "change": []}
        for seed in seeds:
            rs = [r for r in mine if r["seed"] == seed]
            if {r["target"] for r in rs} == set(targets):
                for key, field_name in (("acc", "test_acc"), ("change", "change")):
                    per_seed[key].append(sum(r[field_name] for r in rs) / len(rs))
        row["average"] = {key: mean_se(values) for key, values in per_seed.items()}
        row["mean_seconds"] = sum(r["seconds"] for r in mine) / len(mine)
        rows.append(row)
    return rows


def _cell(pair: Sequence[float], signed: bool = False) -> str:
    mean, se = pair
    if mean != mean:
        return ""
    text = f"{100 * mean:{'+' if signed else ''}.1f}"
    return text if se != se else f"{text} ± {100 * se:.1f}"


def _tables(summary, records, pretrained, config: TTAConfig, bank: Bank, resolution: int, tasks) -> str:
    targets = list(config.targets)
    seeds = sorted({r["seed"] for r in records})
    inputs = sorted({r["adaptation_inputs"] for r in records})
    full = set(targets) == set(tasks)
    header = (
        f"Test-time adaptation on unlabelled test inputs ({', '.join(targets)}), bank without the target "
        f"(leave-one-out over {list(tasks)}) on {bank.config.backbone} @ {resolution}px, target head from the bank. "
        f"{config.epochs} epochs, batch {config.batch_size}, lr {config.atlas_lr:g} (aTLAS) / {config.norm_lr:g} "
        f"(BN affine), selection: {config.selection} (no labels); seeds {seeds}; adaptation inputs per target "
        f"{inputs}." + ("" if full else f" **Subset of targets** (all: `--targets {' '.join(tasks)}`).")
    )
    change_rows, acc_rows = [], [{"method": "pre-trained", **{t: f"{100 * pretrained[t]:.1f}" for t in targets},
                                  "average": f"{100 * sum(pretrained[t] for t in targets) / len(targets):.1f}"}]
    for row in summary:
        per = row["per_target"]
        change_rows.append({"method": row["method"], **{t: _cell(per[t]["change"], True) for t in per},
                            "average": _cell(row["average"]["change"], True), "s/run": f"{row['mean_seconds']:.0f}"})
        acc_rows.append({"method": row["method"], **{t: _cell(per[t]["acc"]) for t in per},
                         "average": _cell(row["average"]["acc"])})
    spread_rows = [{"method": "pre-trained", **{
        t: _spread_cell([r["pretrained_spread"] for r in records if r["target"] == t][:1]) for t in targets}}]
    for row in summary:
        spread_rows.append({"method": row["method"], **{
            t: _spread_cell([r["spread"] for r in records if r["target"] == t and r["method"] == row["method"]])
            for t in targets}})
    classes = {t: next(r["classes"] for r in records if r["target"] == t) for t in targets}
    return "\n".join([
        header, "", "Accuracy change from the pre-trained model (percentage points; ± s.e. over seeds when > 1):", "",
        markdown_table(change_rows, ["method", *targets, "average", "s/run"]), "", "Test accuracy (%):", "",
        markdown_table(acc_rows, ["method", *targets, "average"]), "",
        "Label-free collapse check on the test inputs: classes predicted (fewest over seeds; of "
        + ", ".join(f"{t}: {c}" for t, c in classes.items())
        + ") · entropy of the mean prediction / ln C (1 = balanced):", "",
        markdown_table(spread_rows, ["method", *targets]),
    ])


def _spread_cell(spreads: Sequence[dict]) -> str:
    if not spreads:
        return ""
    fewest = min(s["classes_predicted"] for s in spreads)
    entropy_ = sum(s["marginal_entropy"] for s in spreads) / len(spreads)
    return f"{fewest} · {entropy_:.2f}"


def plot_changes(summary: Sequence[dict], targets: Sequence[str], path: Path) -> Path:
    """Grouped bars: accuracy change per target (and on average) for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from taskvec.report import _save_figure

    groups = [*targets, "average"]
    figure, axis = plt.subplots(figsize=(max(6.5, 1.3 * len(groups) + 2), 4.2))
    width = 0.8 / max(1, len(summary))
    for i, row in enumerate(summary):
        values = [row["per_target"].get(t, {"change": (math.nan, math.nan)})["change"][0] for t in targets]
        values.append(row["average"]["change"][0])
        positions = [g + (i - (len(summary) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, [100 * v for v in values], width, label=row["method"])
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    axis.set_ylabel("accuracy change (pp)")
    axis.set_title("Test-time adaptation: change from the pre-trained model")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    try:
        return _save_figure(figure, Path(path))
    finally:
        plt.close(figure)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run tta``."""
    defaults = TTAConfig()
    parser = subparsers.add_parser(
        "tta",
        help="test-time adaptation: aTLAS coefficients vs BN affine with Tent/SAR/SimCLR/UFM (no labels)",
        description="Unsupervised adaptation on each target's unlabelled test inputs; bank without the target. "
        f"Default targets (sized for a 2-core CPU): {' '.join(DEFAULT_TTA_TARGETS)}; --targets all runs the six.",
    )
    add = parser.add_argument
    add("--targets", nargs="+", default=list(DEFAULT_TTA_TARGETS), help="target tasks, or 'all' (default: %(default)s)")
    add("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES), help="(default: all)")
    add("--tuned", nargs="+", default=list(TUNED), choices=list(TUNED), help="what is trained (default: both)")
    add("--seeds", nargs="+", type=int, default=list(defaults.seeds), help="seeds (default: %(default)s)")
    add("--epochs", type=int, default=defaults.epochs, help="adaptation epochs (default: %(default)s)")
    add("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    add("--atlas-lr", type=float, default=defaults.atlas_lr, help="coefficient learning rate (default: %(default)s)")
    add("--norm-lr", type=float, default=defaults.norm_lr, help="BN affine learning rate (default: %(default)s)")
    add("--norm-optimizer", choices=("sgd", "adamw"), default=defaults.norm_optimizer,
        help="BN affine optimiser: SGD momentum 0.9 as Tent/SAR, or AdamW (default: %(default)s)")
    add("--selection", choices=("fixed", "objective"), default=defaults.selection,
        help="last epoch, or lowest unlabelled objective (default: %(default)s)")
    add("--max-inputs", type=int, default=None, help="adapt on at most this many test inputs (default: all)")
    add("--simclr-projection", choices=("features", "head"), default=defaults.simclr_projection)
    add("--ufm-threshold", type=float, default=defaults.ufm_threshold,
        help="UFM: weak-view confidence above which an untrusted sample is pseudo-labelled (default: %(default)s)")
    add("--trusted-k", type=int, default=None,
        help="UFM: trusted samples per class (default: aTLAS's min(N / C / 10, 100))")
    add("--bank-root", type=Path, default=None, help="bank directory (default: the standard bank in the cache)")
    add("--out", type=Path, default=DEFAULT_RESULTS / "tta", help="results directory (default: %(default)s)")
    add("--no-resume", action="store_true", help="recompute runs already recorded under the same settings")
    add("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    targets = tuple(DEFAULT_TASKS) if args.targets == ["all"] else tuple(args.targets)
    config = TTAConfig(
        targets=targets, objectives=tuple(args.objectives), tuned=tuple(args.tuned), seeds=tuple(args.seeds),
        epochs=args.epochs, batch_size=args.batch_size, atlas_lr=args.atlas_lr, norm_lr=args.norm_lr,
        norm_optimizer=args.norm_optimizer,
        selection=args.selection, max_inputs=args.max_inputs, simclr_projection=args.simclr_projection,
        ufm_threshold=args.ufm_threshold, trusted_k=args.trusted_k,
        out=args.out, resume=not args.no_resume, progress=not args.quiet,
    )
    bank = Bank(config.bank, root=args.bank_root) if args.bank_root else None
    result = run_tta(config, bank=bank)
    print(result["table"])
    print(f"\nresults: {result['files']['json']}\ntable:   {result['files']['markdown']}")
    print(f"plot:    {result['files']['plot']}\ntotal {result['seconds']:.0f} s")
    return 0
