"""Choosing which task vectors to keep when the bank must fit a memory budget.

A bank of n vectors costs n networks of memory; a target task usually needs only a few of them.
Four ways to keep N, scored on the target's few labelled shots (never its test data):

- ``features``: cosine similarity between the mean feature of the target's inputs and the mean feature
  of each bank task's inputs, under the pre-trained network. Means run over *every* batch given
  (the paper's code only looked at the last one).
- ``gradient``: the magnitude of the coefficient gradient at lambda = 0,
  ``dL/dlambda_ij = <dL/dtheta_j, tau_ij>``, from one backward pass of a block-wise
  :class:`~taskvec.compose.Composer`; a vector that can move the loss most to first order ranks first.
- ``blockwise``: the same gradient, ranked per block: synthetic vector s takes, in every block, the
  block of the s-th ranked vector for that block. N synthetic vectors cost what N vectors cost.
- ``random``: a seeded draw, the floor the others must beat.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from taskvec.compose import Composer
from taskvec.objectives import _inputs
from taskvec.train import Batch, LossFn
from taskvec.vectors import AnyTaskVector, LoraTaskVector, TaskVector

METHODS = ("features", "gradient", "blockwise", "random")


@dataclass
class Selection:
    """What a selection method kept.

    ``indices``: bank positions kept, best first (for ``blockwise``: every vector that lends a block).
    ``scores``: the method's score of every bank vector (empty for ``random``). ``vectors``: the N
    vectors to compose (synthetic ones for ``blockwise``). ``sources``: for ``blockwise``, per
    synthetic vector, the bank position each block came from.
    """

    method: str
    indices: list[int]
    scores: list[float]
    vectors: list[AnyTaskVector]
    sources: list[dict[str, int]] = field(default_factory=list)


def vector_nbytes(vector: object) -> int:
    """Bytes a vector holds in its storage form (dense tensors, LoRA factors or quantised codes)."""
    if isinstance(vector, TaskVector):
        return sum(t.numel() * t.element_size() for t in vector.tensors.values())
    if isinstance(vector, LoraTaskVector):
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in vector.factors.values())
    nbytes = getattr(vector, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    raise TypeError(f"cannot size a {type(vector).__name__}")


def count_for_budget(vectors: Sequence[object], budget_bytes: int) -> int:
    """How many vectors of the bank fit in ``budget_bytes`` (sized by the largest, so any N of them fit)."""
    if not vectors:
        raise ValueError("the bank is empty")
    largest = max(vector_nbytes(v) for v in vectors)
    return min(len(vectors), int(budget_bytes // largest))


def _check_n(n: int, vectors: Sequence[object]) -> None:
    if not 1 <= n <= len(vectors):
        raise ValueError(f"cannot keep n={n} of a bank of {len(vectors)} vectors")


def _top(scores: Tensor, n: int) -> list[int]:
    # stable: ties keep bank order, so results do not depend on sort internals
    return [int(i) for i in torch.sort(scores, descending=True, stable=True).indices[:n]]


# ----------------------------------------------------------------------------------------------
# (a) feature similarity
# ----------------------------------------------------------------------------------------------


def mean_features(features: Callable[[Tensor], Tensor], batches: Iterable[Batch]) -> Tensor:
    """The mean feature over every sample of every batch (float64), without autograd."""
    total: Tensor | None = None
    count = 0
    with torch.no_grad():
        for batch in batches:
            out = features(_inputs(batch)).reshape(len(_inputs(batch)), -1).to(torch.float64)
            total = out.sum(0) if total is None else total + out.sum(0)
            count += out.shape[0]
    if total is None or count == 0:
        raise ValueError("mean_features: no samples in the batches given")
    return total / count


def select_by_features(
    vectors: Sequence[AnyTaskVector],
    n: int,
    features: Callable[[Tensor], Tensor],
    target_batches: Iterable[Batch],
    bank_batches: Sequence[Iterable[Batch]],
) -> Selection:
    """Keep the n vectors whose task data has the mean feature most similar (cosine) to the target's.

    ``bank_batches[i]`` holds inputs of the task vector ``vectors[i]`` was fine-tuned on.
    """
    _check_n(n, vectors)
    if len(bank_batches) != len(vectors):
        raise ValueError(f"{len(bank_batches)} batch sources for {len(vectors)} vectors: give one per vector")
    target = mean_features(features, target_batches)
    scores = torch.stack([
        torch.nn.functional.cosine_similarity(target, mean_features(features, batches), dim=0)
        for batches in bank_batches
    ])
    keep = _top(scores, n)
    return Selection("features", keep, scores.tolist(), [vectors[i] for i in keep])


# ----------------------------------------------------------------------------------------------
# (b) and (c) coefficient gradients at lambda = 0
# ----------------------------------------------------------------------------------------------


def coefficient_gradients(
    base: nn.Module, vectors: Sequence[AnyTaskVector], loss_fn: LossFn, batches: Iterable[Batch], **composer_kwargs
) -> tuple[Tensor, list[str]]:
    """(n, B) gradient of the mean loss over ``batches`` w.r.t. block coefficients at lambda = 0.

    Returns the gradient and the block names of its columns. ``composer_kwargs`` go to the
    :class:`~taskvec.compose.Composer` (e.g. ``check_base=False``, ``blocks=...``).
    """
    composer = Composer(base, vectors, "block", init=0.0, **composer_kwargs)
    held = list(batches)
    if not held:
        raise ValueError("coefficient_gradients: no batches of the target's shots given")
    for batch in held:
        (loss_fn(composer, batch) / len(held)).backward()
    grad = composer.coefficients.grad
    assert grad is not None
    return grad.detach().clone(), composer.block_names


def select_by_gradient(
    base: nn.Module,
    vectors: Sequence[AnyTaskVector],
    n: int,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    reduce: str = "l2",
    **composer_kwargs,
) -> Selection:
    """Keep the n vectors with the largest coefficient gradient at lambda = 0.

    ``reduce="l2"``: the norm of a vector's block gradients (what block-wise aTLAS can exploit);
    ``"isotropic"``: |sum over blocks|, the slope along the whole vector.
    """
    _check_n(n, vectors)
    grad, _ = coefficient_gradients(base, vectors, loss_fn, batches, **composer_kwargs)
    if reduce == "l2":
        scores = grad.norm(dim=1)
    elif reduce == "isotropic":
        scores = grad.sum(dim=1).abs()
    else:
        raise ValueError(f"reduce must be 'l2' or 'isotropic', got {reduce!r}")
    keep = _top(scores, n)
    return Selection("gradient", keep, scores.tolist(), [vectors[i] for i in keep])


def _synthetic(vectors: Sequence[AnyTaskVector], picks: dict[str, int], name: str) -> AnyTaskVector:
    """One vector assembled block by block from the bank (LoRA factors kept when every source is LoRA)."""
    meta = {"name": name, "kind": "synthetic", "sources": json.dumps({k: vectors[i].name for k, i in picks.items()})}
    sources = [vectors[i] for i in picks.values()]
    first = sources[0]
    # The base fingerprint is a digest of the blocks a vector covers: it carries over when every
    # source shares it and covers exactly the same blocks as the assembled vector.
    if len({v.base_fingerprint for v in sources}) == 1 and all(set(v.names) == set(picks) for v in sources):
        for key in ("base_fingerprint", "base_name", "fingerprint_blocks"):
            if key in first.metadata:
                meta[key] = first.metadata[key]
    if all(isinstance(v, LoraTaskVector) for v in sources):
        loras: dict[str, LoraTaskVector] = {k: vectors[i] for k, i in picks.items()}  # type: ignore[misc]
        return LoraTaskVector({k: v.factors[k] for k, v in loras.items()}, {k: v.shapes[k] for k, v in loras.items()},
                              {k: v.scales[k] for k, v in loras.items()}, metadata=meta)
    return TaskVector({k: vectors[i].dense_block(k) for k, i in picks.items()}, metadata=meta, check_finite=False)


def select_blockwise(
    base: nn.Module,
    vectors: Sequence[AnyTaskVector],
    n: int,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    **composer_kwargs,
) -> Selection:
    """N synthetic vectors: per block, the blocks of the top-N vectors by |coefficient gradient|.

    Synthetic vector s holds, in block j, the block j of the vector ranked s-th for that block. A
    vector that lacks a block (a LoRA vector on other modules) has zero gradient there and is used
    only when nothing better remains; blocks no vector covers are left out.
    """
    _check_n(n, vectors)
    grad, block_names = coefficient_gradients(base, vectors, loss_fn, batches, **composer_kwargs)
    magnitude = grad.abs()
    per_synthetic: list[dict[str, int]] = [{} for _ in range(n)]
    for column, block in enumerate(block_names):
        holders = torch.tensor([block in v.names for v in vectors])
        ranked = [i for i in _top(torch.where(holders, magnitude[:, column], -1.0), len(vectors)) if holders[i]]
        for s, index in enumerate(ranked[:n]):
            per_synthetic[s][block] = index
    synthetic = [_synthetic(vectors, picks, f"blockwise_{s}") for s, picks in enumerate(per_synthetic) if picks]
    used = sorted({i for picks in per_synthetic for i in picks.values()})
    scores = magnitude.norm(dim=1).tolist()
    return Selection("blockwise", used, scores, synthetic, sources=[p for p in per_synthetic if p])


# ----------------------------------------------------------------------------------------------
# (d) random
# ----------------------------------------------------------------------------------------------


def select_random(vectors: Sequence[AnyTaskVector], n: int, *, seed: int = 0) -> Selection:
    """A seeded uniform draw of n distinct vectors: the floor for the informed methods."""
    _check_n(n, vectors)
    keep = [int(i) for i in torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed))[:n]]
    return Selection("random", keep, [], [vectors[i] for i in keep])


def selection_nbytes(selection: Selection) -> int:
    """Bytes the kept vectors hold (what a composer over them stores)."""
    return sum(vector_nbytes(v) for v in selection.vectors)


__all__ = [
    "METHODS",
    "Selection",
    "coefficient_gradients",
    "count_for_budget",
    "mean_features",
    "select_blockwise",
    "select_by_features",
    "select_by_gradient",
    "select_random",
    "selection_nbytes",
    "vector_nbytes",
]
