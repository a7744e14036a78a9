"""The main job: few-shot adaptation of the embedded MobileNetV2 to a task held out of the bank.

Builds (or reuses) the six-task bank, then, for the target task, compares on its test split:
the pre-trained backbone with the target's head, task arithmetic (one scale, chosen on held-out
shots), learned isotropic coefficients, and aTLAS (one coefficient per parameter block per vector).
Selection only ever sees the k-shot data. Writes JSON, a markdown table and a coefficient heatmap.

Which head scores the target (``head_from``): the target's own head is fitted on its whole training
split (the bank's design), so it is already a full-data linear probe that 16 shots per class can
hardly improve (measured: no few-shot method beats it, see the README). CLIP's zero-shot head, whose
role the heads play, has never seen a target label. So by default (``"auto"``) a target with a
same-class partner in the bank is scored through the partner's head (Emoji-Twitter through
Emoji-Google's: same nine categories, another drawing style); ``"own"`` uses the target's own head;
a task name picks that task's head (its classes must match).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from taskvec.bank import DEFAULT_TASKS, Bank, BankConfig
from taskvec.compose import Composer
from taskvec.evaluate import accuracy
from taskvec.report import markdown_table, plot_coefficients, write_results
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import (
    DEFAULT_RESULTS,
    CoefficientSchedule,
    bank_and_norm,
    few_shot_pool,
    few_shot_split,
    learn_supervised,
    resolve_head,
    scoring_head,
    task_arithmetic_search,
)


@dataclass
class DemoConfig:
    target: str = "emoji_twitter"
    shots: int = 16
    seed: int = 0
    head_from: str = "auto"  # "auto", "own", or a bank task whose head (same classes) serves the target
    bank: BankConfig = field(default_factory=BankConfig)
    schedule: CoefficientSchedule = field(default_factory=CoefficientSchedule)
    out: Path = DEFAULT_RESULTS / "demo"
    progress: bool = True


def run_demo(config: DemoConfig | None = None, *, bank: Bank | None = None, tasks=DEFAULT_TASKS) -> dict:
    """Run the demo; ``bank`` and ``tasks`` default to the embedded six-task bank."""
    config = config or DemoConfig()
    started = time.perf_counter()
    bank = bank or Bank(config.bank)
    head_task = resolve_head(config.target, config.head_from)
    needed = [name for name in dict.fromkeys((config.target, head_task)) if name not in tasks]
    bank.build((*tasks, *needed), progress=config.progress)
    bank_seconds = time.perf_counter() - started
    base, norm, resolution = bank_and_norm(bank)
    task = bank.loader(config.target, seed=bank.config.seed)
    head_task, head = scoring_head(bank, config.target, config.head_from)
    sources = [name for name in tasks if name != config.target]
    vectors = bank.vectors(sources)
    train, val = few_shot_split(few_shot_pool(task), config.shots, config.seed)

    def test_acc(model) -> float:
        return accuracy(model, head, task.test, resolution, **norm)

    def val_acc(model) -> float:
        return accuracy(model, head, val, resolution, **norm) if val is not None else float("nan")

    rows = []
    tic = time.perf_counter()
    borrowed = head_task != config.target
    reference = "pre-trained + head" + (f" of {head_task}" if borrowed else "")
    rows.append({"method": reference, "learned": 0, "val_acc": val_acc(base), "test_acc": test_acc(base),
                 "seconds": time.perf_counter() - tic})

    tic = time.perf_counter()
    alpha, merged, alpha_table = task_arithmetic_search(base, vectors, val_acc)
    rows.append({"method": f"task arithmetic (alpha={alpha:g})", "learned": 1, "val_acc": val_acc(merged),
                 "test_acc": test_acc(merged), "seconds": time.perf_counter() - tic})

    composers = {}
    for label, granularity in (("learned isotropic", "isotropic"), ("aTLAS (block)", "block")):
        tic = time.perf_counter()
        composer = Composer(base, vectors, granularity, init=0.0)
        schedule = CoefficientSchedule(**{**asdict(config.schedule), "seed": config.seed, "progress": config.progress})
        result = learn_supervised(composer, head, train, val, VisionSuite.for_images(resolution, norm), schedule,
                                  description=label)
        merged = composer.merge()
        rows.append({"method": label, "learned": composer.coefficients.numel(), "val_acc": result.best_metric,
                     "test_acc": test_acc(merged), "seconds": time.perf_counter() - tic,
                     "best_epoch": result.best_epoch})
        composers[granularity] = composer

    out = Path(config.out)
    atlas = composers["block"]
    heatmap = out / "demo_coefficients.png"  # drawn last: results are saved even if plotting fails
    atlas.save_coefficients(out / "demo_coefficients.safetensors", extra={"target": config.target})
    header = (
        f"Few-shot adaptation to **{config.target}** ({config.shots} shots/class, seed {config.seed}; "
        f"{len(train)} training + {0 if val is None else len(val)} selection images; test {len(task.test)}), "
        f"bank of {len(vectors)} task vectors on {bank.config.backbone} @ {resolution}px"
        + (f"; the head is {head_task}'s (it never saw a {config.target} label)" if borrowed else "")
    )
    table = header + "\n\n" + markdown_table(rows, ["method", "learned", "val_acc", "test_acc", "seconds"])
    payload = {
        "config": {"target": config.target, "shots": config.shots, "seed": config.seed, "head": head_task,
                   "bank": asdict(bank.config),
                   "schedule": asdict(config.schedule)},
        "bank": {"root": str(bank.root), "sources": sources, "entries": bank.table(), "seconds": bank_seconds},
        "rows": rows,
        "task_arithmetic_alpha_table": alpha_table,
        "heatmap": str(heatmap),
        "seconds": time.perf_counter() - started,
    }
    json_path, md_path = write_results(out, "demo", payload, table)
    plot_coefficients(
        atlas.block_coefficients(), atlas.block_names, atlas.vector_names, heatmap,
        title=f"aTLAS coefficients, {config.target}, {config.shots} shots",
    )
    payload["files"] = {"json": str(json_path), "markdown": str(md_path), "heatmap": str(heatmap)}
    payload["table"] = table
    return payload
