"""Few-shot adaptation (aTLAS section 4.2) as a recipe: every target outside the bank, k shots per class.

For each target task t the bank is the other tasks' vectors (leave-one-out), and t's frozen head
comes from the bank (it plays CLIP's zero-shot head). By default that is t's own head, a probe fitted on
t's whole training split and so stronger than any zero-shot head; ``head_from="auto"`` scores t through
a same-class partner's head where there is one (Emoji-Twitter <-> Emoji-Google), which never saw a t
label (:func:`~taskvec.workflow.resolve_head`). For each k and seed, ``few_shot_split`` draws k
labelled images per class from t's validation split (``few_shot_pool``: the head was fitted on the
training split, so those images are not few-shot data) and holds out a quarter of them (k >= 2) for
model selection; every method trains on the same training shots and selects on the same selection
shots, and nothing ever looks at the target's other labels before the final evaluation. Selection is
by accuracy on the selection shots with ties broken by their cross-entropy (:func:`selection_metric`).
With k = 1 there is no selection split: fixed epochs (the last is kept) and fixed default
hyper-parameters.

Methods (keys for ``--methods``):

- ``pretrained``: the pre-trained backbone with the bank's head (no shots used; a reference row).
- ``probe``: a linear probe on frozen pre-trained features of the training shots; weight decay chosen
  on the selection shots.
- ``tip``: Tip-Adapter (training-free cache on the bank head); alpha and beta searched on the selection
  shots.
- ``lpp``: LP++ (linear probe blended with the bank head, step sizes from Lipschitz bounds; nothing
  to select).
- ``finetune``: the whole backbone fine-tuned through the bank head, BatchNorm statistics frozen,
  epoch chosen on the selection shots.
- ``atlas``: aTLAS, one coefficient per parameter block per vector, epoch chosen on the selection shots.
- ``atlas_tip`` / ``atlas_lpp``: Tip-Adapter / LP++ fitted afterwards on features of the aTLAS-merged
  backbone (sequential, as the aTLAS paper does).

The probe-type methods run on features extracted once (pre-trained test features once per target);
only aTLAS and full fine-tuning train through the backbone.

Out-of-distribution: aTLAS learned on ``ood_source`` shots (Emoji-Google) is tested on ``ood_target``
(Emoji-Twitter, same classes, same head), with both tasks' vectors left out of the bank so that no
vector has seen either drawing style.

Uncertainty: for every (method, k), the accuracy averaged over targets is computed per seed, and the
table reports the mean over seeds with its standard error (sample std / sqrt(seeds)).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from taskvec.bank import DEFAULT_TASKS, Bank, BankConfig
from taskvec.data import ImageSet
from taskvec.evaluate import features, score, selection_metric
from taskvec.experiment import RecordStore, fingerprint, json_safe, mean_se, summarize
from taskvec.heads import LPPlusPlus, TipAdapter, fit_linear_head, tip_adapter_search
from taskvec.report import markdown_table, plot_lines, write_results
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import (
    DEFAULT_RESULTS,
    CoefficientSchedule,
    bank_and_norm,
    few_shot_pool,
    few_shot_split,
    learn_atlas,
    resolve_head,
    scoring_head,
    train_through_backbone,
)

METHODS: dict[str, str] = {
    "pretrained": "pre-trained + bank head",
    "probe": "linear probe",
    "tip": "Tip-Adapter",
    "lpp": "LP++",
    "finetune": "full fine-tuning",
    "atlas": "aTLAS (block)",
    "atlas_tip": "aTLAS + Tip-Adapter",
    "atlas_lpp": "aTLAS + LP++",
}
ATLAS_FAMILY = ("atlas", "atlas_tip", "atlas_lpp")
ALL_SHOTS = (1, 2, 4, 8, 16)
# Sized for a 2-core CPU (about 15 minutes: ~40 s per (target, k, seed) job, 18 jobs + OOD): a grayscale
# and a colour target, three k values, three seeds. The full grid is 90 jobs.
DEFAULT_TARGETS = ("fashion_mnist", "emoji_twitter")
DEFAULT_SHOTS = (1, 4, 16)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_PROBE_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class FewShotConfig:
    """What to run; the defaults are a subset of the full grid sized for a 2-core CPU."""

    targets: tuple[str, ...] = DEFAULT_TARGETS
    shots: tuple[int, ...] = DEFAULT_SHOTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    methods: tuple[str, ...] = tuple(METHODS)
    schedule: CoefficientSchedule = field(default_factory=CoefficientSchedule)  # aTLAS: init 0, lr 0.1
    finetune_lr: float = 1e-4  # the bank's own fine-tuning rate
    probe_decays: tuple[float, ...] = DEFAULT_PROBE_DECAYS
    probe_default_decay: float = 1e-4  # k = 1 (nothing to select on): fit_linear_head's default
    lpp_iterations: int = 300
    ood: bool = True
    ood_source: str = "emoji_google"
    ood_target: str = "emoji_twitter"
    ood_shots: tuple[int, ...] = (16,)
    head_from: str = "own"  # "own", "auto" (a same-class partner's head where there is one) or a task name
    bank: BankConfig = field(default_factory=BankConfig)
    out: Path = DEFAULT_RESULTS / "fewshot"
    resume: bool = True  # reuse finished (target, k, seed) jobs recorded under the same settings
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# Statistics and tables
# ----------------------------------------------------------------------------------------------


def _cell(mean: float, se: float, scale: float = 100.0, signed: bool = False) -> str:
    if mean != mean:
        return ""
    sign = "+" if signed else ""
    text = f"{scale * mean:{sign}.1f}"
    return text if se != se else f"{text} ± {scale * se:.1f}"


def _grid_table(rows: Sequence[dict], methods: Sequence[str], shots: Sequence[int]) -> str:
    """methods x k, cells 'mean ± s.e.' in % accuracy."""
    lookup = {(r["method"], r["k"]): r for r in rows}
    out = []
    for method in methods:
        row = {"method": METHODS.get(method, method)}
        for k in shots:
            r = lookup.get((method, k))
            row[f"k={k}"] = _cell(r["mean"], r["se"]) if r else ""
        out.append(row)
    return markdown_table(out, ["method", *[f"k={k}" for k in shots]])


# ----------------------------------------------------------------------------------------------
# The pieces of one (target, k, seed) job
# ----------------------------------------------------------------------------------------------


@dataclass
class _Features:
    """Features of one backbone on the training shots, the selection shots and the test split."""

    train: Tensor
    val: Tensor | None
    test: Tensor | None = None


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    tic = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - tic


def _probe(feats: _Features, train: ImageSet, val: ImageSet | None, classes: int, config: FewShotConfig):
    """Linear probe; weight decay selected on the selection shots (the first best wins)."""
    if val is None:
        head = fit_linear_head(feats.train, train.labels, classes, weight_decay=config.probe_default_decay)
        return head, None, {"weight_decay": config.probe_default_decay}
    best = None
    for decay in config.probe_decays:
        head = fit_linear_head(feats.train, train.labels, classes, weight_decay=decay)
        metric = selection_metric(head(feats.val), val)
        if best is None or metric > best[1]:
            best = (head, metric, decay)
    assert best is not None
    return best[0], score(best[0](feats.val), val), {"weight_decay": best[2]}


def _tip(feats: _Features, train: ImageSet, val: ImageSet | None, head: nn.Module):
    """Tip-Adapter on the training shots; (alpha, beta) searched on the selection shots, defaults at k = 1."""
    if val is None:
        adapter = TipAdapter(feats.train, train.labels, head, num_classes=_classes(head, feats.train))
        return adapter, None, {"alpha": adapter.alpha, "beta": adapter.beta}
    adapter, _ = tip_adapter_search(feats.train, train.labels, head, feats.val, val.labels)
    return adapter, score(adapter(feats.val), val), {"alpha": adapter.alpha, "beta": adapter.beta}


def _lpp(feats: _Features, train: ImageSet, val: ImageSet | None, head: nn.Module, iterations: int):
    model = LPPlusPlus.fit(feats.train, train.labels, head, iterations=iterations)
    metric = None if val is None else score(model(feats.val), val)
    return model, metric, {"final_loss": model.train_losses[-1]}


def _classes(head: nn.Module, some_features: Tensor) -> int:
    with torch.no_grad():
        return int(head(some_features[:1]).shape[-1])


def _extract(model: nn.Module, train: ImageSet, val: ImageSet | None, resolution: int, norm: dict) -> _Features:
    return _Features(
        features(model, train, resolution, **norm), None if val is None else features(model, val, resolution, **norm)
    )


def _finetune(
    base: nn.Module, head: nn.Module, train: ImageSet, val: ImageSet | None, resolution: int, norm: dict,
    config: FewShotConfig, seed: int,
) -> tuple[nn.Module, float | None, dict]:
    """The whole backbone through the frozen head, BatchNorm statistics frozen; epoch chosen on ``val``."""
    model = copy.deepcopy(base).requires_grad_(True)
    selection, detail = train_through_backbone(model, head, train, val, VisionSuite.for_images(resolution, norm),
                                               config.schedule, seed,
                                               config.finetune_lr, "full fine-tuning", config.progress)
    return model.eval(), selection, detail


def run_job(
    base: nn.Module, vectors: Sequence, head: nn.Module, task, k: int, seed: int, methods: Sequence[str],
    resolution: int, norm: dict, config: FewShotConfig, test_pretrained: Tensor,
) -> list[dict]:
    """All requested methods for one (target, k, seed): one record per method."""
    train, val = few_shot_split(few_shot_pool(task), k, seed)
    classes = task.num_classes
    records: list[dict] = []

    def record(method: str, logits: Tensor, selection: float | None, seconds: float, detail: dict) -> None:
        records.append({"target": task.name, "k": k, "seed": seed, "method": method,
                        "test_acc": score(logits, task.test), "selection_acc": selection,
                        "seconds": seconds, "train_images": len(train),
                        "selection_images": 0 if val is None else len(val), "detail": detail})

    with torch.no_grad():
        if "pretrained" in methods:
            record("pretrained", head(test_pretrained), None, 0.0, {})
        probe_like = [m for m in ("probe", "tip", "lpp") if m in methods]
        if probe_like:
            feats, extract_seconds = _timed(lambda: _extract(base, train, val, resolution, norm))
            fitters = {
                "probe": lambda: _probe(feats, train, val, classes, config),
                "tip": lambda: _tip(feats, train, val, head),
                "lpp": lambda: _lpp(feats, train, val, head, config.lpp_iterations),
            }
            for method in probe_like:
                with torch.enable_grad():
                    (model, selection, detail), seconds = _timed(fitters[method])
                record(method, model(test_pretrained), selection, seconds + extract_seconds, detail)

    if "finetune" in methods:
        (model, selection, detail), seconds = _timed(
            lambda: _finetune(base, head, train, val, resolution, norm, config, seed))
        record("finetune", head(features(model, task.test, resolution, **norm)), selection, seconds, detail)

    if any(m in methods for m in ATLAS_FAMILY):
        (merged, selection, detail), seconds = _timed(
            lambda: learn_atlas(base, vectors, head, train, val, VisionSuite.for_images(resolution, norm),
                                config.schedule, seed, progress=config.progress))
        test_merged = features(merged, task.test, resolution, **norm)
        if "atlas" in methods:
            record("atlas", head(test_merged), selection, seconds, detail)
        adapters = [m for m in ("atlas_tip", "atlas_lpp") if m in methods]
        if adapters:
            feats, extract_seconds = _timed(lambda: _extract(merged, train, val, resolution, norm))
            for method in adapters:
                if method == "atlas_tip":
                    (model, sel, extra), fit_seconds = _timed(lambda: _tip(feats, train, val, head))
                else:
                    (model, sel, extra), fit_seconds = _timed(
                        lambda: _lpp(feats, train, val, head, config.lpp_iterations))
                with torch.no_grad():
                    logits = model(test_merged)
                record(method, logits, sel, seconds + extract_seconds + fit_seconds,
                       {**extra, "atlas_best_epoch": detail["best_epoch"]})
    order = list(METHODS)
    return sorted(records, key=lambda r: order.index(r["method"]))


def run_ood(
    bank: Bank, base: nn.Module, pool: Sequence[str], resolution: int, norm: dict, config: FewShotConfig
) -> list[dict]:
    """aTLAS on ``ood_source`` shots, tested in domain and on ``ood_target`` (same classes, same head)."""
    source, target = config.ood_source, config.ood_target
    meta_s, meta_t = bank.meta(source), bank.meta(target)
    if meta_s["classes"] != meta_t["classes"]:
        raise ValueError(f"OOD pair {source} -> {target}: the class lists differ, so one head cannot serve both")
    task_s = bank.loader(source, seed=bank.config.seed)
    task_t = bank.loader(target, seed=bank.config.seed)
    head = bank.head(source).freeze()
    sources = [name for name in pool if name not in (source, target)]
    if not sources:
        raise ValueError(f"OOD: no task vector left once {source} and {target} are excluded from {list(pool)}")
    vectors = bank.vectors(sources)
    with torch.no_grad():
        pre_s = head(features(base, task_s.test, resolution, **norm))
        pre_t = head(features(base, task_t.test, resolution, **norm))
    records = []
    for k in config.ood_shots:
        for seed in config.seeds:
            train, val = few_shot_split(few_shot_pool(task_s), k, seed)
            (merged, selection, detail), seconds = _timed(
                lambda train=train, val=val, seed=seed: learn_atlas(
                    base, vectors, head, train, val, VisionSuite.for_images(resolution, norm), config.schedule, seed,
                    label="aTLAS (OOD)",
                    progress=config.progress))
            with torch.no_grad():
                atlas_s = head(features(merged, task_s.test, resolution, **norm))
                atlas_t = head(features(merged, task_t.test, resolution, **norm))
            records.append({
                "source": source, "target": target, "k": k, "seed": seed, "sources": sources,
                "pretrained_in_domain": score(pre_s, task_s.test), "atlas_in_domain": score(atlas_s, task_s.test),
                "pretrained_ood": score(pre_t, task_t.test), "atlas_ood": score(atlas_t, task_t.test),
                "selection_acc": selection, "seconds": seconds, "detail": detail,
            })
    return records


def _ood_table(records: Sequence[dict]) -> tuple[list[dict], str]:
    rows = []
    for k in sorted({r["k"] for r in records}):
        rs = [r for r in records if r["k"] == k]
        row: dict = {"k": k, "seeds": len(rs)}
        for name in ("pretrained_in_domain", "atlas_in_domain", "pretrained_ood", "atlas_ood"):
            row[name] = mean_se([r[name] for r in rs])
        row["ood_change_vs_pretrained"] = mean_se([r["atlas_ood"] - r["pretrained_ood"] for r in rs])
        row["ood_minus_in_domain"] = mean_se([r["atlas_ood"] - r["atlas_in_domain"] for r in rs])
        row["in_domain_change_vs_pretrained"] = mean_se([r["atlas_in_domain"] - r["pretrained_in_domain"] for r in rs])
        rows.append(row)
    shown = [
        {
            "k": r["k"],
            "pre-trained (ID)": _cell(*r["pretrained_in_domain"]),
            "aTLAS (ID)": _cell(*r["atlas_in_domain"]),
            "pre-trained (OOD)": _cell(*r["pretrained_ood"]),
            "aTLAS (OOD)": _cell(*r["atlas_ood"]),
            "Δ OOD vs pre-trained": _cell(*r["ood_change_vs_pretrained"], signed=True),
            "aTLAS OOD − ID": _cell(*r["ood_minus_in_domain"], signed=True),
        }
        for r in rows
    ]
    return rows, markdown_table(shown)


# ----------------------------------------------------------------------------------------------
# Resumable record store
# ----------------------------------------------------------------------------------------------


def _fingerprint(config: FewShotConfig, bank: Bank) -> str:
    settings = {
        "bank": str(bank.root), "bank_config": asdict(bank.config), "schedule": asdict(config.schedule),
        "finetune_lr": config.finetune_lr, "probe_decays": list(config.probe_decays),
        "probe_default_decay": config.probe_default_decay, "lpp_iterations": config.lpp_iterations,
    }
    if config.head_from != "own":  # records made before the option existed stay valid for "own"
        settings["head_from"] = config.head_from
    return fingerprint(settings)


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def _check(config: FewShotConfig, tasks: Sequence[str]) -> None:
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown few-shot methods {unknown}; choose from {list(METHODS)}")
    missing = [t for t in config.targets if t not in tasks]
    if missing:
        raise ValueError(f"targets {missing} are not bank tasks {list(tasks)}: a target's head comes from the bank")
    heads = {resolve_head(t, config.head_from) for t in config.targets} - set(tasks)
    if heads:
        raise ValueError(f"head_from={config.head_from!r} asks for heads of {sorted(heads)}, "
                         f"not bank tasks {list(tasks)}")
    if not config.targets or not config.shots or not config.seeds:
        raise ValueError("few-shot: targets, shots and seeds must each name at least one value")
    if any(k < 1 for k in config.shots) or any(k < 1 for k in config.ood_shots):
        raise ValueError(f"shots must be >= 1; got {list(config.shots)} / OOD {list(config.ood_shots)}")
    if len(tasks) < 2:
        raise ValueError(f"leave-one-out needs at least two bank tasks; got {list(tasks)}")


def run_fewshot(
    config: FewShotConfig | None = None, *, bank: Bank | None = None, tasks: Sequence[str] = DEFAULT_TASKS
) -> dict:
    """Run the few-shot grid (and the OOD check); ``tasks`` is the bank's pool, each target leaves
    itself out of it. Returns the payload written to ``<out>/fewshot.json``."""
    config = config or FewShotConfig()
    tasks = tuple(tasks)
    _check(config, tasks)
    started = time.perf_counter()
    bank = bank or Bank(config.bank)
    needed = list(tasks)
    if config.ood:
        needed += [t for t in (config.ood_source, config.ood_target) if t not in needed]
    bank.build(needed, progress=config.progress)
    base, norm, resolution = bank_and_norm(bank)
    out = Path(config.out)
    methods = [m for m in METHODS if m in config.methods]
    store = RecordStore(out / "fewshot_records.jsonl", _fingerprint(config, bank), config.resume)

    records: list[dict] = []
    jobs = [(t, k, s) for t in config.targets for k in config.shots for s in config.seeds]
    bar = tqdm(total=len(jobs), desc="few-shot jobs", disable=not config.progress)
    for target in config.targets:
        todo = [(k, s) for k, s in ((k, s) for t, k, s in jobs if t == target)
                if store.get_methods(f"{target}/{k}/{s}", methods) is None]
        if todo:
            task = bank.loader(target, seed=bank.config.seed)
            _, head = scoring_head(bank, target, config.head_from)
            vectors = bank.vectors([name for name in tasks if name != target])
            test_pretrained = features(base, task.test, resolution, **norm)
        for k in config.shots:
            for seed in config.seeds:
                job = f"{target}/{k}/{seed}"
                done = store.get_methods(job, methods)
                if done is None:
                    bar.set_postfix(target=target, k=k, seed=seed)
                    done = run_job(base, vectors, head, task, k, seed, methods, resolution, norm, config,
                                   test_pretrained)
                    store.put(job, done)
                records.extend(done)
                bar.update()
    bar.close()

    ood_records: list[dict] = []
    if config.ood:
        ood_records = run_ood(bank, base, tasks, resolution, norm, config)

    summary = summarize(records)
    runtime = []
    for method in methods:
        seconds = [r["seconds"] for r in records if r["method"] == method]
        if seconds:
            runtime.append({"method": METHODS[method], "runs": len(seconds),
                            "mean_seconds": sum(seconds) / len(seconds), "total_seconds": sum(seconds)})

    full = set(config.targets) == set(tasks) and tuple(sorted(config.shots)) == ALL_SHOTS
    borrowed = {t: resolve_head(t, config.head_from) for t in config.targets}
    borrowed = {t: h for t, h in borrowed.items() if h != t}
    head_text = "head of each target from the bank" + (
        " (its own, fitted on its whole training split)" if not borrowed else
        "; borrowed heads that never saw the target's labels: "
        + ", ".join(f"{t} scored by {h}'s" for t, h in borrowed.items()))
    header = (
        f"Few-shot adaptation: test accuracy (%) averaged over targets {', '.join(config.targets)}; "
        f"mean ± s.e. over seeds {list(config.seeds)} (per seed: mean over targets). "
        f"Bank: leave-one-out over {list(tasks)} on {bank.config.backbone} @ {resolution}px; {head_text}. "
        f"{config.schedule.epochs} epochs (aTLAS lr {config.schedule.lr:g}, fine-tuning lr "
        f"{config.finetune_lr:g}); selection on a quarter of the k shots (k >= 2), none at k = 1."
        + ("" if full else f" **Subset of the full grid** (shots {list(config.shots)}; full grid: "
           f"`--targets {' '.join(tasks)} --shots {' '.join(map(str, ALL_SHOTS))}`).")
    )
    sections = [header, "", _grid_table(summary["average"], methods, config.shots)]
    for target in config.targets:
        rows = [r for r in summary["per_target"] if r["target"] == target]
        sections += ["", f"**{target}** (mean ± s.e. over seeds)", "", _grid_table(rows, methods, config.shots)]
    sections += ["", "Runtime per method (seconds per (target, k, seed) run, shared feature extraction included; "
                 "aTLAS + X includes aTLAS):", "",
                 markdown_table(runtime, ["method", "runs", "mean_seconds", "total_seconds"], digits=1)]
    ood_rows: list[dict] = []
    if ood_records:
        ood_rows, ood_md = _ood_table(ood_records)
        sections += ["", f"Out of distribution: aTLAS learned on **{config.ood_source}** shots, tested on "
                     f"**{config.ood_target}** (same classes, {config.ood_source}'s head); bank without either "
                     f"({', '.join(ood_records[0]['sources'])}). Accuracy %, mean ± s.e. over seeds.", "", ood_md]
    table = "\n".join(sections)

    series = {
        METHODS[m]: (
            [r["k"] for r in summary["average"] if r["method"] == m],
            [r["mean"] for r in summary["average"] if r["method"] == m],
            [0.0 if r["se"] != r["se"] else r["se"] for r in summary["average"] if r["method"] == m],
        )
        for m in methods
    }
    plot = plot_lines(series, out / "fewshot_accuracy.png", xlabel="shots per class (k)",
                      ylabel="test accuracy (mean over targets)", title="Few-shot adaptation", logx=True)
    payload = {
        "config": {**asdict(config), "out": str(config.out), "tasks": list(tasks), "full_grid": full},
        "bank": {"root": str(bank.root), "entries": bank.table()},
        "records": records,
        "summary": summary,
        "runtime": runtime,
        "ood": {"records": ood_records, "summary": ood_rows},
        "plot": str(plot),
        "seconds": time.perf_counter() - started,
    }
    payload = json_safe(payload)
    json_path, md_path = write_results(out, "fewshot", payload, table)
    payload["files"] = {"json": str(json_path), "markdown": str(md_path), "plot": str(plot)}
    payload["table"] = table
    return payload


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run fewshot``."""
    parser = subparsers.add_parser(
        "fewshot",
        help="few-shot aTLAS vs linear probe, Tip-Adapter, LP++, fine-tuning (leave-one-out bank)",
        description="Few-shot adaptation on targets held out of the bank, k shots per class, several seeds. "
        f"Default: a subset sized for a 2-core CPU (targets {' '.join(DEFAULT_TARGETS)}, shots "
        f"{' '.join(map(str, DEFAULT_SHOTS))}); the full grid is --targets all --shots 1 2 4 8 16.",
    )
    add = parser.add_argument
    add("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="target tasks, or 'all' (default: %(default)s)")
    add("--shots", nargs="+", type=int, default=list(DEFAULT_SHOTS), help="k values (default: %(default)s)")
    add("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="seeds (default: %(default)s)")
    add("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
        help=f"methods among {', '.join(METHODS)} (default: all)")
    schedule = CoefficientSchedule()
    add("--epochs", type=int, default=schedule.epochs, help="aTLAS / fine-tuning epochs (default: %(default)s)")
    add("--lr", type=float, default=schedule.lr, help="aTLAS coefficient learning rate (default: %(default)s)")
    add("--finetune-lr", type=float, default=FewShotConfig.finetune_lr, help="full fine-tuning lr (%(default)s)")
    add("--head-from", default=FewShotConfig.head_from, metavar="auto|own|TASK",
        help="whose head scores each target: its own (fitted on its whole training split), 'auto' (a "
        "same-class partner's, e.g. Emoji-Google's for Emoji-Twitter, where there is one), or a task "
        "(default: %(default)s)")
    add("--no-ood", action="store_true", help="skip the Emoji-Google -> Emoji-Twitter OOD check")
    add("--ood-shots", nargs="+", type=int, default=[16], help="k values of the OOD check (default: %(default)s)")
    add("--bank-root", type=Path, default=None, help="bank directory (default: the standard bank in the cache)")
    add("--out", type=Path, default=DEFAULT_RESULTS / "fewshot", help="results directory (default: %(default)s)")
    add("--no-resume", action="store_true", help="recompute jobs already recorded under the same settings")
    add("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    targets = tuple(DEFAULT_TASKS) if args.targets == ["all"] else tuple(args.targets)
    config = FewShotConfig(
        targets=targets, shots=tuple(args.shots), seeds=tuple(args.seeds), methods=tuple(args.methods),
        schedule=CoefficientSchedule(epochs=args.epochs, lr=args.lr), finetune_lr=args.finetune_lr,
        ood=not args.no_ood, ood_shots=tuple(args.ood_shots), head_from=args.head_from, out=args.out,
        resume=not args.no_resume,
        progress=not args.quiet,
    )
    bank = Bank(config.bank, root=args.bank_root) if args.bank_root else None
    result = run_fewshot(config, bank=bank)
    print(result["table"])
    print(f"\nresults: {result['files']['json']}\ntable:   {result['files']['markdown']}")
    print(f"plot:    {result['files']['plot']}\ntotal {result['seconds']:.0f} s")
    return 0
