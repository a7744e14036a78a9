"""Speed of sample-specific composition on CPU: vmap over functional_call vs the linearity hooks.

Why: the variational composer runs every training and test batch with per-sample coefficients, so its
per-sample executor sets the cost of the whole method. This prints, per model / batch / bank size, the
milliseconds per batch of

* ``merged``   -- a plain network with one composition baked in (the floor: what aTLAS costs at test time),
* ``features`` -- the pre-trained network, which a variational prediction also runs for its features,
* ``shared``   -- ``Composer.forward`` with one coefficient matrix for the whole batch,
* ``vmap/cK``  -- :class:`~taskvec.variational.persample.VmapRunner`, K samples per vmap chunk,
* ``linear``   -- :class:`~taskvec.variational.persample.LinearRunner`, dense hooks (every product),
* ``linear/sp`` -- the same with sparse hooks (only the (sample, component) pairs with c != 0),
* ``auto``     -- :class:`~taskvec.variational.persample.AutoRunner`: vmap with grad, sparse hooks without,

in inference (``infer``: no grad) and training (``train``: forward + backward to the coefficients), with
the ratio of CPU time to ``merged`` inference (CPU time, since wall time also counts waiting for cores
other jobs hold; ``ratio`` compares fastest rounds, ``paired`` is the median over rounds of the same-round
ratio), the matmul/conv GFLOP of one forward call, and the weight-sized memory the
method holds (vmap: one composed copy per sample of a chunk; linear: the basis, about one more bank).
ViT banks leave out ``cls_token`` / ``pos_embed`` so that both runners compose the same blocks (the
linearity runner refuses parameters used outside a Linear/Conv/Norm module).

Timing on a shared CPU: the cases of one configuration run round-robin (at least ``--rounds`` rounds,
more until ``--seconds`` pass) and each reports its fastest round (wall ms) and that round's process
CPU ms, so a burst of outside load hits every case alike and rarely all rounds. When other jobs share
the cores, use ``--threads 1``: with more intra-op threads than free cores every parallel op waits at the
OpenMP barrier for a descheduled thread (a 1 ms network then takes ~240 ms, whatever the method).

    python benchmarks/variational_speed.py [--models tiny_cnn vit_small mobilenet_v2] [--batches 8 32]
        [--vectors 2 8] [--chunks 8 32] [--threads 1] [--seconds 8] [--kept 0.11]

With ``--kept 0.11`` the per-sample coefficients look like the gate's output at test time; a whole
variational prediction also runs the backbone once for the features, i.e. adds 1.0 to the ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from taskvec.compose import Composer
from taskvec.variational.persample import AutoRunner, LinearRunner, VmapRunner
from taskvec.vectors import TaskVector

MODEL_KWARGS: dict[str, dict] = {"tiny_cnn": {"width": 32}}
RESOLUTION = {"tiny_cnn": 32, "vit_small": 32, "tiny_vit": 16, "mobilenet_v2": 64}
HEADER = (
    f"{'method':<9} {'mode':<5} {'model':<12} {'batch':>5} {'n':>3} {'ms/batch':>10} {'cpu ms':>9} {'ratio':>7} "
    f"{'paired':>7} {'GFLOP':>7} {'weights MB':>10}"
)


def build(name: str) -> nn.Module:
    """A registered backbone with random init, in eval mode."""
    from taskvec.models import build_backbone

    model, _spec = build_backbone(name, pretrained=False, seed=0, **MODEL_KWARGS.get(name, {}))
    return model.eval()


def make_bank(model: nn.Module, n: int, blocks: list[str]) -> list[TaskVector]:
    """``n`` stand-in task vectors: seeded noise on the composed blocks."""
    bank = []
    for i in range(n):
        tuned = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in tuned.named_parameters():
                if name in blocks:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.01)
        bank.append(TaskVector.from_state_dicts(model.state_dict(), tuned.state_dict(), names=blocks, name=f"t{i}"))
    return bank


def _infer(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def go() -> None:
        with torch.no_grad():
            fn()

    return go


def _train(fn: Callable[[torch.Tensor], torch.Tensor], coefficients: torch.Tensor) -> Callable[[], None]:
    def go() -> None:
        leaf = coefficients.clone().requires_grad_(True)
        fn(leaf).square().mean().backward()

    return go


def cases_for(
    composer: Composer, x: torch.Tensor, chunks: list[int], kept: float = 1.0
) -> list[tuple[str, str, Callable[[], None]]]:
    """Every (method, mode, callable) measured for one composer and batch.

    ``kept`` < 1 zeroes each per-sample coefficient with probability 1 - kept, as the variational
    gate does at test time (it keeps ~11% on the task-addition benchmark).
    """
    n, columns = composer.num_vectors, composer.layout.num_columns
    merged = composer.merge()
    shared = composer.coefficients.detach().clone()
    generator = torch.Generator().manual_seed(1)
    per_sample = 0.3 + 0.1 * torch.randn(x.shape[0], n, columns, generator=generator)
    if kept < 1.0:
        per_sample = torch.where(torch.rand(per_sample.shape, generator=generator) < kept, per_sample, 0.0)
    cases: list[tuple[str, str, Callable[[], None]]] = [
        ("merged", "infer", _infer(lambda: merged(x))),
        ("features", "infer", _infer(lambda: composer.base(x))),  # the pre-trained pass a prediction also runs
        ("shared", "infer", _infer(lambda: composer(x, coefficients=shared))),
        ("shared", "train", _train(lambda c: composer(x, coefficients=c), shared)),
    ]
    runners: dict[str, Callable] = {f"vmap/c{c}": VmapRunner(composer, c) for c in chunks}
    runners["linear"] = LinearRunner(composer, sparse=False)
    runners["linear/sp"] = LinearRunner(composer, sparse=True)  # sparse hooks when >= 50% zeros
    runners["auto"] = AutoRunner(composer, 8)
    for label, runner in runners.items():
        cases.append((label, "infer", _infer(lambda r=runner: r(x, per_sample))))
        cases.append((label, "train", _train(lambda c, r=runner: r(x, c), per_sample)))
    return cases


def extra_weights_mb(label: str, composer: Composer, batch: int) -> float:
    """Weight-sized memory a method holds beyond base + bank (fp32, analytic): composed copies or basis.

    vmap materialises one composed copy of the blocks per sample of a chunk; the linearity runner keeps a
    basis (one tensor per vector and column, i.e. about one more bank) and no per-sample weights.
    """
    numel = sum(shape.numel() for shape in composer.layout.shapes.values())
    if label.startswith("vmap/c"):
        return min(batch, int(label[6:])) * numel * 4 / 1e6
    if label.startswith("linear") or label == "auto":
        return composer.num_vectors * numel * 4 / 1e6
    return numel * 4 / 1e6  # merged / shared: one composed copy


def gflops(fn: Callable[[], None]) -> float:
    """Matmul/conv GFLOP of one call (torch's FlopCounterMode; elementwise work is not counted).

    Why: a count that no other load on the machine can disturb, to read next to the timings.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def measure(cases: list[tuple[str, str, Callable[[], None]]], rounds: int, seconds: float
            ) -> list[list[tuple[float, float]]]:
    """(wall ms, CPU ms) of every round per case, round-robin after one warm-up round.

    At least ``rounds`` rounds, more until ``seconds`` have passed: on a shared CPU the minimum of many
    interleaved rounds is the closest thing to an unloaded measurement, and the median of same-round
    ratios is the steadiest comparison when the machine's speed drifts between rounds.
    """
    for _label, _mode, fn in cases:
        fn()
    runs: list[list[tuple[float, float]]] = [[] for _ in cases]
    started = time.perf_counter()
    done = 0
    while done < rounds or time.perf_counter() - started < seconds:
        done += 1
        for k, (_label, _mode, fn) in enumerate(cases):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            runs[k].append((1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)))
    return runs


def run(
    models: list[str], batches: list[int], vectors: list[int], chunks: list[int], rounds: int, seconds: float,
    kept: float = 1.0,
) -> list[dict]:
    rows: list[dict] = []
    for name in models:
        model = build(name)
        blocks = [k for k, _ in model.named_parameters() if k not in ("cls_token", "pos_embed")]
        size = RESOLUTION.get(name, 32)
        for n in vectors:
            composer = Composer(model, make_bank(model, n, blocks), "block", init=0.3, blocks=blocks)
            composer.coefficients.requires_grad_(False)
            for batch in batches:
                x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
                cases = cases_for(composer, x, chunks, kept)
                runs = measure(cases, rounds, seconds)
                timings = [min(case_runs) for case_runs in runs]  # the fastest round (wall) and its CPU time
                floor = timings[0][1]
                merged_cpu = [cpu for _wall, cpu in runs[0]]
                for (label, mode, fn), (ms, cpu), case_runs in zip(cases, timings, runs, strict=True):
                    # FlopCounterMode miscounts the backward of vmap's batched (grouped) convolutions,
                    # so only forward passes get a count.
                    flop = gflops(fn) if mode == "infer" else float("nan")
                    row = {
                        "method": label,
                        "mode": mode,
                        "model": name,
                        "batch": batch,
                        "n": n,
                        "ms": ms,
                        "cpu_ms": cpu,
                        "ratio": cpu / floor,
                        "paired": statistics.median(c / m for (_w, c), m in zip(case_runs, merged_cpu, strict=True)),
                        "gflop": flop,
                        "mb": extra_weights_mb(label, composer, batch),
                    }
                    rows.append(row)
                    shown = f"{flop:>7.2f}" if mode == "infer" else f"{'-':>7}"
                    print(
                        f"{label:<9} {mode:<5} {name:<12} {batch:>5} {n:>3} {ms:>10.1f} {cpu:>9.1f} "
                        f"{row['ratio']:>7.2f} {row['paired']:>7.2f} {shown} {row['mb']:>10.1f}",
                        flush=True,
                    )
                whole = _whole_prediction(cases, runs)
                if whole is not None:
                    print(f"whole gated prediction (auto infer + features) / merged, median of {len(merged_cpu)} "
                          f"same-round ratios: {whole:.2f}", flush=True)
    return rows


def _whole_prediction(cases: list[tuple[str, str, Callable[[], None]]], runs: list[list[tuple[float, float]]]
                      ) -> float | None:
    """What a variational prediction costs: the gated pass plus the pre-trained pass for the features."""
    index = {(label, mode): k for k, (label, mode, _fn) in enumerate(cases)}
    if ("auto", "infer") not in index or ("features", "infer") not in index:
        return None
    auto, features, merged = runs[index["auto", "infer"]], runs[index["features", "infer"]], runs[0]
    return statistics.median((a[1] + f[1]) / m[1] for a, f, m in zip(auto, features, merged, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny_cnn", "vit_small", "mobilenet_v2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--vectors", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--chunks", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3, help="at least this many rounds per configuration")
    parser.add_argument("--seconds", type=float, default=20.0, help="keep adding rounds for this long")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kept", type=float, default=1.0,
                        help="fraction of per-sample coefficients left non-zero (gated inference: ~0.11)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(HEADER)
    run(args.models, args.batches, args.vectors, args.chunks, args.rounds, args.seconds, args.kept)


if __name__ == "__main__":
    main()
