"""Which product reads a task-vector stack fastest on a GPU (issue 13): forward weighted sum and backward
contraction over every block of the CLIP ViT-B/32-shaped encoder, n vectors, fp32 and bf16 storage.

    PYTHONPATH=src python benchmarks/gpu_kernels.py --vectors 21

Each variant computes base + w @ stack (forward) and stack @ g (backward) for all blocks; times are CUDA-event
medians. The floor is reading the bank twice at the bandwidth of a large device copy. Every variant is
checked against an fp64 reference first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from taskvec.bench import VIT_B32
from taskvec.models.vit import VisionTransformer


def _split(values, dtype):
    high = values.to(dtype)
    return torch.stack([high, (values - high.float()).to(dtype)])


def fwd_current(w, s, b):
    if s.dtype == w.dtype:
        return torch.addmm(b[None], w[None], s)[0]
    return b + torch.mm(_split(w, s.dtype), s, out_dtype=torch.float32).sum(0)


def bwd_current(s, g):
    if s.dtype == g.dtype:
        return s @ g
    return torch.mm(s, _split(g, s.dtype).t(), out_dtype=torch.float32).sum(1)


def fwd_addmv(w, s, b):
    return torch.addmv(b, s.t(), w) if s.dtype == w.dtype else b + torch.mv(s.t().float(), w)


def bwd_mv(s, g):
    return torch.mv(s, g) if s.dtype == g.dtype else torch.mv(s.float(), g)


def fwd_cast(w, s, b):
    return torch.addmm(b[None], w[None], s.float())[0]


def bwd_cast(s, g):
    return s.float() @ g


def fwd_elementwise(w, s, b):
    return b + (w[:, None] * s.float()).sum(0)


def bwd_elementwise(s, g):
    return (s.float() * g[None]).sum(1)


DEVICE = "cuda"


def _elapsed_ms(fn) -> float:
    """Milliseconds of ``fn`` by CUDA events (host clock on CPU, for checking the script anywhere)."""
    if DEVICE != "cuda":
        tic = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - tic)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def bandwidth(elements: int = 1 << 28) -> float:
    src = torch.randn(elements, device=DEVICE)
    dst = torch.empty_like(src)
    times = [_elapsed_ms(lambda: dst.copy_(src)) / 1000 for _ in range(10)]
    return 2 * src.numel() * 4 / min(times)


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    return statistics.median(_elapsed_ms(fn) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, nargs="+", default=[8, 21])
    parser.add_argument("--compile", action="store_true", help="also try torch.compile of the elementwise pair")
    parser.add_argument("--device", default="cuda", help="cpu only checks the script")
    parser.add_argument("--blocks", type=int, default=None, help="first N blocks only (quick checks)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    shapes = [p.shape for p in VisionTransformer(**VIT_B32, seed=0).parameters()][: args.blocks]  # type: ignore[arg-type]
    bw = bandwidth(1 << 28 if DEVICE == "cuda" else 1 << 24)
    variants = {"current": (fwd_current, bwd_current), "mv": (fwd_addmv, bwd_mv), "cast": (fwd_cast, bwd_cast),
                "elementwise": (fwd_elementwise, bwd_elementwise)}
    if args.compile:
        variants["compiled"] = (torch.compile(fwd_elementwise, dynamic=True),
                                torch.compile(bwd_elementwise, dynamic=True))
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"{where}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"{len(shapes)} blocks, {sum(s.numel() for s in shapes) / 1e6:.1f}M parameters")
    print("| n | storage | variant | forward ms | backward ms | total ms | floor ms | total / floor | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.vectors:
        for dtype in (torch.float32, torch.bfloat16):
            for row in _rows(n, dtype, shapes, variants, bw):
                print(row, flush=True)
            torch.cuda.empty_cache()


def _rows(n, dtype, shapes, variants, bw):
    """One table row per variant for n stacked vectors in ``dtype``."""
    torch.manual_seed(0)
    stacks = [(torch.randn(n, s.numel(), device=DEVICE) * 1e-3).to(dtype) for s in shapes]
    bases = [torch.randn(s.numel(), device=DEVICE) for s in shapes]
    grads = [torch.randn(s.numel(), device=DEVICE) for s in shapes]
    w = torch.randn(n, device=DEVICE)
    floor = 1000 * 2 * sum(s.numel() * s.element_size() for s in stacks) / bw
    triples = list(zip(stacks, bases, grads, strict=True))
    for name, (fwd, bwd) in variants.items():
        try:
            err = 0.0
            for s, b, g in triples:
                ref_f = b.double() + w.double() @ s.double()
                ref_b = s.double() @ g.double()
                err = max(err, ((fwd(w, s, b).double() - ref_f).norm() / ref_f.norm()).item(),
                          ((bwd(s, g).double() - ref_b).norm() / ref_b.norm()).item())
            tf = time_ms(lambda fwd=fwd: [fwd(w, s, b) for s, b, _ in triples])
            tb = time_ms(lambda bwd=bwd: [bwd(s, g) for s, _, g in triples])
        except Exception as error:  # a variant that cannot run here is reported, not fatal
            yield f"| {n} | {str(dtype)[6:]} | {name} | failed: {type(error).__name__}: {str(error)[:80]} |||||||"
            continue
        yield (f"| {n} | {str(dtype)[6:]} | {name} | {tf:.2f} | {tb:.2f} | {tf + tb:.2f} | {floor:.2f} "
               f"| {(tf + tb) / floor:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
