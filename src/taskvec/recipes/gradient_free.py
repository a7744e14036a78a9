"""Gradient-free coefficients (aTLAS paper, Table 16): an evolutionary search (nevergrad's NGOpt, as in
LoraHub) against gradient-based aTLAS on the same shots.

A target is held out of the bank (:class:`taskvec.heldout.HeldOutTarget`). The search minimises the
cross-entropy of the composed model on the target's k training shots under ``torch.no_grad``
(:func:`taskvec.search.search_coefficients`), over one coefficient per vector (``ngopt-isotropic``) or
one per vector and block (``ngopt-block``), within a budget of objective evaluations; the best
evaluated point is kept. ``atlas`` learns the block coefficients by gradient descent on the same shots,
epoch chosen on the selection shots. The test split is only scored.

Report per method: test accuracy (mean +- s.e. over seeds), learned coefficients, evaluations (search)
or epochs (gradient), wall time and peak resident memory (VmHWM reset at each job's start).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from taskvec.compose import Composer
from taskvec.experiment import (
    RecordStore,
    fingerprint,
    grid,
    markdown_table,
    mean_se,
    plot_bars,
    recipe_command,
    run_grid,
    values_cell,
)
from taskvec.heldout import HeldOutSetup, HeldOutTarget
from taskvec.measure import peak_memory
from taskvec.objectives import cross_entropy
from taskvec.report import publish
from taskvec.search import search_coefficients
from taskvec.suites import make_suite
from taskvec.workflow import DEFAULT_RESULTS, learn_atlas

# (ctx, config, bank, train shots, selection shots, seed) -> (merged model, details)
Runner = Callable[[HeldOutTarget, Any, list, Any, Any, int], tuple[nn.Module, dict]]


@dataclass(frozen=True)
class Method:
    label: str
    run: Runner


def _atlas(ctx: HeldOutTarget, config: GradientFreeConfig, bank: list, train, val, seed: int):
    merged, _, detail = learn_atlas(ctx.base, bank, ctx.head, train, val, ctx.suite, config.schedule(seed), seed,
                                    "aTLAS (gradient)", config.progress)
    return merged, {"learned": detail["learned"], "best_epoch": detail["best_epoch"], "evaluations": None}


def _search(ctx: HeldOutTarget, config: GradientFreeConfig, bank: list, train, val, seed: int, *, mode: str):
    composer = Composer(ctx.base, bank, "block", init=0.0)
    batches = ctx.batches(train, config.batch_size, seed)
    found = search_coefficients(composer, cross_entropy(ctx.head), batches, mode=mode, budget=config.budget,
                                seed=seed, bounds=(-config.bound, config.bound), optimizer=config.optimizer)
    learned = composer.num_vectors if mode == "isotropic" else int(composer.coefficients.numel())
    return composer.merge(), {"learned": learned, "evaluations": found.evaluations, "best_loss": found.best_loss,
                              "initial_loss": found.initial_loss, "search_seconds": found.seconds,
                              "best_at": min(h["evaluation"] for h in found.history if h["loss"] == found.best_loss)}


METHODS: dict[str, Method] = {
    "atlas": Method("aTLAS (gradient, block)", _atlas),
    "ngopt-isotropic": Method("NGOpt (isotropic)", partial(_search, mode="isotropic")),
    "ngopt-block": Method("NGOpt (block)", partial(_search, mode="block")),
}


@dataclass
class GradientFreeConfig(HeldOutSetup):
    methods: tuple[str, ...] = field(default=tuple(METHODS), metadata={
        "help": "methods to compare", "choices": tuple(METHODS)})
    budget: int = field(default=100, metadata={"help": "objective evaluations per search"})
    bound: float = field(default=1.5, metadata={"help": "coefficients searched within [-bound, bound]"})
    optimizer: str = field(default="NGOpt", metadata={"help": "nevergrad optimiser (NGOpt, CMA, OnePlusOne...)"})
    out: Path = field(default=DEFAULT_RESULTS / "gradient_free", metadata={"help": "results directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods {unknown or '()'} must name some of {list(METHODS)}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 evaluation; got {self.budget}")
        if not self.bound > 0:
            raise ValueError(f"bound must be > 0; got {self.bound}")


def _job(ctx: HeldOutTarget, config: GradientFreeConfig, job: dict) -> dict:
    method, k, seed = job["method"], job["k"], job["seed"]
    train, val = ctx.shots(k, seed)
    bank = ctx.vectors()
    tic, cpu = time.perf_counter(), time.process_time()
    with peak_memory() as memory:
        merged, detail = METHODS[method].run(ctx, config, bank, train, val, seed)
    seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu
    scores = ctx.test_scores(merged)
    return {"method": method, "k": k, "seed": seed, "test_acc": scores["acc"],
            "test_balanced_acc": scores.get("balanced_acc"), "selection_acc": ctx.selection_accuracy(merged, val),
            "seconds": seconds, "cpu_seconds": cpu_seconds, "memory": memory.to_dict(), "train_shots": len(train),
            **detail}


def run_gradient_free(config: GradientFreeConfig | None = None, *, suite=None) -> dict:
    """NGOpt vs gradient aTLAS on a held-out target; writes ``<out>/gradient_free.{json,md,png}``."""
    config = config or GradientFreeConfig()
    suite = suite or make_suite("vision", progress=config.progress)
    started = time.perf_counter()
    ctx = HeldOutTarget(suite, config.target)
    settings = {**config.numbers(), "budget": config.budget, "bound": config.bound, "optimizer": config.optimizer,
                "held_out": ctx.identity()}
    store = RecordStore(config.out / "gradient_free_records.jsonl", fingerprint(settings), config.resume)
    jobs = grid(k=config.shots, seed=config.seeds, method=config.methods)
    records = run_grid(jobs, lambda job: _job(ctx, config, dict(job)), store)

    rows = []
    for k in config.shots:
        for method in config.methods:
            rs = [r for r in records if r["method"] == method and r["k"] == k]
            rows.append({"method": METHODS[method].label, "k": k, "seeds": len(rs), "learned": rs[0]["learned"],
                         "evaluations": rs[0]["evaluations"] or f"{config.epochs} epochs",
                         "test acc %": values_cell([r["test_acc"] for r in rs]),
                         "selection acc %": values_cell([r["selection_acc"] for r in rs
                                                         if r["selection_acc"] is not None]),
                         "wall s": values_cell([r["seconds"] for r in rs], scale=1.0),
                         "CPU s": values_cell([r["cpu_seconds"] for r in rs], scale=1.0),
                         "peak RSS MiB": values_cell([r["memory"]["peak_mib"] for r in rs], scale=1.0, digits=0),
                         "peak over start MiB": values_cell([r["memory"]["added_mib"] for r in rs], scale=1.0,
                                                            digits=0)})
    header = (f"Gradient-free vs gradient coefficients on **{ctx.target}** ({suite.name} suite), leave-one-out "
              f"bank of {len(ctx.sources)} vectors; {config.optimizer} budget {config.budget} evaluations of the "
              f"training-shot cross-entropy within ±{config.bound:g}; aTLAS {config.epochs} epochs, lr "
              f"{config.lr:g}; mean ± s.e. over seeds {list(config.seeds)}. Peak RSS: VmHWM reset per job.")
    table = header + "\n\n" + markdown_table(rows)
    k = config.shots[-1]
    plot = plot_bars({METHODS[m].label: mean_se([r["test_acc"] for r in records if r["method"] == m and r["k"] == k])[0]
                      for m in config.methods}, config.out / "gradient_free.png", ylabel="test accuracy",
                     title=f"{ctx.target}, k={k}")
    payload = {"config": {**asdict(config), "out": str(config.out)}, "held_out": ctx.identity(), "records": records,
               "rows": rows, "plot": str(plot), "seconds": time.perf_counter() - started}
    return publish(config.out, "gradient_free", payload, table)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run gradient-free``."""
    recipe_command(subparsers, "gradient-free", GradientFreeConfig, run_gradient_free,
                   help="NGOpt coefficient search vs gradient aTLAS",
                   description=__doc__.split("\n\n")[0])
