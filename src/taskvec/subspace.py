"""Bases for the intrinsic-dimension experiment: task vectors against norm-matched random directions.

The aTLAS paper (Figure 2) learns a few coefficients in the span of d task vectors and finds that it
recovers much more of full fine-tuning than the same number of coefficients in a random subspace.
The comparison is only fair when the random bases have the same scale, block by block, as the task
vectors: otherwise a coefficient moves a block by a different amount. :func:`random_bases` makes such
bases (isotropic Gaussian directions, rescaled per block, seeded); :func:`project` measures how much
of a vector lies in a span (e.g. how much of a fine-tuned update the bank explains).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taskvec.vectors import AnyTaskVector, TaskVector


def block_norms(vector: AnyTaskVector) -> dict[str, float]:
    """L2 norm of each block of a vector (float64 accumulation)."""
    return {name: float(vector.dense_block(name, torch.float64).norm()) for name in vector.names}


def random_bases(
    templates: Sequence[AnyTaskVector], *, count: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[TaskVector]:
    """``count`` random directions whose block norms copy the templates' (basis k copies template k mod n).

    Each block is a standard Gaussian draw rescaled to the template block's norm (a zero block stays
    zero). Basis k draws from its own generator, seeded by ``(seed, k)``, so a basis does not change
    when ``count`` grows. Template metadata (base fingerprint) is carried over: a random basis lives on
    the same blocks of the same base.
    """
    if not templates:
        raise ValueError("random_bases needs at least one template task vector")
    count = len(templates) if count is None else count
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    bases = []
    for k in range(count):
        template = templates[k % len(templates)]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
        blocks: dict[str, Tensor] = {}
        for name, norm in block_norms(template).items():
            draw = torch.randn(template.shapes[name], generator=generator, dtype=torch.float64)
            length = draw.norm()
            blocks[name] = (draw * (norm / length) if length > 0 and norm > 0 else torch.zeros_like(draw)).to(dtype)
        meta = {key: value for key, value in template.metadata.items()
                if key in ("base_fingerprint", "base_name", "fingerprint_blocks", "format")}
        meta.update(name=f"random_{k}", kind="dense", norms_from=template.name, seed=str(seed))
        bases.append(TaskVector(blocks, metadata=meta, check_finite=False))
    return bases


def _flat_blocks(vector: AnyTaskVector, names: Sequence[str]) -> Tensor:
    return torch.cat([vector.dense_block(name, torch.float64).reshape(-1) for name in names])


def gram(vectors: Sequence[AnyTaskVector]) -> Tensor:
    """(d, d) inner products over the blocks the vectors share (float64)."""
    if not vectors:
        raise ValueError("gram: no vectors")
    names = [name for name in vectors[0].names if all(name in v.names for v in vectors)]
    flat = torch.stack([_flat_blocks(v, names) for v in vectors])
    return flat @ flat.T


def project(vector: AnyTaskVector, bases: Sequence[AnyTaskVector]) -> tuple[Tensor, float]:
    """Least-squares coefficients of ``vector`` in the span of ``bases``, and the relative residual norm.

    Solved over the vector's blocks (float64): returns ``c`` minimising ``||vector - sum_k c_k b_k||``
    and that minimum divided by ``||vector||`` (0: in the span, 1: orthogonal to it).
    """
    missing = [name for name in vector.names if any(name not in b.names for b in bases)]
    if missing:
        raise ValueError(f"project: bases lack blocks {missing[:5]} of vector '{vector.name}'")
    names = vector.names
    target = _flat_blocks(vector, names)
    matrix = torch.stack([_flat_blocks(b, names) for b in bases], dim=1)  # (numel, d)
    solution = torch.linalg.lstsq(matrix, target[:, None], driver="gelsd").solution[:, 0]
    residual = float((target - matrix @ solution).norm())
    total = float(target.norm())
    return solution, residual / total if total > 0 else 0.0
