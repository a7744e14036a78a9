"""The demo over any :class:`taskvec.suites.Suite` (the text suite's main job): few-shot adaptation to a
task held out of the bank, through the target's frozen head.

With the text suite the head is the target's zero-shot head (class names x prompt templates, no label
seen), so the k shots are drawn from the target's training split and every row is scored on its test
split. Rows: zero-shot (the pre-trained encoder), task arithmetic (one scale chosen on held-out shots),
learned isotropic coefficients (one per vector), aTLAS (one per parameter block per vector), and a cheap
extra, aTLAS without augmentation. Selection only ever sees the k-shot data. Writes JSON, a markdown
table and a heatmap of aTLAS's coefficients.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskvec.compose import Composer
from taskvec.objectives import cross_entropy
from taskvec.report import markdown_table, plot_coefficients, write_results
from taskvec.train import TrainConfig, TrainResult, fit
from taskvec.workflow import DEFAULT_RESULTS, CoefficientSchedule, few_shot_split, task_arithmetic_search

__all__ = ["SuiteDemoConfig", "demo_shots", "run_suite_demo"]


@dataclass
class SuiteDemoConfig:
    target: str = "wordnet_noun"
    shots: int = 16  # per class; fewer when the target's smallest class has fewer training texts
    seed: int = 0
    schedule: CoefficientSchedule = field(
        default_factory=lambda: CoefficientSchedule(epochs=6, min_steps_per_epoch=4, batch_size=32)
    )
    out: Path = DEFAULT_RESULTS / "demo-text"
    progress: bool = True


def demo_shots(labels: torch.Tensor, wanted: int) -> int:
    """``wanted`` shots per class, or the smallest class size when a class has fewer examples."""
    counts = torch.bincount(labels)
    smallest = int(counts[counts > 0].min())
    return max(1, min(wanted, smallest))


def _scores(suite: Any, model: nn.Module, head: nn.Module, split: Any) -> dict[str, float]:
    if hasattr(suite, "scores"):
        return suite.scores(model, head, split)
    return {"acc": suite.accuracy(model, head, split)}


def _learn(suite: Any, composer: nn.Module, head: nn.Module, train: Any, val: Any, schedule: CoefficientSchedule,
           augmentation: str | None, description: str) -> TrainResult:
    loader = suite.loader(train, batch_size=schedule.batch_size, augmentation=augmentation,
                          min_steps=schedule.min_steps_per_epoch)
    evaluate = None if val is None or len(val) == 0 else (lambda m: suite.accuracy(m, head, val))
    return fit(composer, cross_entropy(head), loader,
               TrainConfig(epochs=schedule.epochs, lr=schedule.lr, weight_decay=schedule.weight_decay,
                           warmup_fraction=0.0, seed=schedule.seed, progress=schedule.progress,
                           description=description),
               evaluate=evaluate)


def run_suite_demo(suite: Any, config: SuiteDemoConfig | None = None, *, sources: Sequence[str] | None = None) -> dict:
    """Build the suite's bank (all tasks but the target, cached), then compare the rows on the target."""
    config = config or SuiteDemoConfig()
    started = time.perf_counter()
    sources = [t for t in (sources or suite.tasks) if t != config.target]
    if not sources:
        raise ValueError(f"the demo needs bank tasks other than the target {config.target!r}; got {list(suite.tasks)}")
    suite.build(sources)
    bank_seconds = time.perf_counter() - started
    task = suite.splits(config.target)
    head = suite.head(config.target)
    base = suite.backbone()
    vectors = suite.vectors(sources)
    shots = demo_shots(task.train.labels, config.shots)
    train, val = few_shot_split(task.train, shots, config.seed)
    schedule = CoefficientSchedule(**{**asdict(config.schedule), "seed": config.seed, "progress": config.progress})

    def val_acc(model: nn.Module) -> float:
        return suite.accuracy(model, head, val) if val is not None else float("nan")

    rows: list[dict] = []

    def row(method: str, learned: int, model: nn.Module, tic: float, val_metric: float | None = None) -> None:
        test = _scores(suite, model, head, task.test)
        rows.append({"method": method, "learned": learned,
                     "val_acc": val_acc(model) if val_metric is None else val_metric,
                     "test_acc": test["acc"], "test_bal": test.get("balanced_acc", float("nan")),
                     "seconds": time.perf_counter() - tic})

    tic = time.perf_counter()
    row("zero-shot (pre-trained)", 0, base, tic)
    tic = time.perf_counter()
    alpha, merged, alpha_table = task_arithmetic_search(base, vectors, val_acc)
    row(f"task arithmetic (alpha={alpha:g})", 1, merged, tic)

    composers: dict[str, Composer] = {}
    for label, granularity, augmentation in (("learned isotropic", "isotropic", "weak"),
                                             ("aTLAS (block)", "block", "weak"),
                                             ("aTLAS (block), no augmentation", "block", None)):
        tic = time.perf_counter()
        composer = Composer(base, vectors, granularity, init=0.0)
        result = _learn(suite, composer, head, train, val, schedule, augmentation, label)
        row(label, composer.coefficients.numel(), composer.merge(), tic, result.best_metric)
        composers.setdefault(granularity, composer)

    out = Path(config.out)
    atlas = composers["block"]
    heatmap = plot_coefficients(
        atlas.block_coefficients(), atlas.block_names, atlas.vector_names, out / "demo_coefficients.png",
        title=f"aTLAS coefficients, {config.target}, {shots} shots",
    )
    atlas.save_coefficients(out / "demo_coefficients.safetensors", extra={"target": config.target})
    header = (
        f"Few-shot adaptation to **{config.target}** ({suite.name} suite; {shots} shots/class, seed {config.seed}: "
        f"{len(train)} training + {0 if val is None else len(val)} selection texts; test {len(task.test)}), "
        f"{len(vectors)} task vectors ({', '.join(sources)}); the head is {config.target}'s zero-shot head "
        f"(class names and templates only)"
    )
    table = header + "\n\n" + markdown_table(rows, ["method", "learned", "val_acc", "test_acc", "test_bal", "seconds"])
    payload = {
        "config": {"target": config.target, "shots": shots, "seed": config.seed, "suite": suite.identity(),
                   "schedule": asdict(config.schedule)},
        "bank": {"sources": sources, "seconds": bank_seconds},
        "rows": rows,
        "task_arithmetic_alpha_table": alpha_table,
        "heatmap": str(heatmap),
        "seconds": time.perf_counter() - started,
    }
    json_path, md_path = write_results(out, "demo", payload, table)
    payload["files"] = {"json": str(json_path), "markdown": str(md_path), "heatmap": str(heatmap)}
    payload["table"] = table
    return payload
