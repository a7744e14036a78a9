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
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# CLIP ViT-B/32's image tower: 224 px, patch 32, width 768, 12 blocks of 12 heads (~88M parameters).
VIT_B32 = {"img_size": 224, "patch_size": 32, "dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0}
DEFAULT_RESOLUTION = {"vit-b32": 224}
BENCH_ONLY_MODELS = ("vit-b32",)  # shapes the benchmark builds itself, beside the registered backbones


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
    device: str = "cpu"
    autocast: bool = False  # bf16 autocast of the network (CUDA runs)
    recompute: bool = False  # Composer(recompute=True): module-by-module composition, no whole composed copy
    cuda_graphs: bool = False  # Composer(cuda_graphs=True): the composition replayed as CUDA graphs
    bank_dir: str = ""  # where prepare_bank wrote the vectors; compose cases load them from there


def _rss_mib() -> float:
    """Peak resident memory of this process (VmHWM where /proc exists: ru_maxrss survives exec, so a
    case started from a large parent would report the parent's size)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def build_model(name: str) -> tuple[nn.Module, int]:
    """A random-init backbone in eval mode and its feature width; ``vit-b32`` is CLIP ViT-B/32-shaped."""
    if name == "vit-b32":
        from taskvec.models.vit import VisionTransformer

        model = VisionTransformer(**VIT_B32, seed=0)  # type: ignore[arg-type]
        return model.eval(), VIT_B32["dim"]  # type: ignore[return-value]
    from taskvec.models import build_backbone

    backbone, spec = build_backbone(name, pretrained=False)
    return backbone.eval(), spec.feature_dim


def bank_paths(case: StepCase) -> list[Path]:
    return [Path(case.bank_dir) / f"{case.model}-{case.storage}-{i}.safetensors" for i in range(case.vectors)]


def prepare_bank(case: StepCase) -> None:
    """Write the case's stand-in vectors (seeded noise, storage dtype) once, one vector in memory at a time."""
    from taskvec.vectors import TaskVector, parameter_blocks

    torch.set_num_threads(case.threads)
    backbone, _ = build_model(case.model)
    blocks = parameter_blocks(backbone)
    dtype = STORAGE[case.storage]
    for i, path in enumerate(bank_paths(case)):
        if path.is_file():
            continue
        generator = torch.Generator().manual_seed(1000 + i)
        tensors = {k: (torch.randn(v.shape, generator=generator) * 1e-3).to(dtype) for k, v in blocks.items()}
        TaskVector(tensors, metadata={"name": f"t{i}"}).save(path)


def memory_bandwidth(device: str = "cpu", mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large copy (read + write counted), best of ``repeats``.

    Why a copy: the composition's floor is streaming the bank from memory, and a copy far larger than
    the caches is the simplest stream this process can time with the same threads.
    """
    count = mib * 2**20 // 4
    src = torch.ones(count, device=device)
    dst = torch.zeros(count, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        tic = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * count * 4 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(case: StepCase) -> dict[str, float | str | int]:
    """Build, warm up and time one configuration in this process."""
    from taskvec.compose import Composer
    from taskvec.vectors import parameter_blocks

    torch.set_num_threads(case.threads)
    torch.manual_seed(0)
    rss_start = _rss_mib()
    backbone, feature_dim = build_model(case.model)
    head = nn.Linear(feature_dim, 10).requires_grad_(False)
    x = torch.randn(case.batch, 3, case.resolution, case.resolution)
    y = torch.randint(0, 10, (case.batch,))
    blocks = parameter_blocks(backbone)
    base_mib = _mib(blocks.values())
    vectors_mib = 0.0
    bandwidth = float("nan")
    if case.mode == "finetune":
        model: nn.Module = backbone.to(case.device)
        model.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        dtype = STORAGE[case.storage]
        vectors_mib = case.vectors * _mib([torch.empty(v.shape, dtype=dtype) for v in blocks.values()])
        # The memory path users get: memory-mapped files, the bank held once, the base adopted.
        if not case.bank_dir:  # called directly (tests): write the bank here, memory figures then include it
            case = replace(case, bank_dir=tempfile.mkdtemp(prefix="taskvec-bench-"))
            prepare_bank(case)
        model = Composer.from_files(backbone, bank_paths(case), case.granularity, init=0.3, check_base=False,
                                    recompute=case.recompute, cuda_graphs=case.cuda_graphs)
        model = model.to(case.device)
        optimizer = torch.optim.AdamW([model.coefficients], lr=1e-2)
    head, x, y = head.to(case.device), x.to(case.device), y.to(case.device)
    model.train()
    if case.mode == "finetune":
        model.eval()  # BatchNorm statistics frozen, as in the bank builder

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(case.device.split(":")[0], dtype=torch.bfloat16, enabled=case.autocast):
            loss = F.cross_entropy(head(model(x)), y)
        loss.backward()
        optimizer.step()

    rss_built = _rss_mib()
    for _ in range(case.warmup):
        step()
    if case.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(case.steps):
        _sync(case.device)
        tic = time.perf_counter()
        step()
        _sync(case.device)
        times.append(time.perf_counter() - tic)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if case.device.startswith("cuda") else float("nan")
    rss_peak = _rss_mib()
    if case.mode == "finetune":  # after the peak is read: the copy's buffers are not the step's memory
        del optimizer, model
        bandwidth = memory_bandwidth(case.device)
    return {
        "model": case.model,
        "mode": case.mode,
        "vectors": case.vectors,
        "storage": case.storage,
        "recompute": case.recompute,
        "cuda_graphs": case.cuda_graphs,
        "device": case.device,
        "step_ms": 1000 * statistics.median(times),
        "base_mib": base_mib,
        "vectors_mib": vectors_mib,
        "bandwidth_gbs": bandwidth / 1e9,
        "rss_start_mib": rss_start,
        "rss_built_mib": rss_built,
        "rss_peak_mib": rss_peak,
        "gpu_peak_mib": gpu_peak,
    }


def _subprocess(function: str, case: StepCase) -> str:
    payload = json.dumps(case.__dict__)
    code = (
        f"import json, sys; from taskvec.bench import StepCase, {function}; "
        f"print(json.dumps({function}(StepCase(**json.loads({payload!r})))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark {function} for {case} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def run_isolated(case: StepCase) -> dict[str, float | str | int]:
    """Run one case in a fresh interpreter so its peak memory is measured alone."""
    return json.loads(_subprocess("run_case", case).strip().splitlines()[-1])


def step_table(
    models: list[str],
    vector_counts: list[int],
    *,
    batch: int = 64,
    resolution: int | None = None,
    storage: str | list[str] = "fp32",
    steps: int = 8,
    rounds: int = 3,
    warmup: int = 3,
    threads: int = 2,
    device: str = "cpu",
    autocast: bool = False,
    recompute: bool = False,
    cuda_graphs: Sequence[bool] = (False,),
    bank_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, float | str | int]]:
    """Rows of the step benchmark: one fine-tuning reference and one row per bank size and storage.

    Every case runs once per round, rounds interleaved (so slow spells of the machine hit all cases
    alike); a case's time is its fastest round's median and its memory its largest peak. Banks are
    written once (to ``bank_dir``, a temporary folder by default) before any timing. ``paired_ratio``
    is the median over rounds of (this case / the fine-tuning case of the same round), with its range:
    on a machine whose speed drifts between rounds this is steadier than the ratio of two fastest rounds.
    Each compose row carries the memory-traffic floor: the fine-tuning step plus reading the bank
    twice (compose forward, contract backward) at the bandwidth of a large copy, 2 n P bytes."""
    from tqdm.auto import tqdm

    storages = [storage] if isinstance(storage, str) else list(storage)
    unknown = [s for s in storages if s not in STORAGE]
    if unknown:
        raise ValueError(f"storage {unknown} is not one of {sorted(STORAGE)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    with tempfile.TemporaryDirectory(prefix="taskvec-bench-") as tmp:
        folder = str(bank_dir or tmp)
        Path(folder).mkdir(parents=True, exist_ok=True)
        cases = []
        for model in models:
            size = resolution or DEFAULT_RESOLUTION.get(model, 32)
            common = {"batch": batch, "resolution": size, "steps": steps, "warmup": warmup, "threads": threads,
                      "device": device, "autocast": autocast, "bank_dir": folder}
            composing = {**common, "recompute": recompute}
            cases.append(StepCase(model, "finetune", **common))  # type: ignore[arg-type]
            cases += [StepCase(model, "compose", n, storage=s, cuda_graphs=g, **composing)  # type: ignore[arg-type]
                      for s in storages for n in vector_counts for g in cuda_graphs]
        for model in models:
            for s in storages:
                largest = max(vector_counts)
                prepare = next(c for c in cases if c.model == model and c.storage == s and c.vectors == largest)
                _subprocess("prepare_bank", prepare)
        runs: list[list[dict]] = [[] for _ in cases]
        with tqdm(total=rounds * len(cases), desc="bench step", disable=not progress) as bar:
            for _ in range(rounds):
                for i, case in enumerate(cases):
                    runs[i].append(run_isolated(case))
                    bar.update()
    rows = []
    reference: dict[str, dict] = {}
    reference_runs: dict[str, list[dict]] = {}
    for case, case_runs in zip(cases, runs, strict=True):
        row = dict(min(case_runs, key=lambda r: r["step_ms"]))
        row["rss_peak_mib"] = max(r["rss_peak_mib"] for r in case_runs)
        row["rss_start_mib"] = min(r["rss_start_mib"] for r in case_runs)
        row["bandwidth_gbs"] = max(r.get("bandwidth_gbs", float("nan")) for r in case_runs)
        row["rounds"] = len(case_runs)
        if case.mode == "finetune":
            reference[case.model] = row
            reference_runs[case.model] = case_runs
        ref = reference[case.model]
        row["ratio"] = row["step_ms"] / ref["step_ms"]
        paired = [run["step_ms"] / same["step_ms"] for run, same in zip(case_runs, reference_runs[case.model],
                                                                          strict=True)]
        row["paired_ratio"] = statistics.median(paired)
        row["paired_min"], row["paired_max"] = min(paired), max(paired)
        traffic_ms = 1000 * 2 * row["vectors_mib"] * 2**20 / (ref["bandwidth_gbs"] * 1e9)
        row["floor_ms"] = ref["step_ms"] + traffic_ms
        row["floor_ratio"] = row["floor_ms"] / ref["step_ms"]
        row["vs_floor"] = row["step_ms"] / row["floor_ms"]
        row["bandwidth_gbs"] = ref["bandwidth_gbs"]
        # What the issue allows: the base and the bank in storage dtype, plus 15%.
        row["budget_mib"] = (row["base_mib"] + row["vectors_mib"]) * 1.15 if case.mode == "compose" else float("nan")
        row["peak_above_start_mib"] = row["rss_peak_mib"] - row["rss_start_mib"]
        rows.append(row)
    return rows


def format_step_table(rows: list[dict]) -> str:
    """Markdown: time ratio next to the traffic floor, and peak memory next to the budget."""
    nan = float("nan")
    gpu = any(str(r.get("device", "cpu")).startswith("cuda") for r in rows)
    header = (
        "| model | mode | n | storage | step ms | ratio vs fine-tune | paired ratio (range) | floor ratio "
        "| step / floor | params MiB | vectors MiB | (base+bank)x1.15 MiB | peak RSS above start MiB |"
        + (" GPU peak MiB |" if gpu else "")
    )
    lines = [header, "|" + "---|" * (14 if gpu else 13)]
    for r in rows:
        compose = r["mode"] == "compose"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['vectors'] or ''} "
            f"| {_storage_label(r) if compose else ''} "
            f"| {r['step_ms']:.1f} | {r['ratio']:.3f} | {_paired(r)} "
            f"| {r.get('floor_ratio', nan):.3f} | {r.get('vs_floor', nan):.3f} "
            f"| {r['base_mib']:.1f} | {r['vectors_mib']:.1f} | {r['budget_mib']:.1f} "
            f"| {r['peak_above_start_mib']:.1f} |"
            .replace("| nan |", "|  |")
            + (f" {r.get('gpu_peak_mib', nan):.0f} |" if gpu else "")
        )
    bandwidth = next((r.get("bandwidth_gbs", nan) for r in rows if r["mode"] == "finetune"), nan)
    lines.append("")
    lines.append(
        f"Floor = fine-tuning step + 2 x bank bytes / {bandwidth:.1f} GB/s (large-copy bandwidth, read + write, "
        "measured in the fine-tuning case's process). Paired ratio = median over rounds of the case's step / the "
        "fine-tuning step of the same round (min-max in brackets)."
    )
    return "\n".join(lines)


def _storage_label(row: dict) -> str:
    return row["storage"] + "".join(f", {flag.replace('_', ' ')}" for flag in ("recompute", "cuda_graphs")
                                    if row.get(flag))


def _paired(row: dict) -> str:
    if "paired_ratio" not in row or row["mode"] != "compose":
        return ""
    return f"{row['paired_ratio']:.3f} ({row['paired_min']:.2f}-{row['paired_max']:.2f})"
