"""Gradient-free search of composition coefficients with nevergrad's NGOpt.

Why: a backward pass through the network costs memory (activations) and needs a differentiable
objective; an evolutionary search needs only forward passes under ``torch.no_grad``, as in LoraHub
and the aTLAS paper's gradient-free variant. The budget is counted in objective evaluations.

Two parametrisations of a :class:`~taskvec.compose.Composer`'s coefficients (n vectors x C columns):
``isotropic`` searches n numbers, each shared by all columns of its vector; ``block`` searches every
column of the composer's layout (one per vector and block for a ``block`` composer). The result is the
best *evaluated* point: the objective is deterministic, so that value is known exactly, whereas the
optimiser's own recommendation may be a point it never evaluated.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from taskvec.compose import Composer
from taskvec.train import Batch, LossFn

MODES = ("isotropic", "block")


@dataclass
class SearchResult:
    """Best coefficients found and how the search got there."""

    coefficients: Tensor            # the composer's shape (n, C) (or the shape of ``init`` for :func:`minimize`)
    best_loss: float
    initial_loss: float
    evaluations: int
    seconds: float
    optimizer: str
    history: list[dict[str, float]] = field(default_factory=list)  # evaluation, loss, best, seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "coefficients": self.coefficients.tolist(),
            "best_loss": self.best_loss,
            "initial_loss": self.initial_loss,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "optimizer": self.optimizer,
            "history": self.history,
        }


def minimize(
    objective: Callable[[Tensor], float],
    init: Tensor,
    *,
    budget: int,
    seed: int = 0,
    bounds: tuple[float, float] = (-1.5, 1.5),
    optimizer: str = "NGOpt",
) -> SearchResult:
    """Minimise ``objective(x)`` over tensors shaped like ``init`` within ``bounds``, in ``budget`` calls.

    The initial point is the first evaluation, so the result is never worse than ``init``.
    """
    import nevergrad as ng

    if budget < 1:
        raise ValueError(f"budget must be at least one evaluation, got {budget}")
    low, high = bounds
    if not low < high:
        raise ValueError(f"bounds must satisfy low < high, got {bounds}")
    start = init.detach().to(torch.float64).cpu().clamp(low, high)
    if optimizer not in ng.optimizers.registry:
        raise ValueError(f"unknown nevergrad optimiser {optimizer!r} (e.g. NGOpt, CMA, TwoPointsDE, OnePlusOne)")
    param = ng.p.Array(init=start.numpy().copy()).set_bounds(low, high)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget, num_workers=1)

    opt.suggest(start.numpy().copy())  # the first evaluation is the starting point
    history: list[dict[str, float]] = []
    best_value, best_x = float("inf"), start
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")  # scipy's note on nevergrad's setting
        for evaluation in range(budget):
            candidate = opt.ask()
            x = torch.from_numpy(np.asarray(candidate.value, dtype=np.float64)).reshape(start.shape)
            value = float(objective(x.to(device=init.device, dtype=init.dtype)))
            if not np.isfinite(value):
                value = float("inf")
            opt.tell(candidate, value)
            if value < best_value:
                best_value, best_x = value, x
            history.append({"evaluation": evaluation + 1, "loss": value, "best": best_value,
                            "seconds": time.perf_counter() - began})
    return SearchResult(
        coefficients=best_x.to(init.dtype).to(init.device),
        best_loss=best_value,
        initial_loss=history[0]["loss"],
        evaluations=budget,
        seconds=time.perf_counter() - began,
        optimizer=optimizer,
        history=history,
    )


class _AtCoefficients(nn.Module):
    """The composer run at fixed coefficients, so a ``loss_fn(model, batch)`` can evaluate it."""

    def __init__(self, composer: Composer, coefficients: Tensor) -> None:
        super().__init__()
        self.composer = composer
        self.fixed = coefficients

    def forward(self, *args, **kwargs):
        return self.composer(*args, coefficients=self.fixed, **kwargs)


def composer_objective(composer: Composer, loss_fn: LossFn, batches: Iterable[Batch]) -> Callable[[Tensor], float]:
    """Mean of ``loss_fn`` over ``batches`` at given (n, C) coefficients, without autograd."""
    held = list(batches)
    if not held:
        raise ValueError("the gradient-free objective needs at least one batch")

    def evaluate(coefficients: Tensor) -> float:
        with torch.no_grad():
            model = _AtCoefficients(composer, coefficients)
            return sum(float(loss_fn(model, batch)) for batch in held) / len(held)

    return evaluate


def search_coefficients(
    composer: Composer,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    mode: str = "block",
    budget: int = 100,
    seed: int = 0,
    bounds: tuple[float, float] = (-1.5, 1.5),
    optimizer: str = "NGOpt",
    apply: bool = True,
) -> SearchResult:
    """Search ``composer``'s coefficients to minimise the mean ``loss_fn`` over ``batches``.

    Starts from the composer's current coefficients (their per-vector mean for ``isotropic``) and, with
    ``apply``, writes the best ones back into ``composer.coefficients``. The composer is switched to
    eval mode for the search.
    """
    if mode not in MODES:
        raise ValueError(f"search mode {mode!r} is not one of {MODES}")
    composer.eval()
    evaluate = composer_objective(composer, loss_fn, batches)
    current = composer.coefficients.detach()
    columns = current.shape[1]
    if mode == "isotropic":
        result = minimize(lambda x: evaluate(x[:, None].expand(-1, columns)), current.mean(1),
                          budget=budget, seed=seed, bounds=bounds, optimizer=optimizer)
        result.coefficients = result.coefficients[:, None].expand(-1, columns).clone()
    else:
        result = minimize(evaluate, current, budget=budget, seed=seed, bounds=bounds, optimizer=optimizer)
    if apply:
        with torch.no_grad():
            composer.coefficients.copy_(result.coefficients)
    return result
