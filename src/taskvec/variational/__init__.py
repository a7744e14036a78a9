"""Variational (sample-specific) task vector composition with a spike-and-slab prior.

Coefficients become latent per input: an inference network on frozen pre-trained features gives, per
task vector and coefficient column, a slab N(mu, sigma^2) and an inclusion probability p. Training
maximises the ELBO with a relaxed Bernoulli spike; test time uses a deterministic gate. Per-sample
composition runs without one model per sample, by vmap or by linearity (see :mod:`.persample`).
"""

from taskvec.variational.inference import InferenceConfig, InferenceNetwork
from taskvec.variational.model import (
    ELBOLoss,
    MultitaskELBOLoss,
    VariationalComposer,
    VariationalConfig,
    elbo_loss,
    load_inference_network,
)
from taskvec.variational.persample import (
    DEFAULT_METHOD,
    LinearRunner,
    UnsupportedModuleError,
    VmapRunner,
    make_runner,
)
from taskvec.variational.plot import plot_kept_fraction
from taskvec.variational.prior import (
    SpikeSlab,
    gate,
    gated_coefficients,
    kl_warmup,
    sample_binary_concrete,
    sample_coefficients,
    spike_slab_kl,
)

__all__ = [
    "DEFAULT_METHOD",
    "ELBOLoss",
    "InferenceConfig",
    "InferenceNetwork",
    "LinearRunner",
    "MultitaskELBOLoss",
    "SpikeSlab",
    "UnsupportedModuleError",
    "VariationalComposer",
    "VariationalConfig",
    "VmapRunner",
    "elbo_loss",
    "gate",
    "gated_coefficients",
    "kl_warmup",
    "load_inference_network",
    "make_runner",
    "plot_kept_fraction",
    "sample_binary_concrete",
    "sample_coefficients",
    "spike_slab_kl",
]
