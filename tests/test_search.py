"""Gradient-free search: NGOpt moves toward the known optimum of objectives quadratic in lambda."""

from __future__ import annotations

import pytest
import torch

from taskvec.compose import Composer
from taskvec.search import minimize, search_coefficients


def test_minimize_approaches_quadratic_optimum():
    target = torch.tensor([0.7, -0.4, 1.1, 0.2])
    curvature = torch.tensor([1.0, 3.0, 0.5, 2.0])
    calls = []

    def objective(x: torch.Tensor) -> float:
        calls.append(x.clone())
        return float((curvature * (x - target) ** 2).sum())

    result = minimize(objective, torch.zeros(4), budget=120, seed=0)
    assert len(calls) == 120 == result.evaluations == len(result.history)
    assert torch.equal(calls[0], torch.zeros(4))  # starts where it was told
    assert result.initial_loss == pytest.approx(objective(torch.zeros(4)))
    assert result.best_loss < 0.01 * result.initial_loss
    assert (result.coefficients - target).abs().max() < 0.1
    best = [h["best"] for h in result.history]
    assert best == sorted(best, reverse=True)  # the running best never gets worse
    assert min(h["loss"] for h in result.history) == result.best_loss
    again = minimize(objective, torch.zeros(4), budget=120, seed=0)
    assert torch.equal(again.coefficients, result.coefficients)  # seeded


@pytest.mark.filterwarnings("ignore:Bounds are 2.0 sigma away")  # nevergrad's advice for narrow bounds
def test_minimize_respects_bounds_and_validates():
    result = minimize(lambda x: float(((x - 5.0) ** 2).sum()), torch.zeros(2), budget=40, bounds=(-1.0, 1.0))
    assert (result.coefficients <= 1.0 + 1e-9).all()
    with pytest.raises(ValueError, match="budget"):
        minimize(lambda x: 0.0, torch.zeros(2), budget=0)
    with pytest.raises(ValueError, match="unknown nevergrad optimiser 'Nope'"):
        minimize(lambda x: 0.0, torch.zeros(2), budget=3, optimizer="Nope")


@pytest.mark.parametrize("mode", ["isotropic", "block"])
def test_search_composer_coefficients_on_exact_quadratic(base, bank, images, mode):
    """A linearised composer's output is affine in lambda, so MSE to the output at lambda* is an
    exact quadratic whose minimum (0) is at lambda*."""
    composer = Composer(base, bank, "block", linearized=True)
    columns = composer.coefficients.shape[1]
    star_iso = torch.tensor([0.6, -0.3, 0.9])
    star = star_iso[:, None].expand(-1, columns).clone()
    if mode == "block":
        star = star + 0.2 * torch.linspace(-1, 1, columns)  # a planted per-block pattern
    with torch.no_grad():
        targets = composer(images, coefficients=star)
    batches = [(images, targets)]
    grad_seen = []

    def loss_fn(model, batch):
        grad_seen.append(torch.is_grad_enabled())
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    with torch.no_grad():
        start_loss = float(loss_fn(composer, batches[0]))
    budget = 150 if mode == "isotropic" else 300
    result = search_coefficients(composer, loss_fn, batches, mode=mode, budget=budget, seed=1)
    assert not any(grad_seen) and composer.coefficients.grad is None
    assert result.initial_loss == pytest.approx(start_loss)
    assert result.best_loss < 0.05 * start_loss
    if mode == "isotropic":  # 3 unknowns, 30 outputs: well determined, so lambda itself is found
        assert (result.coefficients - star).abs().max() < 0.15
    # (27 block coefficients on 30 outputs are ill-conditioned: only the loss is a fair target there)
    assert torch.equal(composer.coefficients.detach(), result.coefficients)  # applied
    if mode == "isotropic":
        assert torch.equal(result.coefficients, result.coefficients[:, :1].expand(-1, columns))
    with torch.no_grad():
        assert float(loss_fn(composer, batches[0])) == pytest.approx(result.best_loss, rel=1e-5)
