"""LoRA adapters as a sparse bank (aTLAS paper, Tables 4 and 15): few-shot aTLAS over LoRA task vectors
against the standard (dense) bank.

Every source task of a held-out target's leave-one-out bank gets a LoRA adapter per (rank, targets),
fine-tuned with ``peft`` on the source's training split through its head
(:func:`taskvec.lora_train.train_lora`), saved as a PEFT adapter directory and read back through the
adapter import (:func:`taskvec.hf.adapters.load_adapter`); adapters already saved are reused. Banks
compared: ``dense`` (the suite's vectors, all blocks), ``dense-<targets>`` (the same vectors restricted
to the weight matrices the LoRA targets adapt) and ``lora-r<rank>-<targets>``. On each, aTLAS learns
block coefficients on the target's k training shots, epoch chosen on its selection shots
(:class:`taskvec.heldout.HeldOutTarget`); the test split is only scored.

Report: test accuracy per bank and k (mean +- s.e. over seeds) and the bank's bytes in storage form.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from taskvec.experiment import (
    RecordStore,
    fingerprint,
    grid,
    markdown_table,
    mean_se,
    plot_bars,
    recipe_command,
    run_grid,
)
from taskvec.heldout import HeldOutSetup, HeldOutTarget
from taskvec.hf.adapters import load_adapter
from taskvec.lora_train import (
    RECORD_FILE,
    TARGET_SETS,
    LoraSpec,
    lora_target_modules,
    resolve_targets,
    save_adapter,
    train_lora,
)
from taskvec.objectives import cross_entropy
from taskvec.report import publish
from taskvec.selection import vector_nbytes
from taskvec.suites import make_suite
from taskvec.train import TrainConfig
from taskvec.vectors import TaskVector
from taskvec.workflow import DEFAULT_RESULTS, learn_atlas


@dataclass
class LoraConfig(HeldOutSetup):
    ranks: tuple[int, ...] = field(default=(4, 16), metadata={"help": "LoRA ranks (paper: 4 16 64)"})
    modules: tuple[str, ...] = field(default=("auto",), metadata={
        "help": "modules adapted (attention/mlp/both on transformers, conv1x1 on CNNs; auto: both or conv1x1)",
        "choices": TARGET_SETS})
    dense: bool = field(default=True, metadata={"help": "also the dense bank, whole and restricted to the targets"})
    lora_epochs: int = field(default=1, metadata={"help": "LoRA fine-tuning epochs per source task"})
    lora_steps: int = field(default=60, metadata={"help": "LoRA fine-tuning batches per epoch at least"})
    lora_lr: float = field(default=1e-3, metadata={"help": "LoRA fine-tuning learning rate"})
    lora_batch_size: int = field(default=32, metadata={"help": "LoRA fine-tuning batch size"})
    out: Path = field(default=DEFAULT_RESULTS / "lora", metadata={"help": "results directory (adapters under it)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must name ranks >= 1; got {list(self.ranks)}")
        for name in ("lora_epochs", "lora_steps", "lora_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")

    def training(self) -> dict:
        """What determines an adapter besides its spec (part of its directory name)."""
        return {"epochs": self.lora_epochs, "steps": self.lora_steps, "lr": self.lora_lr,
                "batch_size": self.lora_batch_size, "augmentation": self.augmentation}

    def specs(self) -> dict[str, LoraSpec]:
        return {f"lora-r{r}-{t}": LoraSpec(rank=r, targets=t) for t in self.modules for r in self.ranks}


def adapter(ctx: HeldOutTarget, config: LoraConfig, bank: str, task: str):
    """The LoRA vector of ``task`` for ``bank``: trained and saved once, then read back from its directory."""
    trained_as = fingerprint({**config.training(), "suite": ctx.suite.identity()})
    spec, directory = config.specs()[bank], config.out / "adapters" / trained_as / bank / task
    if not (directory / RECORD_FILE).is_file():
        suite = ctx.suite
        loader = suite.loader(suite.splits(task).train, batch_size=config.lora_batch_size,
                              augmentation=None if config.augmentation == "none" else config.augmentation,
                              min_steps=config.lora_steps)
        run = train_lora(ctx.base, cross_entropy(suite.head(task)), loader, spec,
                         TrainConfig(epochs=config.lora_epochs, lr=config.lora_lr, train_mode=False,
                                     progress=config.progress, description=f"LoRA {bank} {task}"))
        save_adapter(run, directory, ctx.base, name=task, extra={"suite": ctx.suite.identity()})
    recorded = json.loads((directory / RECORD_FILE).read_text())
    if recorded["spec"]["rank"] != spec.rank or recorded["spec"]["targets"] != spec.targets:
        raise ValueError(f"{directory}: holds a {recorded['spec']} adapter, not {asdict(spec)}; use another --out")
    return load_adapter(directory, ctx.base, name=task)


def _restricted(vectors: list[TaskVector], blocks: list[str]) -> list[TaskVector]:
    """The dense vectors on ``blocks`` only; the base fingerprint keeps naming the blocks it was taken over."""
    return [TaskVector({b: v.tensors[b] for b in blocks}, check_finite=False,
                       metadata={"fingerprint_blocks": json.dumps(v.names), **v.metadata}) for v in vectors]


def _bank(ctx: HeldOutTarget, config: LoraConfig, bank: str) -> list:
    if bank in config.specs():
        return [adapter(ctx, config, bank, task) for task in ctx.sources]
    if bank == "dense":
        return ctx.vectors()
    modules = lora_target_modules(ctx.base, bank.removeprefix("dense-"))
    return _restricted(ctx.vectors(), [f"{m}.weight" for m in modules])


def _job(ctx: HeldOutTarget, config: LoraConfig, job: dict) -> dict:
    bank_name, k, seed = job["bank"], job["k"], job["seed"]
    bank = _bank(ctx, config, bank_name)
    train, val = ctx.shots(k, seed)
    tic = time.perf_counter()
    merged, selection, detail = learn_atlas(ctx.base, bank, ctx.head, train, val, ctx.suite, config.schedule(seed),
                                            seed, f"aTLAS {bank_name}", config.progress)
    return {"bank": bank_name, "k": k, "seed": seed, "test_acc": ctx.test_scores(merged)["acc"],
            "selection_acc": selection, "bank_bytes": sum(vector_nbytes(v) for v in bank),
            "blocks": len(bank[0].names), "learned": detail["learned"], "seconds": time.perf_counter() - tic}


def run_lora(config: LoraConfig | None = None, *, suite=None) -> dict:
    """Few-shot aTLAS over LoRA banks vs the dense bank; writes ``<out>/lora.{json,md,png}``."""
    config = config or LoraConfig()
    suite = suite or make_suite("vision", progress=config.progress)
    started = time.perf_counter()
    ctx = HeldOutTarget(suite, config.target)
    config = replace(config, modules=tuple(dict.fromkeys(resolve_targets(ctx.base, t) for t in config.modules)))
    banks = (["dense", *(f"dense-{t}" for t in config.modules)] if config.dense else []) + list(config.specs())
    settings = {**config.numbers(), "lora": config.training(), "held_out": ctx.identity()}
    store = RecordStore(config.out / "lora_records.jsonl", fingerprint(settings), config.resume)
    records = run_grid(grid(bank=banks, k=config.shots, seed=config.seeds),
                       lambda job: _job(ctx, config, dict(job)), store)

    rows = []
    for bank in banks:
        row = {"bank": bank, "MiB": f"{next(r for r in records if r['bank'] == bank)['bank_bytes'] / 2**20:.2f}"}
        for k in config.shots:
            mean, se = mean_se([r["test_acc"] for r in records if r["bank"] == bank and r["k"] == k])
            row[f"k={k}"] = f"{100 * mean:.1f}" + ("" if se != se else f" ± {100 * se:.1f}")
        rows.append(row)
    header = (f"Few-shot aTLAS on **{ctx.target}** ({suite.name} suite) over LoRA banks vs the dense bank "
              f"({len(ctx.sources)} sources: {', '.join(ctx.sources)}); LoRA {config.lora_epochs} epoch(s) x "
              f">= {config.lora_steps} steps at lr {config.lora_lr:g} per source; test accuracy %, mean ± s.e. "
              f"over seeds {list(config.seeds)}; MiB = bank in storage form.")
    table = header + "\n\n" + markdown_table(rows)
    k = config.shots[-1]
    plot = plot_bars({b: mean_se([r["test_acc"] for r in records if r["bank"] == b and r["k"] == k])[0]
                      for b in banks}, config.out / "lora.png", ylabel="test accuracy", title=f"{ctx.target}, k={k}")
    payload = {"config": {**asdict(config), "out": str(config.out)}, "held_out": ctx.identity(), "records": records,
               "rows": rows, "plot": str(plot), "seconds": time.perf_counter() - started}
    return publish(config.out, "lora", payload, table)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """``taskvec run lora``."""
    recipe_command(subparsers, "lora", LoraConfig, run_lora,
                   help="few-shot aTLAS over LoRA adapter banks vs the dense bank",
                   description=__doc__.split("\n\n")[0])
