"""The amortised inference network q(Lambda, z | x) on frozen pre-trained features.

An MLP maps features f(x) (B, D) to, per task vector and coefficient column, a slab mean, a slab
log-variance and a spike logit. The output layer starts at zero weight with biases set so that, before
any training, every sample gets mu = ``mu_init`` (e.g. the aTLAS coefficients), sigma = ``init_std`` and
p = ``prior_pi``: the variational model starts exactly where the deterministic one is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from taskvec.variational.prior import SpikeSlab, check_prior

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class InferenceConfig:
    """Shape and initialisation of :class:`InferenceNetwork` (stored with its weights)."""

    in_features: int
    n_vectors: int
    n_columns: int
    hidden: Sequence[int] = field(default_factory=lambda: (256,))
    activation: str = "gelu"
    normalize_input: bool = True
    init_std: float = 0.1
    prior_pi: float = 0.5
    log_var_min: float = -20.0
    log_var_max: float = 8.0

    def __post_init__(self) -> None:
        for key in ("in_features", "n_vectors", "n_columns"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"InferenceConfig.{key} must be a positive int, got {value!r}")
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"InferenceConfig.hidden widths must be positive, got {self.hidden}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if not self.log_var_min < self.log_var_max:
            raise ValueError(f"log_var_min {self.log_var_min} must be below log_var_max {self.log_var_max}")
        check_prior(self.prior_pi, 1.0)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data


def _initial_mu(mu_init: float | Tensor, n: int, columns: int) -> Tensor:
    if isinstance(mu_init, Tensor):
        value = mu_init.detach().to(torch.float32).cpu()
        if value.dim() == 0:
            return value.expand(n, columns).clone()
        if value.shape == (n,):
            return value[:, None].repeat(1, columns)
        if value.shape == (n, columns):
            return value.clone()
        raise ValueError(f"mu_init has shape {tuple(value.shape)}; expected (), ({n},) or ({n}, {columns})")
    return torch.full((n, columns), float(mu_init))


class InferenceNetwork(nn.Module):
    """features (B, D) -> :class:`SpikeSlab` with tensors (B, n_vectors, n_columns)."""

    def __init__(self, config: InferenceConfig, mu_init: float | Tensor = 0.0) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        if config.normalize_input:
            # Why: pre-trained features come at any scale; a parameter-free norm keeps the MLP's
            # operating range fixed without adding a per-dataset statistic to save.
            layers.append(nn.LayerNorm(config.in_features, elementwise_affine=False))
        width = config.in_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[config.activation]()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        n, columns = config.n_vectors, config.n_columns
        self.out = nn.Linear(width, 3 * n * columns)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.copy_(
                torch.cat(
                    [
                        _initial_mu(mu_init, n, columns).reshape(-1),
                        torch.full((n * columns,), 2.0 * math.log(config.init_std)),
                        torch.full((n * columns,), math.log(config.prior_pi) - math.log1p(-config.prior_pi)),
                    ]
                )
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.config.n_vectors, self.config.n_columns

    def forward(self, features: Tensor) -> SpikeSlab:
        if features.dim() != 2 or features.shape[1] != self.config.in_features:
            raise ValueError(
                f"inference network expects features of shape (B, {self.config.in_features}), "
                f"got {tuple(features.shape)}"
            )
        out = self.out(self.trunk(features.to(self.out.weight.dtype)))
        mu, log_var, logit = out.reshape(features.shape[0], 3, *self.shape).unbind(1)
        log_var = log_var.clamp(self.config.log_var_min, self.config.log_var_max)
        return SpikeSlab(mu, log_var, logit)

    def set_constant(self, mu: Tensor | float, log_var: Tensor | float, spike_logit: Tensor | float) -> None:
        """Make the output input-independent (zero output weights, biases from the given values).

        For tests and for starting from a known deterministic composition.
        """
        n, columns = self.shape
        with torch.no_grad():
            self.out.weight.zero_()
            parts = [
                torch.as_tensor(value, dtype=torch.float32).expand(n, columns).reshape(-1)
                for value in (mu, log_var, spike_logit)
            ]
            self.out.bias.copy_(torch.cat(parts))
