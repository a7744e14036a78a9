"""Bit-width of the bank (aTLAS paper, open question 3): does few-shot aTLAS survive a bank stored in
bf16, fp16, int8 or int4?

For every storage the leave-one-out bank of a held-out target is stored in that form (fp32: the plain
dense vectors; the others: :func:`taskvec.quantize.quantize_bank`, dequantised a chunk at a time inside
the composition, never whole) and aTLAS learns block coefficients on the target's k training shots,
epoch chosen on its selection shots (:class:`taskvec.heldout.HeldOutTarget`); the test split is only
scored. Optionally (``--addition``) task addition over the same stored bank: base + alpha * sum of
vectors, alpha chosen on each source task's validation split, scored on their test splits.

Report per storage: test accuracy (mean +- s.e. over seeds), bank bytes in storage form, peak resident
memory while learning (VmHWM, reset at the start of each job) and the median time of one training step.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from taskvec.compose import Composer
from taskvec.experiment import (
    RecordStore,
    fingerprint,
    grid,
    markdown_table,
    mean_se,
    recipe_command,
    run_grid,
    values_cell,
)
from taskvec.heldout import HeldOutSetup, HeldOutTarget
from taskvec.measure import peak_memory, time_step
from taskvec.merging import alpha_search, task_arithmetic
from taskvec.objectives import cross_entropy
from taskvec.quantize import quantize_bank
from taskvec.report import plot_lines, publish
from taskvec.selection import vector_nbytes
from taskvec.suites import make_suite
from taskvec.workflow import DEFAULT_RESULTS, learn_atlas


@dataclass(frozen=True)
class Storage:
    label: str
    store: Callable[[list], list]


def _quantised(scheme: str) -> Storage:
    return Storage(f"{scheme} (quantised)", lambda vectors: quantize_bank(vectors, scheme))


STORAGES: dict[str, Storage] = {
    "fp32": Storage("fp32 (dense)", lambda vectors: vectors),
    **{s: _quantised(s) for s in ("bf16", "fp16", "int8-row", "int4-row", "int4-g64")},
}


@dataclass
class PrecisionConfig(HeldOutSetup):
    storages: tuple[str, ...] = field(default=tuple(STORAGES), metadata={
        "help": "how the bank is stored", "choices": tuple(STORAGES)})
    addition: bool = field(default=False, metadata={
        "help": "also task addition over the stored bank (alpha on each source's validation split)"})
    alphas: tuple[float, ...] = field(default=(0.1, 0.2, 0.3, 0.4, 0.5), metadata={
        "help": "task addition: the alpha grid searched on validation data"})
    step_repeats: int = field(default=3, metadata={"help": "timed training steps per storage (median kept)"})
    out: Path = field(default=DEFAULT_RESULTS / "precision", metadata={"help": "results directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [s for s in self.storages if s not in STORAGES]
        if unknown or not self.storages:
            raise ValueError(f"storages {unknown or '()'} must name some of {list(STORAGES)}")
        if not self.alphas:
            raise ValueError("alphas must name at least one value")
        if self.step_repeats < 1:
            raise ValueError(f"step_repeats must be >= 1; got {self.step_repeats}")


def _stored_bank(ctx: HeldOutTarget, storage: str) -> list:
    """The leave-one-out bank in storage form; the dense copy is dropped before anything is measured."""
    vectors = ctx.vectors()
    stored = STORAGES[storage].store(vectors)
    del vectors
    gc.collect()
    return stored


def _fewshot_job(ctx: HeldOutTarget, config: PrecisionConfig, job: dict) -> dict:
    storage, k, seed = job["storage"], job["k"], job["seed"]
    bank = _stored_bank(ctx, storage)
    train, val = ctx.shots(k, seed)
    tic, cpu = time.perf_counter(), time.process_time()
    with peak_memory() as memory:
        merged, selection, detail = learn_atlas(ctx.base, bank, ctx.head, train, val, ctx.suite,
                                                config.schedule(seed), seed, f"aTLAS {storage}", config.progress)
    seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu
    composer = Composer(ctx.base, bank, "block", init=0.0)
    batch = ctx.batches(train, config.batch_size, seed)[0]
    step = time_step(composer, cross_entropy(ctx.head), batch, repeats=config.step_repeats)
    step_cpu = time_step(composer, cross_entropy(ctx.head), batch, repeats=config.step_repeats, clock=time.process_time)
    scores = ctx.test_scores(merged)
    return {"storage": storage, "k": k, "seed": seed, "test_acc": scores["acc"],
            "test_balanced_acc": scores.get("balanced_acc"), "selection_acc": selection,
            "bank_bytes": sum(vector_nbytes(v) for v in bank), "composer_bank_bytes": composer.bank_nbytes(),
            "memory": memory.to_dict(), "step_seconds": step, "step_cpu_seconds": step_cpu,
            "seconds": seconds, "cpu_seconds": cpu_seconds,
            "best_epoch": detail["best_epoch"], "train_shots": len(train)}


def _addition_job(ctx: HeldOutTarget, config: PrecisionConfig, job: dict) -> dict:
    """Task arithmetic over the stored bank (dequantised to merge): alpha on the sources' validation splits."""
    bank = _stored_bank(ctx, job["storage"])
    dense = [v.to_dense() if hasattr(v, "to_dense") else v for v in bank]
    summed = task_arithmetic(dense, 1.0)
    suite, tasks = ctx.suite, ctx.sources
    heads, splits = {t: suite.head(t) for t in tasks}, {t: suite.splits(t) for t in tasks}

    def mean_acc(model, split: str) -> float:
        return sum(suite.accuracy(model, heads[t], getattr(splits[t], split)) for t in tasks) / len(tasks)

    alpha, _ = alpha_search(lambda a: mean_acc(summed.apply_to(ctx.base, a), "val"), config.alphas)
    return {"storage": job["storage"], "alpha": alpha, "test_acc": mean_acc(summed.apply_to(ctx.base, alpha), "test"),
            "tasks": tasks}


def run_precision(config: PrecisionConfig | None = None, *, suite=None) -> dict:
    """Few-shot aTLAS (and optionally task addition) per bank storage; writes ``<out>/precision.{json,md,png}``."""
    config = config or PrecisionConfig()
    suite = suite or make_suite("vision", progress=config.progress)
    started = time.perf_counter()
    ctx = HeldOutTarget(suite, config.target)
    settings = {**config.numbers(), "step_repeats": config.step_repeats, "alphas": config.alphas,
                "held_out": ctx.identity()}
    store = RecordStore(config.out / "precision_records.jsonl", fingerprint(settings), config.resume)
    jobs = grid(storage=config.storages, k=config.shots, seed=config.seeds)
    records = run_grid(jobs, lambda job: _fewshot_job(ctx, config, dict(job)), store)
    additions = []
    if config.addition:
        additions = run_grid(grid(storage=config.storages, task=("addition",)),
                             lambda job: _addition_job(ctx, config, dict(job)), store)

    rows = []
    for storage in config.storages:
        for k in config.shots:
            rs = [r for r in records if r["storage"] == storage and r["k"] == k]
            row = {"storage": STORAGES[storage].label, "k": k, "seeds": len(rs),
                   "test acc %": values_cell([r["test_acc"] for r in rs]),
                   "bank MiB": f"{rs[0]['bank_bytes'] / 2**20:.2f}",
                   "peak RSS MiB": values_cell([r["memory"]["peak_mib"] for r in rs], scale=1.0),
                   "peak over start MiB": values_cell([r["memory"]["added_mib"] for r in rs], scale=1.0),
                   "step ms": values_cell([r["step_seconds"] for r in rs], scale=1000.0),
                   "step CPU ms": values_cell([r["step_cpu_seconds"] for r in rs], scale=1000.0),
                   "learn s (CPU s)": values_cell([r["seconds"] for r in rs], scale=1.0)
                   + f" ({mean_se([r['cpu_seconds'] for r in rs])[0]:.0f})"}
            added = [a for a in additions if a["storage"] == storage]
            if added:
                row["addition acc %"] = f"{100 * added[0]['test_acc']:.1f} (α={added[0]['alpha']:g})"
            rows.append(row)
    header = (f"Bank storage vs few-shot aTLAS on **{ctx.target}** ({suite.name} suite), leave-one-out bank of "
              f"{len(ctx.sources)} vectors ({', '.join(ctx.sources)}); {config.epochs} epochs, lr {config.lr:g}, "
              f"epoch chosen on the selection shots; mean ± s.e. over seeds {list(config.seeds)}. Peak RSS is "
              "VmHWM, reset at each job's start; step = forward + backward of one batch "
              "(median; wall clock and this process's CPU time).")
    table = header + "\n\n" + markdown_table(rows)
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]] = {}
    for k in config.shots:
        sizes = [next(r["bank_bytes"] for r in records if r["storage"] == s) / 2**20 for s in config.storages]
        accuracy = [mean_se([r["test_acc"] for r in records if r["k"] == k and r["storage"] == s])[0]
                    for s in config.storages]
        series[f"k={k}"] = (sizes, accuracy, None)
    plot = plot_lines(series, config.out / "precision.png", xlabel="bank MiB (storage form)",
                      ylabel="test accuracy", title=f"aTLAS on {ctx.target} vs bank storage", logx=True)
    payload = {"config": {**asdict(config), "out": str(config.out)}, "held_out": ctx.identity(),
               "records": records, "addition": additions, "rows": rows, "plot": str(plot),
               "seconds": time.perf_counter() - started}
    return publish(config.out, "precision", payload, table)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run precision``."""
    recipe_command(subparsers, "precision", PrecisionConfig, run_precision,
                   help="few-shot aTLAS with the bank stored in fp32/bf16/fp16/int8/int4",
                   description=__doc__.split("\n\n")[0])
