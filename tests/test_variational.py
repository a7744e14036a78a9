"""Variational composition: KL closed form, samplers, gate, per-sample runners, ELBO training, I/O."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_bank
from synthetic import tiny_vit_bank
from torch import nn
from torch.nn import functional as F

from taskvec.compose import Composer
from taskvec.io import CheckpointError
from taskvec.train import Loader, TrainConfig, fit
from taskvec.variational import (
    LinearRunner,
    SpikeSlab,
    UnsupportedModuleError,
    VariationalComposer,
    VariationalConfig,
    VmapRunner,
    elbo_loss,
    gate,
    kl_warmup,
    plot_kept_fraction,
    sample_binary_concrete,
    sample_coefficients,
    spike_slab_kl,
)
from taskvec.vectors import LoraTaskVector, TaskVector, parameter_blocks


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


# ----------------------------------------------------------------------------------------------
# Prior and KL
# ----------------------------------------------------------------------------------------------


def _kl_by_hand(mu: float, var: float, p: float, pi: float, s0: float) -> float:
    bern = p * math.log(p / pi) + (1 - p) * math.log((1 - p) / (1 - pi))
    gauss = math.log(s0 / math.sqrt(var)) + (var + mu**2) / (2 * s0**2) - 0.5
    return bern + p * gauss


@pytest.mark.parametrize(
    ("mu", "var", "p", "pi", "s0"),
    [(0.5, 0.25, 0.3, 0.2, 2.0), (-1.5, 0.01, 0.9, 0.5, 1.0), (0.0, 4.0, 0.05, 0.7, 0.5)],
)
def test_kl_matches_hand_values(mu, var, p, pi, s0):
    got = spike_slab_kl(
        torch.tensor([mu], dtype=torch.float64),
        torch.tensor([math.log(var)], dtype=torch.float64),
        torch.tensor([_logit(p)], dtype=torch.float64),
        pi,
        s0,
    )
    assert got.item() == pytest.approx(_kl_by_hand(mu, var, p, pi, s0), rel=1e-9, abs=1e-12)


def test_kl_zero_at_prior_positive_elsewhere_finite_at_extremes():
    pi, s0 = 0.3, 1.5
    at_prior = spike_slab_kl(torch.zeros(4), torch.full((4,), 2 * math.log(s0)), torch.full((4,), _logit(pi)), pi, s0)
    assert torch.allclose(at_prior, torch.zeros(4), atol=1e-6)
    generator = torch.Generator().manual_seed(0)
    mu, log_var, logit = (torch.randn(1000, generator=generator) * 3 for _ in range(3))
    assert (spike_slab_kl(mu, log_var, logit, pi, s0) >= -1e-6).all()
    # p -> 0: only the Bernoulli part survives, log(1 / (1 - pi)); p -> 1 stays finite too.
    off = spike_slab_kl(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([-80.0]), pi, s0)
    assert off.item() == pytest.approx(-math.log1p(-pi), rel=1e-5)
    assert torch.isfinite(spike_slab_kl(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([80.0]), pi, s0)).all()
    with pytest.raises(ValueError, match="prior_pi must lie strictly between 0 and 1, got 1.0"):
        spike_slab_kl(mu, log_var, logit, 1.0, s0)
    with pytest.raises(ValueError, match="prior_std must be a positive finite number, got 0"):
        spike_slab_kl(mu, log_var, logit, pi, 0)


@pytest.mark.parametrize(("mu", "var", "p", "pi", "s0"), [(0.8, 0.3, 0.6, 0.25, 1.0), (-0.4, 1.2, 0.2, 0.5, 0.7)])
def test_kl_matches_monte_carlo(mu, var, p, pi, s0):
    """E_q[log q(z, lambda) - log p(z, lambda)] by sampling; z=0 shares the point mass so only Bernoulli terms."""
    samples = 400_000
    generator = torch.Generator().manual_seed(1)
    z = torch.rand(samples, generator=generator, dtype=torch.float64) < p
    lam = mu + math.sqrt(var) * torch.randn(samples, generator=generator, dtype=torch.float64)
    log_q_slab = -0.5 * ((lam - mu) ** 2 / var + math.log(2 * math.pi * var))
    log_p_slab = -0.5 * (lam**2 / s0**2 + math.log(2 * math.pi * s0**2))
    off = torch.full_like(lam, math.log((1 - p) / (1 - pi)))
    ratio = torch.where(z, math.log(p / pi) + log_q_slab - log_p_slab, off)
    estimate, stderr = ratio.mean().item(), ratio.std().item() / math.sqrt(samples)
    closed = spike_slab_kl(
        torch.tensor(mu, dtype=torch.float64), torch.tensor(math.log(var), dtype=torch.float64),
        torch.tensor(_logit(p), dtype=torch.float64), pi, s0,
    ).item()
    assert abs(estimate - closed) < 4 * stderr + 1e-4


def test_kl_warmup_schedule():
    assert [kl_warmup(t, 10) for t in (0, 1, 5, 10, 50)] == [0.0, 0.1, 0.5, 1.0, 1.0]
    assert kl_warmup(0, 0) == 1.0
    with pytest.raises(ValueError, match="kl_warmup_steps must be >= 0, got -1"):
        kl_warmup(3, -1)


def test_binary_concrete_matches_bernoulli_mean_and_hardens_with_temperature():
    generator = torch.Generator().manual_seed(2)
    logit = torch.full((100_000,), _logit(0.3))
    cold = sample_binary_concrete(logit, 0.05, generator)
    assert ((cold > 0.5).float().mean() - 0.3).abs() < 0.01  # P(sample > 1/2) = p at any temperature
    assert ((cold < 0.02) | (cold > 0.98)).float().mean() > 0.9
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        sample_binary_concrete(logit, 0, generator)


def test_gate_rules():
    mu = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    std = torch.tensor([0.5, 2.0, 0.5, 0.5, 0.0])
    p = torch.tensor([0.9, 0.9, 0.4, 0.9, 0.9])
    post = SpikeSlab(mu, 2 * std.log(), torch.log(p) - torch.log1p(-p))
    assert gate(post, 0.5, 1.0).tolist() == [True, False, False, False, True]
    assert gate(post, 0.0, math.inf).all()  # an open gate keeps everything, even mu == 0


# ----------------------------------------------------------------------------------------------
# Per-sample composition
# ----------------------------------------------------------------------------------------------


def _loop(composer: Composer, x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    return torch.cat([composer(x[i : i + 1], coefficients=coefficients[i]) for i in range(x.shape[0])])


def _lora_bank(base: nn.Module) -> list:
    blocks = parameter_blocks(base)
    generator = torch.Generator().manual_seed(3)
    factors = {}
    for name in ("conv.weight", "fc.weight", "depthwise.weight"):
        shape = blocks[name].shape
        factors[name] = (
            torch.randn(2, shape[1:].numel(), generator=generator) * 0.1,
            torch.randn(shape[0], 2, generator=generator) * 0.1,
        )
    lora = LoraTaskVector(factors, {k: blocks[k].shape for k in factors}, 0.5, metadata={"name": "lora"})
    return [*make_bank(base, 2), lora]


@pytest.mark.parametrize("granularity", ["block", "layer", "x3", "x2-random"])
def test_runners_match_per_sample_loop(base, images, granularity):
    composer = Composer(base, _lora_bank(base), granularity, check_base=False)
    generator = torch.Generator().manual_seed(4)
    coefficients = torch.randn(images.shape[0], 3, composer.layout.num_columns, generator=generator)
    coefficients.requires_grad_(True)
    expected = _loop(composer, images, coefficients)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), coefficients)
    for runner in (VmapRunner(composer, chunk_size=4), LinearRunner(composer)):
        got = runner(images, coefficients)
        assert torch.allclose(got, expected, atol=1e-5), type(runner).__name__
        (grad,) = torch.autograd.grad(got.square().sum(), coefficients)
        assert torch.allclose(grad, grad_expected, atol=1e-4), type(runner).__name__


def test_runners_on_tiny_vit_and_refusal_names_module():
    vit, bank, blocks = tiny_vit_bank(2)
    composer = Composer(vit, bank, "block", blocks=blocks)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    coefficients = torch.randn(3, 2, composer.layout.num_columns, generator=torch.Generator().manual_seed(6))
    expected = _loop(composer, x, coefficients)
    assert torch.allclose(VmapRunner(composer, 2)(x, coefficients), expected, atol=1e-5)
    assert torch.allclose(LinearRunner(composer)(x, coefficients), expected, atol=1e-5)
    whole = Composer(vit, bank, "block", blocks=[*blocks, "cls_token"], check_base=False)
    with pytest.raises(UnsupportedModuleError, match="block 'cls_token' belongs to VisionTransformer '<root>'"):
        LinearRunner(whole)


class _ReadsWeight(nn.Module):
    """Uses its child's weight outside the child's forward: the hooks cannot see that use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + F.linear(x, self.fc.weight)


class _SkipsForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fc.weight, self.fc.bias)


@pytest.mark.parametrize("cls", [_ReadsWeight, _SkipsForward])
def test_linear_runner_detects_weights_used_outside_forward(cls):
    torch.manual_seed(0)
    net = cls().eval()
    tuned = copy.deepcopy(net)
    with torch.no_grad():
        tuned.fc.weight.add_(1.0)
    composer = Composer(net, [TaskVector.from_models(net, tuned, name="t")], "block")
    model = VariationalComposer(composer, feature_dim=4, config=VariationalConfig(method="linear", hidden=(8,)))
    with pytest.raises(UnsupportedModuleError, match="Use method='vmap'"):
        model.eval()(torch.randn(3, 4))


def test_batchnorm_in_training_mode_is_refused(base, bank, images):
    composer = Composer(base, bank, "block", base_eval=False).train()
    coefficients = torch.zeros(images.shape[0], 3, composer.layout.num_columns)
    for runner in (VmapRunner(composer), LinearRunner(composer)):
        with pytest.raises(ValueError, match="BatchNorm2d 'bn' uses batch statistics"):
            runner(images, coefficients)
    with pytest.raises(ValueError, match=r"per-sample coefficients have shape \(6, 3\); expected \(6, 3, 5\)"):
        VmapRunner(Composer(base, bank, "layer"))(images, torch.zeros(6, 3))


# ----------------------------------------------------------------------------------------------
# The variational composer
# ----------------------------------------------------------------------------------------------


def _model(base, bank, method: str, **config) -> VariationalComposer:
    composer = Composer(base, bank, "block", init=0.2)
    torch.manual_seed(0)
    model = VariationalComposer(
        composer, feature_dim=5, config=VariationalConfig(method=method, hidden=(16,), **config)
    )
    with torch.no_grad():  # input-dependent posterior, so the gate keeps some and drops some
        model.inference.out.weight.normal_(0.0, 1.0)
    return model.eval()


@pytest.mark.parametrize("method", ["vmap", "linear"])
def test_gated_inference_is_deterministic_and_batch_independent(base, bank, images, method):
    model = _model(base, bank, method)
    first, second = model(images), model(images)
    assert torch.equal(first, second)
    keep = gate(model.posterior(images), 0.5, 1.0)
    assert 0 < keep.float().mean() < 1  # the gate really decides something here
    order = torch.tensor([3, 0, 5, 1])
    alone = torch.cat([model(images[i : i + 1]) for i in range(images.shape[0])])
    assert torch.allclose(model(images[order]), first[order], atol=1e-5)
    assert torch.allclose(alone, first, atol=1e-5)
    assert torch.equal(model(images).argmax(1), alone.argmax(1))


@pytest.mark.parametrize("method", ["vmap", "linear"])
def test_open_gate_with_constant_mu_equals_composer_and_merged_model(base, bank, images, method):
    model = _model(base, bank, method, p_threshold=0.0, uncertainty_threshold=math.inf)
    c = torch.randn(3, model.composer.layout.num_columns, generator=torch.Generator().manual_seed(8))
    model.inference.set_constant(c, -math.inf, 0.0)  # variance clamps to ~0; p = 1/2 passes the open gate
    posterior = model.posterior(images)
    assert torch.allclose(posterior.mu, c.expand_as(posterior.mu))
    out = model(images)
    plain = model.composer(images, coefficients=c)
    assert torch.allclose(out, plain, atol=1e-5)
    with torch.no_grad():
        model.composer.coefficients.copy_(c)
    assert torch.allclose(out, model.composer.merge()(images), atol=1e-5)
    assert torch.equal(model.kept_fraction(x=images), torch.ones(3, model.composer.layout.num_columns))


def test_initial_posterior_sits_at_init_and_prior(base, bank, images):
    composer = Composer(base, bank, "layer", init=0.3)
    model = VariationalComposer(composer, feature_dim=5, config=VariationalConfig(prior_pi=0.2, init_std=0.05))
    posterior = model.posterior(images)
    assert posterior.mu.shape == (6, 3, composer.layout.num_columns)
    assert torch.allclose(posterior.mu, torch.full_like(posterior.mu, 0.3))
    assert torch.allclose(posterior.inclusion, torch.full_like(posterior.mu, 0.2))
    assert torch.allclose(posterior.std, torch.full_like(posterior.mu, 0.05))
    assert not composer.coefficients.requires_grad
    per_block = model.kept_fraction(x=images, per_block=True)
    assert per_block.shape == (3, len(composer.block_names)) and (per_block == 0).all()  # p = 0.2 < 0.5
    with pytest.raises(ValueError, match="cannot tell the feature width of TinyNet"):
        VariationalComposer(Composer(base, bank))


def test_elbo_training_reduces_loss(base, bank):
    torch.manual_seed(0)
    composer = Composer(base, bank, "block", init=0.0)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # labels a composition can reach: the one with every coefficient at 1
        y = composer(x, coefficients=torch.ones_like(composer.coefficients)).argmax(1)
    model = VariationalComposer(composer, feature_dim=5, config=VariationalConfig(hidden=(32,), prior_pi=0.5))
    running_mean = model.composer.base.bn.running_mean.clone()
    features = model.features(x)
    loss_fn = elbo_loss(None, num_train=64, kl_warmup_steps=8, kl_normalizer="dataset")  # the opt-in scaling

    def batches(generator: torch.Generator):
        order = torch.randperm(64, generator=generator)
        for i in range(0, 64, 32):
            idx = order[i : i + 32]
            yield x[idx], y[idx], features[idx]

    result = fit(model, loss_fn, Loader(batches, 2), TrainConfig(epochs=6, lr=5e-2, progress=False))
    losses = [record.loss for record in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1
    assert loss_fn.step == 12 and loss_fn.beta() == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.composer.base.bn.running_mean, running_mean)
    assert set(loss_fn.last) == {"loss", "nll", "kl", "beta"}
    with pytest.raises(ValueError, match=r"ELBO batch must be \(x, y\), \(x, y, features\) or a dict; got int"):
        loss_fn(model, 3)


def test_save_load_roundtrip_and_kept_fraction_plot(base, bank, images, tmp_path):
    model = _model(base, bank, "vmap", p_threshold=0.4, uncertainty_threshold=2.5)
    path = model.save(tmp_path / "q.safetensors")
    again = VariationalComposer.load(path, Composer(base, bank, "block", init=0.2))
    assert again.config.p_threshold == 0.4 and again.config.uncertainty_threshold == 2.5
    assert torch.equal(again.eval()(images), model(images))
    other = VariationalComposer(Composer(base, bank, "layer"), feature_dim=5)
    with pytest.raises(CheckpointError, match="granularity 'block' does not match this composer's 'layer'"):
        other.load_inference(path)
    fraction = model.kept_fraction(x=images)
    assert fraction.shape == (3, model.composer.layout.num_columns)
    assert ((fraction >= 0) & (fraction <= 1)).all()
    png = plot_kept_fraction(fraction, model.column_labels, model.vector_names, tmp_path / "kept.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2 vector names for 3 rows"):
        plot_kept_fraction(fraction, model.column_labels, ["a", "b"], tmp_path / "bad.png")


def test_sampler_follows_its_definition_in_distribution():
    """c = z * lambda, lambda ~ N(mu, sigma^2), z = sigmoid((logit + L) / T) with L ~ Logistic(0, 1)."""
    n, T = 200_000, 0.5
    generator = torch.Generator().manual_seed(4)
    ones = torch.ones(n, dtype=torch.float64)  # float64: z stays strictly inside (0, 1) for the logit below

    def full(value: float) -> torch.Tensor:
        return value * ones

    # sigma -> 0 isolates the gate: z = c / mu, and T * logit(z) - logit(p) must be standard logistic.
    p, mu = 0.3, 2.0
    spike_only = SpikeSlab(mu * ones, full(-80.0), full(_logit(p)))
    z = sample_coefficients(spike_only, T, generator) / mu
    noise = T * (torch.log(z) - torch.log1p(-z)) - _logit(p)
    assert abs(float(noise.mean())) < 0.03  # logistic: mean 0, variance pi^2 / 3
    assert abs(float(noise.var()) - math.pi**2 / 3) < 0.05
    assert abs(float((z > 0.5).float().mean()) - p) < 0.005  # P(z > 1/2) = p at any temperature
    # logit -> inf opens the gate (z = 1): c is the slab itself, N(mu, sigma^2).
    sigma = 0.7
    slab_only = SpikeSlab(mu * ones, full(2 * math.log(sigma)), full(80.0))
    c = sample_coefficients(slab_only, T, generator)
    assert abs(float(c.mean()) - mu) < 0.01 and abs(float(c.std()) - sigma) < 0.01
    third = float(((c - mu) ** 3).mean()) / sigma**3
    assert abs(third) < 0.03  # symmetric, as a Gaussian
    # Both together: z and lambda independent, so E[c] = E[z] * mu with E[z] from the gate-only draw.
    both = SpikeSlab(mu * ones, full(2 * math.log(sigma)), full(_logit(p)))
    mixed = sample_coefficients(both, T, generator)
    assert abs(float(mixed.mean()) - float(z.mean()) * mu) < 0.02


def test_training_forward_composes_the_sampled_coefficients(base, bank, images):
    """In training mode the output is the per-sample composition at a draw of the sampler (same global
    seed, same draw); with sample=False it is the composition at mu where the gate keeps, else 0."""
    model = _model(base, bank, "vmap", p_threshold=0.5, uncertainty_threshold=1.0).train()
    with torch.no_grad():
        posterior = model.posterior(images)
    torch.manual_seed(21)
    out = model(images)
    torch.manual_seed(21)
    drawn = sample_coefficients(posterior, model.config.temperature)
    assert torch.allclose(out, _loop(model.composer, images, drawn), atol=1e-5)
    torch.manual_seed(22)
    assert not torch.allclose(model(images), out, atol=1e-3)  # another draw, another output

    # The gate by its definition, element by element.
    p, mu, std = posterior.inclusion, posterior.mu, posterior.std
    gated = torch.zeros_like(mu)
    for index in torch.cartesian_prod(*(torch.arange(k) for k in mu.shape)).tolist():
        i = tuple(index)
        relative = float(std[i]) / abs(float(mu[i])) if float(mu[i]) != 0 else math.inf
        if float(p[i]) >= 0.5 and relative <= 1.0:
            gated[i] = mu[i]
    assert 0 < int((gated != 0).sum()) < gated.numel()  # the gate keeps some and drops some here
    deterministic = model(images, sample=False)
    assert torch.allclose(deterministic, _loop(model.composer, images, gated), atol=1e-5)
    assert torch.equal(deterministic, model.eval()(images))


def test_vmap_runner_handles_linearised_composer_linear_runner_refuses(base, bank, images):
    composer = Composer(base, bank, "block", linearized=True)
    generator = torch.Generator().manual_seed(3)
    coefficients = torch.randn(images.shape[0], 3, composer.layout.num_columns, generator=generator)
    expected = _loop(composer, images, coefficients)
    assert torch.allclose(VmapRunner(composer)(images, coefficients), expected, atol=1e-5)
    with pytest.raises(UnsupportedModuleError, match=r"linearised one \(linearized=True\)"):
        LinearRunner(composer)
