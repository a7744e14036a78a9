"""AdaMerging as a composer configuration + entropy objective, against a hand-written loop."""

from __future__ import annotations

import pytest
import torch
from conftest import make_bank, make_base
from torch import nn

from taskvec.adamerging import AdaMergingConfig, ClampedComposer, adamerge, multitask_entropy
from taskvec.compose import Composer
from taskvec.train import Loader


def _setup(n: int = 2):
    base = make_base()
    vectors = make_bank(base, n)
    torch.manual_seed(5)
    heads = [nn.Linear(5, 4) for _ in range(n)]
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(24, 3, 8, 8, generator=generator) for _ in range(n)]
    return base, vectors, heads, inputs


def _loader(inputs, steps: int = 6, size: int = 4) -> Loader:
    def make(generator):
        for step in range(steps):
            yield [x[(torch.arange(size) + step * size) % len(x)] for x in inputs]

    return Loader(make, steps)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.float().softmax(-1)
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def _oracle(base, vectors, heads, inputs, granularity, config: AdaMergingConfig) -> torch.Tensor:
    """Adam at a fixed rate on sum_t mean entropy(head_t(composer(x_t, clamped coefficients)))."""
    composer = Composer(base, vectors, granularity, init=config.init)
    optimizer = torch.optim.Adam([composer.coefficients], lr=config.lr)
    for batch in _loader(inputs).epoch(torch.Generator()):
        optimizer.zero_grad()
        coefficients = composer.coefficients.clamp(*config.clamp)
        terms = [_entropy(h(composer(x, coefficients=coefficients))).mean() for h, x in zip(heads, batch, strict=True)]
        loss = sum(terms)
        loss.backward()
        optimizer.step()
    return composer.coefficients.detach().clamp(*config.clamp)


@pytest.mark.parametrize(("granularity", "composer_granularity"), [("task", "isotropic"), ("layer", "block")])
def test_adamerging_matches_a_constant_rate_entropy_loop(granularity, composer_granularity):
    base, vectors, heads, inputs = _setup()
    config = AdaMergingConfig(granularity=granularity, steps=6, lr=0.05, progress=False)
    composer, result = adamerge(base, vectors, heads, _loader(inputs), config)
    expected = _oracle(base, vectors, heads, inputs, composer_granularity, config)
    rows = 1 if granularity == "task" else composer.coefficients.shape[1]
    assert composer.coefficients.shape == (len(vectors), rows)
    assert torch.allclose(composer.coefficients.detach(), expected, atol=1e-6)
    assert not torch.allclose(composer.coefficients.detach(), torch.full_like(expected, 0.3))  # it moved
    assert result.history[-1].epoch == 1


def test_clamped_composer_clamps_in_forward_and_settles():
    base, vectors, _, inputs = _setup()
    composer = Composer(base, vectors, "block", init=0.3)
    with torch.no_grad():
        composer.coefficients[0, 0] = 1.7
        composer.coefficients[1, 1] = -0.4
    clamped = ClampedComposer(composer, 0.0, 1.0)
    expected = composer(inputs[0], coefficients=composer.coefficients.detach().clamp(0.0, 1.0))
    assert torch.allclose(clamped(inputs[0]), expected)
    clamped.settle()
    settled = composer.coefficients.detach()
    assert float(settled.max()) == 1.0 and float(settled.min()) == 0.0
    with pytest.raises(ValueError, match="low < high"):
        ClampedComposer(composer, 1.0, 0.0)


def test_multitask_entropy_refuses_labelled_batches():
    base, _, heads, inputs = _setup()
    loss_fn = multitask_entropy(heads)
    value = loss_fn(base, [x[:4] for x in inputs])
    assert torch.allclose(value, sum(_entropy(h(base(x[:4]))).mean() for h, x in zip(heads, inputs, strict=True)))
    with pytest.raises(TypeError, match="one per task"):
        loss_fn(base, [(inputs[0][:4], torch.zeros(4, dtype=torch.long)), inputs[1][:4]])


def test_adamerging_config_is_checked_before_any_work():
    with pytest.raises(ValueError, match="granularity"):
        AdaMergingConfig(granularity="block")
    with pytest.raises(ValueError, match="steps"):
        AdaMergingConfig(steps=0)
    base, vectors, heads, inputs = _setup()
    with pytest.raises(ValueError, match="one head per vector"):
        adamerge(base, vectors, heads[:1], _loader(inputs), AdaMergingConfig(progress=False))


def test_multitask_entropy_takes_inputs_of_different_shapes():
    """Token batches are padded per task, so tasks' inputs differ in length: each gets its own pass."""

    class MeanPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, 3) -> (B, 5), any L
            return self.proj(x).mean(1)

    torch.manual_seed(0)
    model, heads = MeanPool(), [nn.Linear(5, 4), nn.Linear(5, 3)]
    batch = [torch.randn(4, 7, 3), torch.randn(2, 11, 3)]
    expected = sum(_entropy(h(model(x))).mean() for h, x in zip(heads, batch, strict=True))
    assert torch.allclose(multitask_entropy(heads)(model, batch), expected)
