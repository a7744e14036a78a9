"""Variational task vector composition as a recipe, side by side with aTLAS on the same data.

Two parts (``--parts``):

- ``addition``: the whole bank merged for every task. aTLAS is trained as the addition recipe's
  ``atlas`` row (:func:`~taskvec.workflow.train_multitask`) and the variational composer is
  trained on exactly the same validation parts: each task's validation split cut into a fitting part
  and a selection part, the epoch chosen on the selection part, test labels read only for the report.
  The objective is the multi-task ELBO (each task through its own frozen head, as aTLAS's multi-task
  cross-entropy) with a KL warm-up.
- ``fewshot``: leave-one-out targets, k shots per class from the target's validation split, the
  same :func:`few_shot_split` per (k, seed) for both methods; aTLAS is the few-shot recipe's
  :func:`~taskvec.workflow.learn_atlas`, the variational composer trains on the same shots and
  selects on the same held-out shots.

At test time the variational composer uses its deterministic gate. The report gives accuracy, the
fraction of coefficients the gate keeps (a heatmap per vector and block), and the inference cost per
batch relative to the merged aTLAS model (which runs at the speed of the plain backbone).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from taskvec.bank import DEFAULT_TASKS, Bank, BankConfig
from taskvec.batching import mixed_loader
from taskvec.compose import Composer
from taskvec.data import ImageSet, to_input
from taskvec.evaluate import features, score, selection_metric
from taskvec.experiment import RecordStore, fingerprint, history, json_safe, mean_se
from taskvec.io import write_json
from taskvec.report import markdown_table, write_results
from taskvec.suites.vision import VisionSuite
from taskvec.train import TrainConfig, TrainResult, fit
from taskvec.variational import (
    ELBOLoss,
    MultitaskELBOLoss,
    VariationalComposer,
    VariationalConfig,
    plot_kept_fraction,
)
from taskvec.workflow import (
    DEFAULT_RESULTS,
    CoefficientSchedule,
    MultiTaskData,
    MultiTaskSetup,
    bank_and_norm,
    bank_identity,
    few_shot_pool,
    few_shot_split,
    image_loader,
    learn_atlas,
    train_multitask,
)

PARTS = ("addition", "fewshot")


@dataclass
class VariationalRecipeConfig:
    """What to run; defaults sized for a 2-core CPU (see the README for measured times)."""

    parts: tuple[str, ...] = PARTS
    tasks: tuple[str, ...] = DEFAULT_TASKS
    granularity: str = "block"  # one latent coefficient per vector and block; "layer" groups blocks
    variational: VariationalConfig = field(default_factory=VariationalConfig)
    lr: float = 1e-2  # the inference network's AdamW rate (its output bias plays aTLAS's coefficients)
    weight_decay: float = 0.0
    kl_weight: float = 1.0  # beta: 1 is the per-sample ELBO; reported with the table
    kl_normalizer: str = "sample"  # "dataset" divides the per-sample KL by the number of fitting images
    kl_warmup_fraction: float = 0.5  # of all training steps
    # Task addition: splits, epochs and batch shared with the addition recipe's aTLAS row.
    addition: MultiTaskSetup = field(default_factory=MultiTaskSetup)
    # Few-shot: targets held out of the bank one at a time, k shots per class, seeds.
    targets: tuple[str, ...] = ("emoji_twitter",)
    shots: tuple[int, ...] = (4, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    schedule: CoefficientSchedule = field(default_factory=CoefficientSchedule)
    fewshot_lr: float = 1e-2
    timing_batch: int = 64
    timing_rounds: int = 5
    bank: BankConfig = field(default_factory=BankConfig)
    out: Path = DEFAULT_RESULTS / "variational"
    resume: bool = True
    progress: bool = True


def _variational(composer: Composer, feature_dim: int, config: VariationalRecipeConfig) -> VariationalComposer:
    return VariationalComposer(composer, feature_dim=feature_dim, config=replace(config.variational))


def _train_variational(
    model: VariationalComposer,
    loss: ELBOLoss,
    loader,
    epochs: int,
    lr: float,
    config: VariationalRecipeConfig,
    seed: int,
    evaluate: Callable[[nn.Module], float] | None,
    label: str,
    checkpoint: Path | None = None,
) -> TrainResult:
    loss.kl_warmup_steps = int(config.kl_warmup_fraction * epochs * len(loader))
    result = fit(
        model,
        loss,
        loader,
        TrainConfig(epochs=epochs, lr=lr, weight_decay=config.weight_decay, warmup_fraction=0.0, seed=seed,
                    progress=config.progress, description=label, checkpoint=checkpoint,
                    resume=checkpoint is not None and config.resume),
        evaluate=evaluate,
    )
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return result


@torch.no_grad()
def _gated_logits(model: VariationalComposer, head: nn.Module, split: ImageSet, resolution: int, norm: dict,
                  batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """Gated-inference logits on a split, and the gate's kept fraction (vectors, blocks) over it."""
    model.eval()
    outputs, kept = [], []
    for start in range(0, len(split), batch_size):
        x = to_input(split.images[start : start + batch_size], resolution, **norm)
        feats = model.features(x)
        outputs.append(head(model(x, features=feats)))
        kept.append(model.kept_fraction(feats, per_block=True) * len(x))
    return torch.cat(outputs), torch.stack(kept).sum(0) / len(split)


def _best_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1000.0 * min(times)


@torch.no_grad()
def inference_cost(
    model: VariationalComposer, merged: nn.Module, x: Tensor, rounds: int = 5
) -> list[dict]:
    """Milliseconds per batch of gated variational inference (features + inference network + per-sample
    composition) for each runner that applies, against the merged aTLAS network on the same batch."""
    model.eval()
    floor = _best_ms(lambda: merged(x), rounds)
    rows = [{"method": "merged aTLAS", "ms_per_batch": floor, "relative": 1.0}]
    previous = model.config.method
    for method in ("vmap", "linear", "auto"):
        model.config.method = method
        try:
            ms = _best_ms(lambda: model(x), rounds)
        except (TypeError, ValueError) as err:  # the linearity runner refuses some modules: say so
            rows.append({"method": f"variational ({method})", "ms_per_batch": None, "relative": None,
                         "note": str(err)[:200]})
            continue
        rows.append({"method": f"variational ({method})", "ms_per_batch": ms, "relative": ms / floor})
    model.config.method = previous
    return rows


# ----------------------------------------------------------------------------------------------
# Task addition
# ----------------------------------------------------------------------------------------------


def _atlas_addition(config: VariationalRecipeConfig, bank: Bank, out: Path, records: RecordStore) -> tuple[dict, Path]:
    """The aTLAS row of task addition (block coefficients, multi-task cross-entropy, same parts)."""
    tasks = tuple(config.tasks)
    setup = replace(config.addition, progress=config.progress, resume=config.resume)
    coefficient_file = out / "addition_atlas_coefficients.safetensors"
    row = records.get("atlas")
    if row is not None and coefficient_file.is_file():
        return row, coefficient_file
    tic = time.perf_counter()
    ctx = MultiTaskData(bank, tasks, setup)
    composer = Composer(ctx.base, ctx.vectors(), "block", init=setup.init)
    result = train_multitask(composer, ctx, setup, "aTLAS (block)", out / "addition_atlas.ckpt")
    train_seconds = time.perf_counter() - tic
    test = ctx.test_scores(composer.merge())
    normalized = {t: test[t] / ctx.finetuned[t] for t in tasks}
    row = {"key": "atlas", "method": "aTLAS (block)", "selection_acc": float(result.best_metric), "test_acc": test,
           "normalized": normalized, "avg_acc": sum(test.values()) / len(test),
           "avg_normalized": sum(normalized.values()) / len(normalized), "learned": composer.coefficients.numel(),
           "best_epoch": result.best_epoch, "history": history(result), "train_seconds": train_seconds,
           "seconds": time.perf_counter() - tic}
    composer.save_coefficients(coefficient_file, extra={"recipe": "variational", "method": "atlas"})
    records.put("atlas", row)
    return row, coefficient_file


def run_addition_part(config: VariationalRecipeConfig, bank: Bank, out: Path) -> dict:
    tasks = tuple(config.tasks)
    add_config = replace(config.addition, progress=config.progress, resume=config.resume)
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "resume", "progress", "parts")}
    records = RecordStore(out / "variational_addition_records.jsonl",
                          fingerprint({**settings, "part": "addition", "banks": bank_identity([bank], tasks)}),
                          config.resume)
    atlas_row, atlas_coefficients = _atlas_addition(config, bank, out, records)
    ctx = MultiTaskData(bank, tasks, add_config)
    spec_dim = _feature_dim(ctx.base, ctx.resolution)
    composer = Composer(ctx.base, ctx.vectors(), config.granularity, init=add_config.init)
    model = _variational(composer, spec_dim, config)
    network_file = out / "variational_addition_inference.safetensors"
    row = records.get("variational")
    if row is None or not network_file.is_file():
        tic = time.perf_counter()
        loader = mixed_loader([ctx.fit[t] for t in tasks], add_config.batch_per_task, ctx.resolution, ctx.norm,
                              augmentation=add_config.augmentation)
        loss = MultitaskELBOLoss([ctx.heads[t] for t in tasks], sum(len(ctx.fit[t]) for t in tasks), 0,
                                 kl_weight=config.kl_weight, kl_normalizer=config.kl_normalizer)
        result = _train_variational(model, loss, loader, add_config.epochs, config.lr, config, add_config.seed,
                                    ctx.selection_score, "variational (addition)", out / "variational_addition.ckpt")
        train_seconds = time.perf_counter() - tic
        model.save(network_file, extra={"recipe": "variational", "part": "addition"})
        test, kept = {}, {}
        kept_blocks = []
        for t in tasks:
            logits, fraction = _gated_logits(model, ctx.heads[t], ctx.test[t], ctx.resolution, ctx.norm)
            test[t] = score(logits, ctx.test[t])
            kept[t] = float(fraction.mean())
            kept_blocks.append(fraction)
        normalized = {t: test[t] / ctx.finetuned[t] for t in tasks}
        row = {
            "key": "variational", "method": "variational (gated)", "selection_acc": float(result.best_metric),
            "test_acc": test, "normalized": normalized, "avg_acc": sum(test.values()) / len(tasks),
            "avg_normalized": sum(normalized.values()) / len(tasks), "kept_fraction": kept,
            "kept_fraction_avg": sum(kept.values()) / len(tasks),
            "kept_per_block": torch.stack(kept_blocks).mean(0).tolist(), "best_epoch": result.best_epoch,
            "history": history(result), "train_seconds": train_seconds,
            "learned": sum(p.numel() for p in model.inference.parameters()),
            "seconds": time.perf_counter() - tic,
        }
        records.put("variational", row)
    else:
        model.load_inference(network_file)
    kept_plot = plot_kept_fraction(torch.tensor(row["kept_per_block"]), composer.block_names, composer.vector_names,
                                   out / "variational_addition_kept.png",
                                   title="variational composition, task addition: fraction of test images for "
                                         "which the gate keeps each (vector, block)")
    merged = Composer(ctx.base, ctx.vectors(), "block")
    merged.load_coefficients(atlas_coefficients)
    probe = torch.cat([to_input(ctx.test[t].images[: math.ceil(config.timing_batch / len(tasks))], ctx.resolution,
                                **ctx.norm) for t in tasks])[: config.timing_batch]
    cost = inference_cost(model, merged.merge(), probe, config.timing_rounds)
    return {"atlas": atlas_row, "variational": row, "cost": cost, "kept_plot": str(kept_plot),
            "atlas_coefficients": str(atlas_coefficients), "tasks": list(tasks),
            "sizes": {t: {"select": len(ctx.select[t]), "fit": len(ctx.fit[t]), "test": len(ctx.test[t])}
                      for t in tasks}}


def _feature_dim(base: nn.Module, resolution: int) -> int:
    dim = getattr(base, "feature_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.no_grad():
        return int(base(torch.zeros(1, 3, resolution, resolution)).shape[-1])


# ----------------------------------------------------------------------------------------------
# Few-shot
# ----------------------------------------------------------------------------------------------


def _fewshot_job(bank: Bank, base: nn.Module, target: str, k: int, seed: int, resolution: int, norm: dict,
                 config: VariationalRecipeConfig) -> list[dict]:
    task = bank.loader(target, seed=bank.config.seed)
    head = bank.head(target).freeze()
    sources = [t for t in config.tasks if t != target]
    train, val = few_shot_split(few_shot_pool(task), k, seed)
    common = {"target": target, "k": k, "seed": seed, "train_images": len(train),
              "selection_images": 0 if val is None else len(val)}
    schedule = replace(config.schedule, progress=config.progress, seed=seed)
    tic = time.perf_counter()
    merged, selection, detail = learn_atlas(base, bank.vectors(sources), head, train, val,
                                            VisionSuite.for_images(resolution, norm),
                                            schedule, seed, progress=config.progress)
    with torch.no_grad():
        atlas_acc = score(head(features(merged, task.test, resolution, **norm)), task.test)
    records = [{**common, "method": "atlas", "test_acc": atlas_acc, "selection_acc": selection,
                "seconds": time.perf_counter() - tic, "best_epoch": detail["best_epoch"]}]

    tic = time.perf_counter()
    composer = Composer(base, bank.vectors(sources), config.granularity, init=0.0)
    model = _variational(composer, _feature_dim(base, resolution), config)
    loader = image_loader(train, resolution, batch_size=schedule.batch_size, norm=norm,
                          augmentation=schedule.augmentation, min_steps=schedule.min_steps_per_epoch)
    loss = ELBOLoss(head, len(train), 0, kl_weight=config.kl_weight, kl_normalizer=config.kl_normalizer)

    def evaluate(m: nn.Module) -> float:
        assert val is not None
        return selection_metric(_gated_logits(m, head, val, resolution, norm)[0], val)

    result = _train_variational(model, loss, loader, schedule.epochs, config.fewshot_lr, config, seed,
                                None if val is None else evaluate, f"variational {target} k={k} s={seed}")
    logits, kept = _gated_logits(model, head, task.test, resolution, norm)
    records.append({**common, "method": "variational", "test_acc": score(logits, task.test),
                    "selection_acc": None if val is None else score(_gated_logits(model, head, val, resolution,
                                                                                  norm)[0], val),
                    "seconds": time.perf_counter() - tic, "best_epoch": result.best_epoch,
                    "kept_fraction": float(kept.mean())})
    return records


def run_fewshot_part(config: VariationalRecipeConfig, bank: Bank, out: Path) -> dict:
    base, norm, resolution = bank_and_norm(bank)
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "resume", "progress", "parts")}
    records = RecordStore(out / "variational_fewshot_records.jsonl",
                          fingerprint({**settings, "part": "fewshot", "banks": bank_identity([bank], config.tasks)}),
                          config.resume)
    jobs = [(t, k, s) for t in config.targets for k in config.shots for s in config.seeds]
    done: list[dict] = []
    for target, k, seed in tqdm(jobs, desc="variational few-shot", disable=not config.progress):
        key = f"{target}/k{k}/s{seed}"
        found = records.get(key)
        if found is None:
            found = {"records": _fewshot_job(bank, base, target, k, seed, resolution, norm, config)}
            records.put(key, found)
        done.extend(found["records"])
    summary = []
    for method in ("atlas", "variational"):
        for k in config.shots:
            per_seed = []
            for seed in config.seeds:
                accs = [r["test_acc"] for r in done if r["method"] == method and r["k"] == k and r["seed"] == seed]
                per_seed.append(sum(accs) / len(accs))
            mean, se = mean_se(per_seed)
            kept = [r["kept_fraction"] for r in done if r["method"] == method and r["k"] == k and "kept_fraction" in r]
            summary.append({"method": method, "k": k, "mean": mean, "se": se,
                            "kept_fraction": sum(kept) / len(kept) if kept else None,
                            "seconds": sum(r["seconds"] for r in done if r["method"] == method and r["k"] == k)})
    return {"records": done, "summary": summary}


# ----------------------------------------------------------------------------------------------
# Driver and report
# ----------------------------------------------------------------------------------------------


def _check(config: VariationalRecipeConfig) -> None:
    unknown = [p for p in config.parts if p not in PARTS]
    if unknown or not config.parts:
        raise ValueError(f"parts {unknown or '[]'}: choose a non-empty subset of {list(PARTS)}")
    if "fewshot" in config.parts:
        missing = [t for t in config.targets if t not in config.tasks]
        if missing:
            raise ValueError(f"few-shot targets {missing} are not among the bank's tasks {list(config.tasks)}")
        if any(k < 1 for k in config.shots) or not config.seeds:
            raise ValueError(f"shots must be >= 1 and seeds non-empty; got {config.shots}, {config.seeds}")
    if not 0.0 <= config.kl_warmup_fraction <= 1.0:
        raise ValueError(f"kl_warmup_fraction must lie in [0, 1], got {config.kl_warmup_fraction}")


def run_variational(config: VariationalRecipeConfig | None = None, *, bank: Bank | None = None) -> dict:
    """Run the requested parts; returns the payload written to ``<out>/variational.json``."""
    config = config or VariationalRecipeConfig()
    _check(config)
    started = time.perf_counter()
    bank = bank or Bank(config.bank)
    bank.build(config.tasks, progress=config.progress)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    payload: dict = {"config": json_safe({**asdict(config), "variational": json.loads(config.variational.to_json()),
                                          "bank": asdict(bank.config)}), "bank": str(bank.root)}
    sections = []
    if "addition" in config.parts:
        tic = time.perf_counter()
        addition = run_addition_part(config, bank, out)
        addition["seconds"] = time.perf_counter() - tic
        payload["addition"] = addition
        sections.append(_addition_table(addition))
    if "fewshot" in config.parts:
        tic = time.perf_counter()
        fewshot = run_fewshot_part(config, bank, out)
        fewshot["seconds"] = time.perf_counter() - tic
        payload["fewshot"] = fewshot
        sections.append(_fewshot_table(fewshot, config))
    payload["seconds"] = time.perf_counter() - started
    kl_scale = "per-sample ELBO" if config.kl_normalizer == "sample" else "KL divided by the number of fitting images"
    sections.append(f"Objective: {kl_scale}, KL weight beta = {config.kl_weight:g} "
                    f"(warm-up over {config.kl_warmup_fraction:.0%} of the steps).")
    table = "\n\n".join(sections)
    json_path, md_path = write_results(out, "variational", json_safe(payload), table)
    payload["files"] = {"json": str(json_path), "markdown": str(md_path)}
    if "addition" in payload:
        payload["files"]["kept_plot"] = payload["addition"]["kept_plot"]
    write_json(json_path, json_safe(payload))
    payload["table"] = table
    return payload


def _addition_table(part: dict) -> str:
    tasks = part["tasks"]
    short = {t: t[:12] for t in tasks}
    rows = []
    for row in (part["atlas"], part["variational"]):
        rows.append({"method": row["method"], **{short[t]: row["test_acc"][t] for t in tasks}, "avg": row["avg_acc"],
                     "avg normalised": row["avg_normalized"],
                     "kept": row.get("kept_fraction_avg", 1.0), "seconds": row["seconds"]})
    cost = [{"inference": r["method"], "ms / batch": r["ms_per_batch"], "x merged": r["relative"]}
            for r in part["cost"]]
    return "\n\n".join([
        f"**Task addition** over {len(tasks)} tasks, test accuracy (normalised by each task's fine-tuned "
        "accuracy); same fitting and selection parts of the validation splits for both rows. 'kept' is the "
        "fraction of coefficients the gate keeps, averaged over test images.",
        markdown_table(rows),
        "**Inference cost** per batch (CPU, best of several rounds), relative to the merged aTLAS network:",
        markdown_table(cost),
    ])


def _fewshot_table(part: dict, config: VariationalRecipeConfig) -> str:
    rows = []
    for method in ("atlas", "variational"):
        row: dict = {"method": "aTLAS (block)" if method == "atlas" else "variational (gated)"}
        for s in part["summary"]:
            if s["method"] == method:
                row[f"k={s['k']}"] = f"{100 * s['mean']:.1f} ± {100 * s['se']:.1f}"
                if s["kept_fraction"] is not None:
                    row[f"kept k={s['k']}"] = s["kept_fraction"]
        rows.append(row)
    return (f"**Few-shot** on {', '.join(config.targets)} (leave-one-out bank), test accuracy in %, mean ± s.e. "
            f"over seeds {list(config.seeds)}; both methods on the same shots.\n\n" + markdown_table(rows))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run variational``."""
    d = VariationalRecipeConfig()
    parser = subparsers.add_parser(
        "variational",
        help="variational (sample-specific, spike-and-slab) composition vs aTLAS: task addition and few-shot",
        description=__doc__.split("\n\n")[0],
    )
    add = parser.add_argument
    add("--parts", nargs="+", choices=PARTS, default=list(d.parts), help="which experiments to run")
    add("--tasks", nargs="+", default=list(d.tasks), help="bank tasks (task addition merges all of them)")
    add("--targets", nargs="+", default=list(d.targets), help="few-shot targets (each held out of the bank)")
    add("--shots", nargs="+", type=int, default=list(d.shots), help="k labelled images per class")
    add("--seeds", nargs="+", type=int, default=list(d.seeds), help="few-shot seeds")
    add("--granularity", default=d.granularity, help="latent coefficients per 'block' (default) or per 'layer'")
    add("--epochs", type=int, default=d.addition.epochs, help="task-addition epochs (aTLAS and variational)")
    add("--lr", type=float, default=d.lr, help="inference network learning rate")
    add("--kl-weight", type=float, default=d.kl_weight, help="weight of the KL term")
    add("--p-threshold", type=float, default=d.variational.p_threshold, help="gate: minimum inclusion probability")
    add("--uncertainty-threshold", type=float, default=d.variational.uncertainty_threshold,
        help="gate: maximum sigma/|mu| (inf disables)")
    add("--method", choices=("auto", "vmap", "linear"), default=d.variational.method,
        help="per-sample executor for training and test")
    add("--out", type=Path, default=d.out, help="results directory")
    add("--no-resume", action="store_true", help="recompute finished parts")
    add("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=_cli)


def _cli(args: argparse.Namespace) -> int:
    d = VariationalRecipeConfig()
    config = replace(
        d,
        parts=tuple(args.parts), tasks=tuple(args.tasks), targets=tuple(args.targets), shots=tuple(args.shots),
        seeds=tuple(args.seeds), granularity=args.granularity, lr=args.lr, kl_weight=args.kl_weight,
        variational=replace(d.variational, p_threshold=args.p_threshold,
                            uncertainty_threshold=args.uncertainty_threshold, method=args.method),
        addition=replace(d.addition, epochs=args.epochs),
        out=args.out, resume=not args.no_resume, progress=not args.no_progress,
    )
    payload = run_variational(config)
    print(payload["table"])
    print(f"\nresults: {payload['files']['json']}, {payload['files']['markdown']}")
    if "kept_plot" in payload["files"]:
        print(f"kept-fraction heatmap: {payload['files']['kept_plot']}")
    return 0
