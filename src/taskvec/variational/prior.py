"""The spike-and-slab prior, its closed-form KL, the reparameterised posterior samples and the gate.

Prior per component (sample, vector, column): z ~ Bernoulli(pi); lambda | z=1 ~ N(0, s0^2), lambda | z=0 = 0.
Posterior: z ~ Bernoulli(p), lambda | z=1 ~ N(mu, sigma^2), lambda | z=0 = 0. Both put a point mass at 0
for z=0, so the KL is finite and closed form:

    KL = KL_Bern(p || pi) + p * KL(N(mu, sigma^2) || N(0, s0^2)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SpikeSlab(NamedTuple):
    """Posterior parameters, each (B, n_vectors, n_columns): slab mean, slab log-variance, spike logit."""

    mu: Tensor
    log_var: Tensor
    spike_logit: Tensor

    @property
    def inclusion(self) -> Tensor:
        """p = q(z=1)."""
        return torch.sigmoid(self.spike_logit)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.log_var)


def check_prior(prior_pi: float, prior_std: float) -> None:
    """Refuse priors for which the KL is undefined (pi at 0 or 1, non-positive slab width)."""
    if not 0.0 < float(prior_pi) < 1.0:
        raise ValueError(f"prior_pi must lie strictly between 0 and 1, got {prior_pi}")
    if not (float(prior_std) > 0.0 and math.isfinite(float(prior_std))):
        raise ValueError(f"prior_std must be a positive finite number, got {prior_std}")


def spike_slab_kl(
    mu: Tensor, log_var: Tensor, spike_logit: Tensor, prior_pi: float, prior_std: float
) -> Tensor:
    """Elementwise KL(q || p) of the spike-and-slab posterior against the spike-and-slab prior.

    Computed from the logit with log-sigmoids so that p near 0 or 1 stays finite; same shape as ``mu``.
    """
    check_prior(prior_pi, prior_std)
    log_p = F.logsigmoid(spike_logit)
    log_not_p = F.logsigmoid(-spike_logit)
    p = torch.exp(log_p)
    kl_bernoulli = p * (log_p - math.log(prior_pi)) + (1.0 - p) * (log_not_p - math.log1p(-prior_pi))
    prior_var = float(prior_std) ** 2
    kl_gauss = 0.5 * (math.log(prior_var) - log_var + (torch.exp(log_var) + mu.square()) / prior_var - 1.0)
    return kl_bernoulli + p * kl_gauss


def kl_warmup(step: int, warmup_steps: int) -> float:
    """beta(t): linear from 0 at step 0 to 1 at ``warmup_steps``, then 1 (no warm-up when steps <= 0)."""
    if warmup_steps < 0:
        raise ValueError(f"kl_warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    return min(1.0, max(0, step) / warmup_steps)


def sample_binary_concrete(logit: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """Relaxed Bernoulli (binary concrete) sample in (0, 1): sigmoid((logit + logistic noise) / temperature).

    Why relaxed: a hard Bernoulli has no pathwise gradient to its logit; as temperature -> 0 the sample
    tends to the hard one.
    """
    if not temperature > 0:
        raise ValueError(f"concrete temperature must be > 0, got {temperature}")
    u = torch.rand(logit.shape, generator=generator, device=logit.device, dtype=logit.dtype)
    u = u.clamp(1e-6, 1.0 - 1e-6)
    return torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)


def sample_coefficients(
    posterior: SpikeSlab, temperature: float, generator: torch.Generator | None = None
) -> Tensor:
    """z * lambda with z relaxed-Bernoulli and lambda = mu + sigma * eps (both reparameterised)."""
    eps = torch.randn(
        posterior.mu.shape, generator=generator, device=posterior.mu.device, dtype=posterior.mu.dtype
    )
    slab = posterior.mu + posterior.std * eps
    return sample_binary_concrete(posterior.spike_logit, temperature, generator) * slab


def gate(posterior: SpikeSlab, p_threshold: float, uncertainty_threshold: float) -> Tensor:
    """Boolean keep-mask: inclusion p >= p_threshold and sigma/|mu| <= uncertainty_threshold.

    sigma/|mu| is +inf for mu == 0 < sigma and 0 for mu == sigma == 0, so an open gate
    (thresholds 0 and inf) keeps every component.
    """
    if not 0.0 <= p_threshold <= 1.0:
        raise ValueError(f"p_threshold must lie in [0, 1], got {p_threshold}")
    if not uncertainty_threshold >= 0.0:
        raise ValueError(f"uncertainty_threshold must be >= 0 (inf disables it), got {uncertainty_threshold}")
    std = posterior.std
    magnitude = posterior.mu.abs()
    relative = torch.where(
        magnitude > 0, std / magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny), torch.where(std > 0, math.inf, 0.0)
    )
    return (posterior.inclusion >= p_threshold) & (relative <= uncertainty_threshold)


def gated_coefficients(posterior: SpikeSlab, p_threshold: float, uncertainty_threshold: float) -> Tensor:
    """Deterministic test-time coefficients: mu where the gate keeps the component, 0 elsewhere."""
    keep = gate(posterior, p_threshold, uncertainty_threshold)
    return torch.where(keep, posterior.mu, torch.zeros_like(posterior.mu))
