"""Low intrinsic dimension (aTLAS paper, Figure 2): a few coefficients in the span of d task vectors
recover far more of full fine-tuning than the same number in a random subspace.

A target is held out of the bank (:class:`taskvec.heldout.HeldOutTarget`). For each d, coefficients are
learned (``isotropic``: d numbers; ``block``: d per parameter block) on the target's k training shots,
epoch chosen on its selection shots, over one of two bases: ``task-vectors`` (the first d vectors of
the leave-one-out bank) or ``random`` (:func:`taskvec.subspace.random_bases`: Gaussian directions
with the same norm, block by block, as those d vectors). Accuracy is normalised by full fine-tuning:
the target's own task vector applied at 1 (the reference only; it is never a basis). The test split
is only scored.

Report: normalised test accuracy vs d for both bases (mean +- s.e. over seeds), the raw accuracies,
and the fine-tuned reference.
"""

from __future__ import annotations

import argparse
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
)
from taskvec.heldout import HeldOutSetup, HeldOutTarget
from taskvec.report import plot_lines, publish
from taskvec.subspace import random_bases
from taskvec.suites import make_suite
from taskvec.workflow import DEFAULT_RESULTS, train_through_backbone


@dataclass(frozen=True)
class Basis:
    label: str
    make: Callable[[list, int, int], list]  # (leave-one-out bank, d, seed) -> d basis vectors


BASES: dict[str, Basis] = {
    "task-vectors": Basis("task vectors", lambda bank, d, seed: bank[:d]),
    "random": Basis("random (same block norms)", lambda bank, d, seed: random_bases(bank[:d], seed=seed)),
}
GRANULARITIES = ("isotropic", "block")


@dataclass
class SubspaceConfig(HeldOutSetup):
    bases: tuple[str, ...] = field(default=tuple(BASES), metadata={"help": "bases to compare",
                                                                    "choices": tuple(BASES)})
    dims: tuple[int, ...] = field(default=(1, 2, 4), metadata={"help": "subspace dimensions d (<= bank size)"})
    granularity: str = field(default="isotropic", metadata={
        "help": "isotropic: d coefficients; block: d per parameter block", "choices": GRANULARITIES})
    out: Path = field(default=DEFAULT_RESULTS / "subspace", metadata={"help": "results directory"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dims or any(d < 1 for d in self.dims):
            raise ValueError(f"dims must name dimensions >= 1; got {list(self.dims)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")


def finetuned_accuracy(ctx: HeldOutTarget) -> float:
    """Test accuracy of the target's own fine-tuned model (base + its vector): the normaliser."""
    own = ctx.suite.vectors([ctx.target])[0]
    return ctx.test_scores(own.apply_to(ctx.base, 1.0))["acc"]


def _job(ctx: HeldOutTarget, config: SubspaceConfig, reference: float, job: dict) -> dict:
    basis, d, k, seed = job["basis"], job["d"], job["k"], job["seed"]
    bank = ctx.vectors()
    if d > len(bank):
        raise ValueError(f"d={d} exceeds the leave-one-out bank of {len(bank)} vectors ({ctx.sources})")
    vectors = BASES[basis].make(bank, d, seed)
    train, val = ctx.shots(k, seed)
    tic = time.perf_counter()
    composer = Composer(ctx.base, vectors, config.granularity, init=0.0)
    selection, detail = train_through_backbone(composer, ctx.head, train, val, ctx.suite, config.schedule(seed), seed,
                                               config.lr, f"{basis} d={d}", config.progress)
    accuracy = ctx.test_scores(composer.merge())["acc"]
    return {"basis": basis, "d": d, "k": k, "seed": seed, "test_acc": accuracy, "normalized": accuracy / reference,
            "selection_acc": selection, "learned": int(composer.coefficients.numel()),
            "vectors": [v.name for v in vectors], "best_epoch": detail["best_epoch"],
            "seconds": time.perf_counter() - tic}


def run_subspace(config: SubspaceConfig | None = None, *, suite=None) -> dict:
    """Span of d task vectors vs d norm-matched random bases; writes ``<out>/subspace.{json,md,png}``."""
    config = config or SubspaceConfig()
    suite = suite or make_suite("vision", progress=config.progress)
    started = time.perf_counter()
    ctx = HeldOutTarget(suite, config.target)
    reference = finetuned_accuracy(ctx)
    settings = {**config.numbers(), "granularity": config.granularity, "held_out": ctx.identity()}
    store = RecordStore(config.out / "subspace_records.jsonl", fingerprint(settings), config.resume)
    jobs = grid(k=config.shots, seed=config.seeds, d=config.dims, basis=config.bases)
    records = run_grid(jobs, lambda job: _job(ctx, config, reference, dict(job)), store)

    rows: list[dict] = []
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]] = {}
    for k in config.shots:
        for basis in config.bases:
            row, points = {"basis": BASES[basis].label, "k": k}, []
            for d in config.dims:
                rs = [r for r in records if r["basis"] == basis and r["k"] == k and r["d"] == d]
                norm, se = mean_se([r["normalized"] for r in rs])
                raw = mean_se([r["test_acc"] for r in rs])[0]
                row[f"d={d}"] = f"{100 * norm:.1f}" + ("" if se != se else f" ± {100 * se:.1f}") + f" ({100 * raw:.1f})"
                points.append((d, norm, 0.0 if se != se else se))
            rows.append(row)
            series[f"{BASES[basis].label}, k={k}"] = ([float(p[0]) for p in points], [p[1] for p in points],
                                                      [p[2] for p in points])
    header = (f"Intrinsic dimension on **{ctx.target}** ({suite.name} suite): test accuracy as % of full "
              f"fine-tuning ({100 * reference:.1f}% = base + the target's own vector), raw accuracy % in "
              f"brackets; {config.granularity} coefficients over d bases from the leave-one-out bank "
              f"({', '.join(ctx.sources)}) or random with the same block norms; mean ± s.e. over seeds "
              f"{list(config.seeds)}.")
    table = header + "\n\n" + markdown_table(rows)
    plot = plot_lines(series, config.out / "subspace.png", xlabel="dimension d", ylabel="accuracy / fine-tuned",
                      title=f"Task-vector vs random subspaces: {ctx.target}")
    payload = {"config": {**asdict(config), "out": str(config.out)}, "held_out": ctx.identity(),
               "finetuned_test_acc": reference, "records": records, "rows": rows, "plot": str(plot),
               "seconds": time.perf_counter() - started}
    return publish(config.out, "subspace", payload, table)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run subspace``."""
    recipe_command(subparsers, "subspace", SubspaceConfig, run_subspace,
                   help="span of d task vectors vs d random bases (intrinsic dimension)",
                   description=__doc__.split("\n\n")[0])
