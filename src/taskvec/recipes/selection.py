"""Choosing task vectors under a memory budget (aTLAS paper, open question 2): keep N of the bank, then
learn aTLAS coefficients over the N kept.

A target is held out of the bank (:class:`taskvec.heldout.HeldOutTarget`). Every selection rule reads
the target's k *training* shots only (:mod:`taskvec.selection`): ``features`` (cosine of mean
pre-trained features, target shots vs a seeded sample of each source task's training split),
``gradient`` (coefficient-gradient norm at lambda = 0), ``blockwise`` (per block the top-N vectors by
gradient, mixed into N synthetic vectors) and ``random`` (the floor). aTLAS then learns block
coefficients over the kept vectors, epoch chosen on the selection shots; ``all`` (the whole bank) is the
ceiling. The test split is only scored.

Report: test accuracy vs N per rule (mean +- s.e. over seeds), bytes of the kept vectors, which vectors
were kept, and peak resident memory while learning (VmHWM reset after the full bank is dropped).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from taskvec import selection as rules
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
from taskvec.measure import peak_memory
from taskvec.objectives import cross_entropy
from taskvec.report import plot_lines, publish
from taskvec.suites import make_suite
from taskvec.workflow import DEFAULT_RESULTS, learn_atlas

Rule = Callable[["HeldOutTarget", "SelectionConfig", list, object, int, int], rules.Selection]


@dataclass(frozen=True)
class Method:
    label: str
    run: Rule


def _features(ctx: HeldOutTarget, config: SelectionConfig, bank: list, train, n: int, seed: int) -> rules.Selection:
    def sample(task: str):
        split = ctx.suite.splits(task).train
        keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:config.feature_samples]
        return ctx.batches(split.subset(keep), config.batch_size)

    return rules.select_by_features(bank, n, ctx.base, ctx.batches(train, config.batch_size),
                                    [sample(t) for t in ctx.sources])


def _gradient(ctx: HeldOutTarget, config: SelectionConfig, bank: list, train, n: int, seed: int) -> rules.Selection:
    return rules.select_by_gradient(ctx.base, bank, n, cross_entropy(ctx.head), ctx.batches(train, config.batch_size))


def _blockwise(ctx: HeldOutTarget, config: SelectionConfig, bank: list, train, n: int, seed: int) -> rules.Selection:
    return rules.select_blockwise(ctx.base, bank, n, cross_entropy(ctx.head), ctx.batches(train, config.batch_size))


def _random(ctx: HeldOutTarget, config: SelectionConfig, bank: list, train, n: int, seed: int) -> rules.Selection:
    return rules.select_random(bank, n, seed=seed)


def _all(ctx: HeldOutTarget, config: SelectionConfig, bank: list, train, n: int, seed: int) -> rules.Selection:
    return rules.Selection("all", list(range(len(bank))), [], list(bank))


METHODS: dict[str, Method] = {
    "features": Method("mean-feature similarity", _features),
    "gradient": Method("coefficient gradient", _gradient),
    "blockwise": Method("blockwise gradient (synthetic)", _blockwise),
    "random": Method("random", _random),
    "all": Method("whole bank (no selection)", _all),
}


@dataclass
class SelectionConfig(HeldOutSetup):
    methods: tuple[str, ...] = field(default=tuple(METHODS), metadata={
        "help": "selection rules ('all': the whole bank, once per k and seed)", "choices": tuple(METHODS)})
    keep: tuple[int, ...] = field(default=(1, 2, 4), metadata={"help": "how many vectors to keep (N)"})
    feature_samples: int = field(default=64, metadata={
        "help": "features: training samples per source task whose mean feature it compares"})
    out: Path = field(default=DEFAULT_RESULTS / "selection", metadata={"help": "results directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.keep or any(n < 1 for n in self.keep):
            raise ValueError(f"keep must name sizes >= 1; got {list(self.keep)}")
        if self.feature_samples < 1:
            raise ValueError(f"feature_samples must be >= 1; got {self.feature_samples}")


def _job(ctx: HeldOutTarget, config: SelectionConfig, job: dict) -> dict:
    method, n, k, seed = job["method"], job["n"], job["k"], job["seed"]
    train, val = ctx.shots(k, seed)
    bank = ctx.vectors()
    if n > len(bank):
        raise ValueError(f"keep={n} exceeds the leave-one-out bank of {len(bank)} vectors ({ctx.sources})")
    tic = time.perf_counter()
    chosen = METHODS[method].run(ctx, config, bank, train, n, seed)
    select_seconds = time.perf_counter() - tic
    full_bytes = sum(rules.vector_nbytes(v) for v in bank)
    kept, names = chosen.vectors, [ctx.sources[i] for i in chosen.indices]
    del bank, chosen.vectors
    gc.collect()
    tic = time.perf_counter()
    with peak_memory() as memory:
        merged, selection, detail = learn_atlas(ctx.base, kept, ctx.head, train, val, ctx.suite,
                                                config.schedule(seed), seed, f"aTLAS {method} N={n}", config.progress)
    return {"method": method, "n": len(kept), "k": k, "seed": seed, "test_acc": ctx.test_scores(merged)["acc"],
            "selection_acc": selection, "kept": names, "scores": chosen.scores, "sources": chosen.sources,
            "kept_bytes": sum(rules.vector_nbytes(v) for v in kept), "bank_bytes": full_bytes,
            "memory": memory.to_dict(), "select_seconds": select_seconds, "learn_seconds": time.perf_counter() - tic,
            "learned": detail["learned"]}


def run_selection(config: SelectionConfig | None = None, *, suite=None) -> dict:
    """Keep N of a held-out target's bank by each rule, then aTLAS; writes ``<out>/selection.{json,md,png}``."""
    config = config or SelectionConfig()
    suite = suite or make_suite("vision", progress=config.progress)
    started = time.perf_counter()
    ctx = HeldOutTarget(suite, config.target)
    settings = {**config.numbers(), "feature_samples": config.feature_samples, "held_out": ctx.identity()}
    store = RecordStore(config.out / "selection_records.jsonl", fingerprint(settings), config.resume)
    ranked = [m for m in config.methods if m != "all"]
    jobs = grid(k=config.shots, seed=config.seeds, n=config.keep, method=ranked) if ranked else []
    if "all" in config.methods:
        jobs += grid(k=config.shots, seed=config.seeds, n=(len(ctx.sources),), method=("all",))
    records = run_grid(jobs, lambda job: _job(ctx, config, dict(job)), store)

    rows: list[dict] = []
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]] = {}
    for k in config.shots:
        for method in config.methods:
            sizes = sorted({r["n"] for r in records if r["method"] == method and r["k"] == k})
            row = {"method": METHODS[method].label, "k": k}
            means = []
            for n in sizes:
                rs = [r for r in records if r["method"] == method and r["k"] == k and r["n"] == n]
                mean, se = mean_se([r["test_acc"] for r in rs])
                means.append((n, mean, 0.0 if se != se else se))
                row[f"N={n}" if method != "all" else "all"] = (
                    f"{100 * mean:.1f}" + ("" if se != se else f" ± {100 * se:.1f}")
                    + f" ({rs[0]['kept_bytes'] / 2**20:.1f} MiB, peak {rs[0]['memory']['peak_mib']:.0f} MiB)")
            rows.append(row)
            if method != "all":
                series[f"{METHODS[method].label}, k={k}"] = ([float(p[0]) for p in means], [p[1] for p in means],
                                                            [p[2] for p in means])
    header = (f"Keeping N of the bank for **{ctx.target}** ({suite.name} suite; leave-one-out bank of "
              f"{len(ctx.sources)}: {', '.join(ctx.sources)}): test accuracy % after aTLAS over the kept vectors "
              f"(mean ± s.e. over seeds {list(config.seeds)}), kept bytes and peak RSS while learning.")
    table = header + "\n\n" + markdown_table(rows)
    plot = plot_lines(series, config.out / "selection.png", xlabel="vectors kept (N)", ylabel="test accuracy",
                      title=f"Selection under a memory budget: {ctx.target}")
    payload = {"config": {**asdict(config), "out": str(config.out)}, "held_out": ctx.identity(), "records": records,
               "rows": rows, "plot": str(plot), "seconds": time.perf_counter() - started}
    return publish(config.out, "selection", payload, table)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run selection``."""
    recipe_command(subparsers, "selection", SelectionConfig, run_selection,
                   help="keep N task vectors by features/gradient/blockwise/random",
                   description=__doc__.split("\n\n")[0])
