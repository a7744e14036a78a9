"""aTLAS x K against LoRA as data grows (aTLAS paper, Figure 7 and Table 17).

A target is held out of the bank (:class:`taskvec.heldout.HeldOutTarget`). For each fraction of its
data pool (the suite's few-shot pool; :meth:`~taskvec.heldout.HeldOutTarget.fraction` holds a quarter
out for selection), methods learn on the training part and choose their epoch on the selection part:
``atlas-x<K>`` (block coefficients with every block split into K parts; learnable numbers grow with
K), ``lora`` (a LoRA adapter fine-tuned with ``peft``, its rank matched to the largest K's learnable
count: :func:`taskvec.lora_train.rank_for_budget`) and ``finetune`` (every weight, the ceiling). The
test split is only scored.

Report: test accuracy per method and fraction (mean +- s.e. over seeds), with learnable parameter counts.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from torch import nn

from taskvec.compose import Composer
from taskvec.evaluate import selection_metric
from taskvec.experiment import (
    RecordStore,
    fingerprint,
    grid,
    markdown_table,
    mean_se,
    recipe_command,
    run_grid,
)
from taskvec.heldout import HeldOutSetup, HeldOutTarget
from taskvec.lora_train import TARGET_SETS, LoraSpec, rank_for_budget, resolve_targets, train_lora
from taskvec.objectives import cross_entropy
from taskvec.report import plot_lines, publish
from taskvec.suites import make_suite
from taskvec.train import TrainConfig
from taskvec.workflow import DEFAULT_RESULTS, train_through_backbone

# (ctx, config, training part, selection part, seed) -> (trained model, learnable numbers)
Runner = Callable[..., tuple[nn.Module, int]]


@dataclass
class PeftConfig(HeldOutSetup):
    fractions: tuple[float, ...] = field(default=(0.05, 0.25, 1.0), metadata={
        "help": "fractions of the target's data pool (paper: 0.01 0.05 0.1 0.25 0.5 1)"})
    ks: tuple[int, ...] = field(default=(1, 4), metadata={"help": "aTLAS x K: parts per block"})
    lora: bool = field(default=True, metadata={"help": "LoRA with its rank matched to the largest K"})
    lora_targets: str = field(default="auto", metadata={
        "help": "modules LoRA adapts (auto: attention + MLP on transformers, 1x1 convolutions on CNNs)",
        "choices": TARGET_SETS})
    lora_lr: float = field(default=1e-3, metadata={"help": "LoRA learning rate"})
    finetune: bool = field(default=True, metadata={"help": "full fine-tuning (the ceiling)"})
    finetune_lr: float = field(default=1e-4, metadata={"help": "full fine-tuning learning rate"})
    out: Path = field(default=DEFAULT_RESULTS / "peft", metadata={"help": "results directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1]; got {list(self.fractions)}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"ks must name part counts >= 1; got {list(self.ks)}")
        if self.lora_targets not in TARGET_SETS:
            raise ValueError(f"lora_targets {self.lora_targets!r} is not one of {TARGET_SETS}")


def _atlas(ctx: HeldOutTarget, config: PeftConfig, train, val, seed: int, *, parts: int) -> tuple[nn.Module, int]:
    composer = Composer(ctx.base, ctx.vectors(), f"x{parts}", init=0.0)
    train_through_backbone(composer, ctx.head, train, val, ctx.suite, config.schedule(seed), seed, config.lr,
                           f"aTLAS x{parts}", config.progress)
    return composer.merge(), int(composer.coefficients.numel())


def atlas_parameters(ctx: HeldOutTarget, parts: int) -> int:
    """Learnable numbers of aTLAS x ``parts`` over the leave-one-out bank."""
    return int(Composer(ctx.base, ctx.vectors(), f"x{parts}").coefficients.numel())


def _lora(ctx: HeldOutTarget, config: PeftConfig, train, val, seed: int, *, rank: int) -> tuple[nn.Module, int]:
    suite, head = ctx.suite, ctx.head
    loader = suite.loader(train, batch_size=config.batch_size, augmentation=config.schedule(seed).augmentation,
                          min_steps=config.min_steps)
    run = train_lora(ctx.base, cross_entropy(head), loader, LoraSpec(rank=rank, targets=config.lora_targets, seed=seed),
                     TrainConfig(epochs=config.epochs, lr=config.lora_lr, warmup_fraction=0.0, seed=seed,
                                 train_mode=False, progress=config.progress, description=f"LoRA r{rank}"),
                     evaluate=None if val is None else (lambda m: selection_metric(suite.logits(m, head, val), val)))
    return run.model.eval(), int(run.info["trainable"])


def _finetune(ctx: HeldOutTarget, config: PeftConfig, train, val, seed: int) -> tuple[nn.Module, int]:
    model = copy.deepcopy(ctx.base).requires_grad_(True)
    train_through_backbone(model, ctx.head, train, val, ctx.suite, config.schedule(seed), seed, config.finetune_lr,
                           "full fine-tuning", config.progress)
    return model.eval(), sum(p.numel() for p in model.parameters())


def methods(ctx: HeldOutTarget, config: PeftConfig) -> dict[str, Runner]:
    """The registry for this config: one aTLAS per K, LoRA at the largest K's budget, fine-tuning."""
    registry: dict[str, Runner] = {f"atlas-x{k}": partial(_atlas, parts=k) for k in config.ks}
    if config.lora:
        budget = atlas_parameters(ctx, max(config.ks))
        registry["lora"] = partial(_lora, rank=rank_for_budget(ctx.base, config.lora_targets, budget))
    if config.finetune:
        registry["finetune"] = _finetune
    return registry


def _job(ctx: HeldOutTarget, config: PeftConfig, registry: dict[str, Runner], job: dict) -> dict:
    method, fraction, seed = job["method"], job["fraction"], job["seed"]
    train, val = ctx.fraction(fraction, seed)
    tic = time.perf_counter()
    model, learned = registry[method](ctx, config, train, val, seed)
    return {"method": method, "fraction": fraction, "seed": seed, "test_acc": ctx.test_scores(model)["acc"],
            "selection_acc": ctx.selection_accuracy(model, val), "learned": learned, "train": len(train),
            "selection": len(val), "seconds": time.perf_counter() - tic}


def run_peft(config: PeftConfig | None = None, *, suite=None) -> dict:
    """aTLAS x K vs LoRA vs fine-tuning across data fractions; writes ``<out>/peft.{json,md,png}``."""
    config = config or PeftConfig()
    suite = suite or make_suite("vision", progress=config.progress)
    started = time.perf_counter()
    ctx = HeldOutTarget(suite, config.target)
    config = replace(config, lora_targets=resolve_targets(ctx.base, config.lora_targets))
    registry = methods(ctx, config)
    settings = {**config.numbers(), "lora": [config.lora_targets, config.lora_lr], "finetune_lr": config.finetune_lr,
                "held_out": ctx.identity()}
    store = RecordStore(config.out / "peft_records.jsonl", fingerprint(settings), config.resume)
    jobs = grid(fraction=config.fractions, seed=config.seeds, method=list(registry))
    records = run_grid(jobs, lambda job: _job(ctx, config, registry, dict(job)), store)

    rows: list[dict] = []
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]] = {}
    for method in registry:
        row = {"method": method, "learned": next(r["learned"] for r in records if r["method"] == method)}
        stats = [mean_se([r["test_acc"] for r in records if r["method"] == method and r["fraction"] == f])
                 for f in config.fractions]
        for fraction, (mean, se) in zip(config.fractions, stats, strict=True):
            row[f"{100 * fraction:g}%"] = f"{100 * mean:.1f}" + ("" if se != se else f" ± {100 * se:.1f}")
        rows.append(row)
        series[f"{method} ({row['learned']:,} params)"] = (
            list(config.fractions), [m for m, _ in stats], [0.0 if s != s else s for _, s in stats])
    header = (f"aTLAS x K vs LoRA vs full fine-tuning on **{ctx.target}** ({suite.name} suite; bank: "
              f"{', '.join(ctx.sources)}) as the data grows: test accuracy %, mean ± s.e. over seeds "
              f"{list(config.seeds)}; columns: fraction of the target's pool ({len(ctx.pool())} samples), a "
              f"quarter of it held out for selection; LoRA on {config.lora_targets}, rank matched to "
              f"x{max(config.ks)}.")
    table = header + "\n\n" + markdown_table(rows)
    plot = plot_lines(series, config.out / "peft.png", xlabel="fraction of the data", ylabel="test accuracy",
                      title=f"Parameter budgets vs data: {ctx.target}", logx=True)
    payload = {"config": {**asdict(config), "out": str(config.out)}, "held_out": ctx.identity(), "records": records,
               "rows": rows, "plot": str(plot), "seconds": time.perf_counter() - started}
    return publish(config.out, "peft", payload, table)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run peft``."""
    recipe_command(subparsers, "peft", PeftConfig, run_peft,
                   help="aTLAS x K vs LoRA vs fine-tuning across data fractions",
                   description=__doc__.split("\n\n")[0])
