"""Speed and memory of one coefficient-training step against one plain fine-tuning step.

Each configuration runs in a fresh subprocess, so its peak resident memory is its own. Time is the
median over timed steps after warm-up, on the same batch and the same frozen head in both cases. On a
shared CPU one process can run 10% slower than the next for no reason of its own, so the whole set of
cases is repeated for several interleaved rounds and each case keeps its best round.
The fine-tuning step is what the bank builder does (AdamW on every parameter, normalisation
statistics frozen); the coefficient step is what aTLAS does (AdamW on the coefficients only).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepCase:
    model: str
    mode: str  # "finetune" or "compose"
    vectors: int = 0
    batch: int = 64
    resolution: int = 32
    storage: str = "fp32"
    granularity: str = "block"
    steps: int = 8
    warmup: int = 3
    threads: int = 2


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def run_case(case: StepCase) -> dict[str, float | str | int]:
    """Build, warm up and time one configuration in this process."""
    from taskvec.compose import Composer
    from taskvec.models import build_backbone
    from taskvec.vectors import TaskVector, parameter_blocks

    torch.set_num_threads(case.threads)
    torch.manual_seed(0)
    rss_start = _rss_mib()
    backbone, spec = build_backbone(case.model, pretrained=False)
    backbone.eval()
    head = nn.Linear(spec.feature_dim, 10).requires_grad_(False)
    x = torch.randn(case.batch, 3, case.resolution, case.resolution)
    y = torch.randint(0, 10, (case.batch,))
    blocks = parameter_blocks(backbone)
    base_mib = _mib(blocks.values())
    vectors_mib = 0.0
    if case.mode == "finetune":
        model: nn.Module = backbone
        model.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        generator = torch.Generator().manual_seed(1)
        dtype = STORAGE[case.storage]
        bank = [
            TaskVector(
                {k: (torch.randn(v.shape, generator=generator) * 1e-3).to(dtype) for k, v in blocks.items()},
                metadata={"name": f"t{i}"},
            )
            for i in range(case.vectors)
        ]
        vectors_mib = case.vectors * _mib([torch.empty(v.shape, dtype=dtype) for v in blocks.values()])
        model = Composer(backbone, bank, case.granularity, init=0.3, check_base=False)
        del bank  # the composer holds the stacked bank; the list would be a second copy
        optimizer = torch.optim.AdamW([model.coefficients], lr=1e-2)
    model.train()
    if case.mode == "finetune":
        model.eval()  # BatchNorm statistics frozen, as in the bank builder

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(model(x)), y)
        loss.backward()
        optimizer.step()

    rss_built = _rss_mib()
    for _ in range(case.warmup):
        step()
    times = []
    for _ in range(case.steps):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    return {
        "model": case.model,
        "mode": case.mode,
        "vectors": case.vectors,
        "storage": case.storage,
        "step_ms": 1000 * statistics.median(times),
        "base_mib": base_mib,
        "vectors_mib": vectors_mib,
        "rss_start_mib": rss_start,
        "rss_built_mib": rss_built,
        "rss_peak_mib": _rss_mib(),
    }


def run_isolated(case: StepCase) -> dict[str, float | str | int]:
    """Run one case in a fresh interpreter so its peak memory is measured alone."""
    payload = json.dumps(case.__dict__)
    code = (
        "import json, sys; from taskvec.bench import StepCase, run_case; "
        f"print(json.dumps(run_case(StepCase(**json.loads({payload!r})))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_table(
    models: list[str],
    vector_counts: list[int],
    *,
    batch: int = 64,
    resolution: int = 32,
    storage: str = "fp32",
    steps: int = 8,
    rounds: int = 3,
    progress: bool = True,
) -> list[dict[str, float | str | int]]:
    """Rows of the step benchmark: one fine-tuning reference and one row per bank size per model.

    Every case runs once per round, rounds interleaved (so slow spells of the machine hit all cases
    alike); a case's time is its fastest round's median and its memory its largest peak."""
    from tqdm.auto import tqdm

    cases = []
    for model in models:
        cases.append(StepCase(model, "finetune", batch=batch, resolution=resolution, steps=steps))
        cases += [
            StepCase(model, "compose", n, batch=batch, resolution=resolution, storage=storage, steps=steps)
            for n in vector_counts
        ]
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    runs: list[list[dict]] = [[] for _ in cases]
    with tqdm(total=rounds * len(cases), desc="bench step", disable=not progress) as bar:
        for _ in range(rounds):
            for i, case in enumerate(cases):
                runs[i].append(run_isolated(case))
                bar.update()
    rows = []
    reference: dict[str, dict] = {}
    for case, case_runs in zip(cases, runs, strict=True):
        row = dict(min(case_runs, key=lambda r: r["step_ms"]))
        row["rss_peak_mib"] = max(r["rss_peak_mib"] for r in case_runs)
        row["rss_start_mib"] = min(r["rss_start_mib"] for r in case_runs)
        row["rounds"] = len(case_runs)
        if case.mode == "finetune":
            reference[case.model] = row
        ref = reference[case.model]
        row["ratio"] = row["step_ms"] / ref["step_ms"]
        # What DESIGN.md allows: the base, the vectors in storage dtype, one composed copy.
        row["budget_mib"] = row["base_mib"] * 2 + row["vectors_mib"] if case.mode == "compose" else float("nan")
        row["peak_above_start_mib"] = row["rss_peak_mib"] - row["rss_start_mib"]
        rows.append(row)
    return rows


def format_step_table(rows: list[dict]) -> str:
    header = (
        "| model | mode | n | storage | step ms | ratio vs fine-tune | params MiB | vectors MiB | "
        "base+vectors+copy MiB | peak RSS above start MiB |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        budget = "" if r["mode"] == "finetune" else f"{r['budget_mib']:.1f}"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['vectors'] or ''} | {r['storage'] if r['mode'] == 'compose' else ''} "
            f"| {r['step_ms']:.1f} | {r['ratio']:.2f} | {r['base_mib']:.1f} | {r['vectors_mib']:.1f} | {budget} "
            f"| {r['peak_above_start_mib']:.1f} |"
        )
    return "\n".join(lines)
