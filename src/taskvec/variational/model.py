"""The variational composer: per-sample spike-and-slab coefficients, the ELBO objective, gated inference.

``VariationalComposer`` wraps a :class:`~taskvec.compose.Composer` (bank, layout, base) with a frozen
feature extractor (by default the base network itself at theta_0) and an :class:`InferenceNetwork`.
Only the inference network trains; the composer's own coefficients merely seed the slab means.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskvec.compose import Composer
from taskvec.io import CheckpointError, PathLike, atomic_save_safetensors, load_state_dict, read_safetensors_metadata
from taskvec.variational.inference import InferenceConfig, InferenceNetwork
from taskvec.variational.persample import AutoRunner, LinearRunner, UnsupportedModuleError, VmapRunner, make_runner
from taskvec.variational.prior import (
    SpikeSlab,
    check_prior,
    gate,
    gated_coefficients,
    kl_warmup,
    sample_coefficients,
    spike_slab_kl,
)

FORMAT = "taskvec-variational/1"
METHODS = ("auto", "vmap", "linear")


@dataclass
class VariationalConfig:
    """Everything about the variational composer except the bank: network, prior, sampling, gate.

    ``method`` picks the per-sample executor: ``vmap`` (generic; ``chunk_size`` samples' composed
    weights at a time; 8 measured faster than 32 on CPU), ``linear`` (forward hooks, no per-sample
    weights, refuses unsupported modules) or ``auto`` (vmap, the faster on CPU in
    ``benchmarks/variational_speed.py``).
    """

    hidden: tuple[int, ...] = (256,)
    activation: str = "gelu"
    normalize_input: bool = True
    init_std: float = 0.1
    prior_pi: float = 0.5
    prior_std: float = 1.0
    temperature: float = 2.0 / 3.0
    p_threshold: float = field(default=0.5, metadata={"help": "gate: minimum inclusion probability"})
    uncertainty_threshold: float = field(default=1.0, metadata={"help": "gate: maximum sigma/|mu| (inf disables)"})
    method: str = field(default="auto", metadata={
        "help": "per-sample executor for training and test (linear: forward hooks, the fast one on text "
                "encoders)", "choices": ("auto", "vmap", "linear")})
    chunk_size: int | None = 8
    log_var_min: float = -20.0
    log_var_max: float = 8.0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        check_prior(self.prior_pi, self.prior_std)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.p_threshold <= 1.0:
            raise ValueError(f"p_threshold must lie in [0, 1], got {self.p_threshold}")
        if not self.uncertainty_threshold >= 0.0:
            raise ValueError(f"uncertainty_threshold must be >= 0 (inf disables it), got {self.uncertainty_threshold}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")

    def inference_config(self, in_features: int, n_vectors: int, n_columns: int) -> InferenceConfig:
        return InferenceConfig(
            in_features=in_features,
            n_vectors=n_vectors,
            n_columns=n_columns,
            hidden=self.hidden,
            activation=self.activation,
            normalize_input=self.normalize_input,
            init_std=self.init_std,
            prior_pi=self.prior_pi,
            log_var_min=self.log_var_min,
            log_var_max=self.log_var_max,
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        # JSON has no infinity; keep it readable and loadable.
        data["uncertainty_threshold"] = repr(float(self.uncertainty_threshold))
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VariationalConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"variational config has unknown fields {unknown}")
        data["uncertainty_threshold"] = float(data["uncertainty_threshold"])
        return cls(**data)


class VariationalComposer(nn.Module):
    """Sample-specific composition theta_0 + sum_i (z_i * lambda_i(x)) tau_i with q(Lambda, z | x).

    ``forward(x, features=None, sample=None)`` returns what the base network returns (features or
    logits). ``sample=None`` means: sample when training, gate when evaluating; ``sample=True`` draws a
    reparameterised (relaxed) sample, ``sample=False`` uses the deterministic gate. ``features``
    (B, D) skips the feature extractor (precomputed pre-trained features).
    """

    def __init__(
        self,
        composer: Composer,
        *,
        feature_extractor: nn.Module | None = None,
        feature_dim: int | None = None,
        config: VariationalConfig | None = None,
        mu_init: float | Tensor | None = None,
        inference: InferenceNetwork | None = None,
    ) -> None:
        super().__init__()
        self.config = config or VariationalConfig()
        self.composer = composer
        # The composer's coefficients are not used by per-sample composition; freeze them so that only
        # the inference network trains (they remain the default slab mean).
        composer.coefficients.requires_grad_(False)
        if feature_extractor is not None:
            feature_extractor.requires_grad_(False)
            self.feature_extractor: nn.Module | None = feature_extractor.eval()
        else:
            self.feature_extractor = None
        n, columns = composer.num_vectors, composer.layout.num_columns
        if inference is None:
            extractor = feature_extractor if feature_extractor is not None else composer.base
            dim = feature_dim or getattr(extractor, "feature_dim", None)
            if not isinstance(dim, int) or dim < 1:
                raise ValueError(
                    f"cannot tell the feature width of {type(extractor).__name__} (feature_dim={dim!r}); "
                    "pass feature_dim= the size of its (B, D) output"
                )
            start = composer.coefficients.detach() if mu_init is None else mu_init
            inference = InferenceNetwork(self.config.inference_config(dim, n, columns), start)
        elif inference.shape != (n, columns):
            raise ValueError(
                f"inference network outputs {inference.shape} (vectors, columns); the composer has ({n}, {columns})"
            )
        self.inference = inference
        self._runner: VmapRunner | LinearRunner | AutoRunner | None = None
        self._runner_key: tuple[str, int | None] | None = None
        self._checked = False

    # -- pieces ----------------------------------------------------------------------------------

    @property
    def vector_names(self) -> list[str]:
        return self.composer.vector_names

    @property
    def column_labels(self) -> list[str]:
        """What each coefficient column covers (block names under ``block`` granularity)."""
        return list(self.composer.layout.labels)

    def train(self, mode: bool = True) -> VariationalComposer:
        super().train(mode)
        if self.feature_extractor is not None:
            self.feature_extractor.eval()
        self.composer.train(mode)
        return self

    def features(self, x: Tensor) -> Tensor:
        """Frozen pre-trained features f(x) (B, D), without gradient."""
        extractor = self.feature_extractor if self.feature_extractor is not None else self.composer.base
        with torch.no_grad():
            out = extractor(x)
        if not isinstance(out, Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"feature extractor {type(extractor).__name__} returned {shape}; expected (B, D)")
        return out

    def posterior(self, x: Tensor | None = None, features: Tensor | None = None) -> SpikeSlab:
        """q(Lambda, z | x) parameters, each (B, n_vectors, n_columns)."""
        if features is None:
            if x is None:
                raise ValueError("posterior needs inputs x or precomputed features")
            features = self.features(x)
        elif x is not None and features.shape[0] != x.shape[0]:
            raise ValueError(f"features have batch {features.shape[0]} but inputs have batch {x.shape[0]}")
        return self.inference(features)

    def gated(self, posterior: SpikeSlab) -> Tensor:
        """Deterministic coefficients: mu where p >= p_threshold and sigma/|mu| <= uncertainty_threshold."""
        return gated_coefficients(posterior, self.config.p_threshold, self.config.uncertainty_threshold)

    def coefficients(self, posterior: SpikeSlab, sample: bool, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample coefficients (B, n, C): a relaxed sample, or the gated means."""
        if sample:
            return sample_coefficients(posterior, self.config.temperature, generator)
        return self.gated(posterior)

    # -- per-sample execution --------------------------------------------------------------------

    def runner(self) -> VmapRunner | LinearRunner | AutoRunner:
        """The per-sample executor for ``config.method`` (rebuilt when the method or chunk changes)."""
        key = (self.config.method, self.config.chunk_size)
        if self._runner is None or self._runner_key != key:
            self._runner = make_runner(self.composer, self.config.method, self.config.chunk_size)
            self._runner_key = key
            self._checked = False
        return self._runner

    def compose(self, x: Tensor, coefficients: Tensor) -> Tensor:
        """Run the base network on ``x`` with coefficients (B, n, C) per sample, or (n, C) for all."""
        if coefficients.dim() == 2:
            return self.composer(x, coefficients=coefficients)
        runner = self.runner()
        if isinstance(runner, LinearRunner) and not self._checked:
            self._check_linear(runner, x)
        return runner(x, coefficients)

    @torch.no_grad()
    def _check_linear(self, runner: LinearRunner, x: Tensor) -> None:
        """Once per runner: the hooks must reproduce vmap on two samples with random coefficients.

        Why: a composed weight used outside its module's forward (a parent reading ``.weight``) escapes
        the hooks silently; this comparison catches it before any result depends on it.
        """
        probe = x[:2]
        n, columns = self.composer.num_vectors, self.composer.layout.num_columns
        generator = torch.Generator().manual_seed(0)
        coefficients = torch.randn(probe.shape[0], n, columns, generator=generator).to(x.device)
        reference = VmapRunner(self.composer, None)(probe, coefficients)
        got = runner(probe, coefficients)
        error = float((got - reference).abs().max())
        scale = float(reference.abs().max()) + 1.0
        if not error <= 1e-4 * scale:
            raise UnsupportedModuleError(
                f"the linearity runner disagrees with vmap by {error:.3g} (scale {scale:.3g}) on "
                f"{type(self.composer.base).__name__}: some composed block is used outside its module's "
                "forward. Use method='vmap'."
            )
        self._checked = True

    # -- forward ---------------------------------------------------------------------------------

    def forward_with_posterior(
        self, x: Tensor, features: Tensor | None = None, sample: bool | None = None
    ) -> tuple[Tensor, SpikeSlab]:
        """The output and the posterior it was drawn from (the ELBO needs both)."""
        posterior = self.posterior(x, features)
        sample = self.training if sample is None else sample
        return self.compose(x, self.coefficients(posterior, sample)), posterior

    def forward(self, x: Tensor, features: Tensor | None = None, sample: bool | None = None) -> Tensor:
        return self.forward_with_posterior(x, features, sample)[0]

    # -- reports ---------------------------------------------------------------------------------

    @torch.no_grad()
    def kept_fraction(
        self, features: Tensor | None = None, *, x: Tensor | None = None, per_block: bool = False
    ) -> Tensor:
        """Fraction of the batch for which the gate keeps each component.

        (n_vectors, n_columns), labelled by :attr:`column_labels`; with ``per_block`` (n_vectors, n_blocks)
        averaged over each block's columns, labelled by ``composer.block_names`` (differs under layer/xK).
        """
        keep = gate(self.posterior(x, features), self.config.p_threshold, self.config.uncertainty_threshold)
        fraction = keep.to(torch.float32).mean(0)
        return self.composer.layout.block_coefficients(fraction) if per_block else fraction

    # -- persistence -----------------------------------------------------------------------------

    def _identity(self) -> dict[str, str]:
        layout = self.composer.layout
        return {
            "granularity": str(layout.granularity),
            "partition_seed": str(layout.granularity.seed),
            "blocks": json.dumps(layout.block_names),
            "vectors": json.dumps(self.vector_names),
            "vector_fingerprints": json.dumps(self.composer.vector_fingerprints),
            "linearized": str(self.composer.linearized),
            "base_fingerprint": self.composer.base_fingerprint,
        }

    def save(self, path: PathLike, extra: Mapping[str, str] | None = None) -> Path:
        """The inference network and configs as safetensors with metadata (not the bank or the base)."""
        meta = {
            "format": FORMAT,
            "config": self.config.to_json(),
            "inference_config": json.dumps(self.inference.config.to_dict(), sort_keys=True),
            **self._identity(),
        }
        meta.update(extra or {})
        return atomic_save_safetensors(self.inference.state_dict(), path, meta)

    def _check_identity(self, meta: Mapping[str, str], path: PathLike, network: InferenceNetwork) -> None:
        for key, expected in self._identity().items():
            if meta.get(key) != expected:
                shown = meta.get(key, "<absent>")
                raise CheckpointError(f"{path}: {key} {shown[:80]!r} does not match this composer's {expected[:80]!r}")
        if network.shape != self.inference.shape:
            raise CheckpointError(f"{path}: network outputs {network.shape}, composer needs {self.inference.shape}")

    def load_inference(self, path: PathLike) -> None:
        """Load a saved inference network and config, refusing a file made for another bank or layout."""
        network, config, meta = load_inference_network(path)
        self._check_identity(meta, path, network)
        device = next(self.inference.parameters()).device
        self.inference = network.to(device)
        self.config = config

    @classmethod
    def load(
        cls, path: PathLike, composer: Composer, *, feature_extractor: nn.Module | None = None
    ) -> VariationalComposer:
        """Rebuild a variational composer around ``composer`` from a file written by :meth:`save`."""
        network, config, meta = load_inference_network(path)
        model = cls(composer, feature_extractor=feature_extractor, config=config, inference=network)
        model._check_identity(meta, path, network)
        return model


def load_inference_network(path: PathLike) -> tuple[InferenceNetwork, VariationalConfig, dict[str, str]]:
    """An :class:`InferenceNetwork` with its weights, the :class:`VariationalConfig`, and the metadata."""
    meta = read_safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format', '<absent>')!r} is not {FORMAT!r}")
    try:
        config = VariationalConfig.from_json(meta["config"])
        net_config = InferenceConfig(**json.loads(meta["inference_config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable variational config ({err})") from err
    network = InferenceNetwork(net_config)
    state = load_state_dict(path)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored inference config ({err})") from err
    return network, config, meta


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------

Head = Callable[[Tensor], Tensor]
_X_KEYS = ("x", "image", "images", "inputs")
_Y_KEYS = ("y", "label", "labels", "targets")


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x, y, features or None) from ``(x, y)``, ``(x, y, features)`` or a dict with those keys."""
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _X_KEYS if k in batch), None)
        y = next((batch[k] for k in _Y_KEYS if k in batch), None)
        if x is None or y is None:
            raise ValueError(f"batch dict needs an input key {_X_KEYS} and a label key {_Y_KEYS}; got {sorted(batch)}")
        return x, y, batch.get("features")
    if isinstance(batch, tuple | list) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    raise ValueError(
        f"ELBO batch must be (x, y), (x, y, features) or a dict; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
    )


class ELBOLoss:
    """Negative ELBO per sample: CE(head(f(x; theta_0 + sum z lambda tau)), y) + beta(t) * w * KL.

    The default ``kl_normalizer="sample"`` is the exact ELBO for per-sample (local) latents: each
    sample's KL weighs as much as its likelihood, times the explicit ``kl_weight`` (beta, 1 = the ELBO).
    ``"dataset"`` divides the KL by ``num_train`` (a dataset-level regulariser): with per-sample latents
    that shrinks the prior by ``num_train`` and is not the ELBO, so it is opt-in only.
    ``beta`` warms up linearly over ``kl_warmup_steps`` training calls; ``step`` counts them and may be
    set when resuming. ``last`` holds the latest terms for logging.
    """

    def __init__(
        self,
        head: Head | None,
        num_train: int,
        kl_warmup_steps: int,
        *,
        kl_weight: float = 1.0,
        kl_normalizer: str = "sample",
        samples: int = 1,
        label_smoothing: float = 0.0,
    ) -> None:
        if num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {num_train}")
        if kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be >= 0, got {kl_warmup_steps}")
        if kl_normalizer not in ("dataset", "sample"):
            raise ValueError(f"kl_normalizer {kl_normalizer!r} is not 'dataset' or 'sample'")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if not (kl_weight >= 0 and math.isfinite(kl_weight)):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight}")
        self.head = head
        self.num_train = num_train
        self.kl_warmup_steps = kl_warmup_steps
        self.kl_weight = kl_weight
        self.kl_normalizer = kl_normalizer
        self.samples = samples
        self.label_smoothing = label_smoothing
        self.step = 0
        self.last: dict[str, float] = {}

    def beta(self) -> float:
        return kl_warmup(self.step, self.kl_warmup_steps)

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to continue exactly: the warm-up step counter."""
        return {"step": int(self.step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "step" not in state or not isinstance(state["step"], int) or state["step"] < 0:
            raise ValueError(f"ELBOLoss state needs a non-negative integer 'step', got {dict(state)!r}")
        self.step = int(state["step"])

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        x, y, features = _unpack(batch)
        return self._negative_elbo(model, x, features, [(y, self.head)])

    def _negative_elbo(
        self, model: nn.Module, x: Tensor, features: Tensor | None, parts: Sequence[tuple[Tensor, Head | None]]
    ) -> Tensor:
        """``parts`` cut the batch in order: (labels, head) per consecutive slice of ``x``; each part
        contributes its mean per-sample ELBO (cross-entropy + beta * KL), and the parts add up (aTLAS's
        multi-task sum)."""
        if not isinstance(model, VariationalComposer):
            raise TypeError(f"the ELBO objective needs a VariationalComposer, got {type(model).__name__}")
        if features is None:
            features = model.features(x)
        labels = [y for y, _ in parts]
        if self.samples > 1:
            x, features = (t.repeat_interleave(self.samples, 0) for t in (x, features))
            labels = [y.repeat_interleave(self.samples, 0) for y in labels]
        output, posterior = model.forward_with_posterior(x, features, sample=True)
        nll = output.new_zeros(())
        for piece, y, (_, head) in zip(output.split([len(y) for y in labels]), labels, parts, strict=True):
            logits = head(piece) if head is not None else piece
            nll = nll + F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        per_sample_kl = spike_slab_kl(*posterior, model.config.prior_pi, model.config.prior_std).flatten(1).sum(1)
        # Each part is its own task's per-sample ELBO, mean over its samples; the parts add up like the CEs.
        kl = sum(piece.mean() for piece in per_sample_kl.split([len(y) for y in labels]))
        scale = self.kl_weight / (self.num_train if self.kl_normalizer == "dataset" else 1)
        beta = self.beta()
        loss = nll + (beta * scale) * kl
        self.last = {"loss": float(loss.detach()), "nll": float(nll.detach()), "kl": float(kl.detach()), "beta": beta}
        if model.training:
            self.step += 1
        return loss


class MultitaskELBOLoss(ELBOLoss):
    """The ELBO over a batch of several tasks, each through its own frozen head.

    Batches are lists with one ``(x, y)`` part per task, in the order of ``heads`` (what
    :func:`taskvec.recipes.addition.mixed_loader` yields). All parts go through the variational
    composer as one batch; the cross-entropies add up over tasks as in aTLAS's multi-task objective,
    and ``num_train`` is the number of training images over all tasks.
    """

    def __init__(self, heads: Sequence[Head], num_train: int, kl_warmup_steps: int, **options: Any) -> None:
        super().__init__(None, num_train, kl_warmup_steps, **options)
        if not heads:
            raise ValueError("MultitaskELBOLoss needs at least one head")
        self.heads = list(heads)

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        if not isinstance(batch, list | tuple) or len(batch) != len(self.heads):
            got = f"{len(batch)} parts" if isinstance(batch, list | tuple) else type(batch).__name__
            raise ValueError(f"multi-task ELBO batch must be one (x, y) part per head ({len(self.heads)}); got {got}")
        unpacked = [_unpack(part) for part in batch]
        if len({tuple(part[0].shape[1:]) for part in unpacked}) > 1:
            return self._part_by_part(model, unpacked)
        x = torch.cat([part[0] for part in unpacked])
        features = None
        if all(part[2] is not None for part in unpacked):
            features = torch.cat([part[2] for part in unpacked])
        return self._negative_elbo(model, x, features, [(part[1], head) for part, head in
                                                         zip(unpacked, self.heads, strict=True)])


    def _part_by_part(self, model: nn.Module, unpacked: Sequence[tuple[Tensor, Tensor, Tensor | None]]) -> Tensor:
        """The same sum, one forward pass per part: inputs that cannot share a batch (token batches
        padded to different lengths). The warm-up step advances once per call, as in one pass."""
        step, total, terms = self.step, None, {"loss": 0.0, "nll": 0.0, "kl": 0.0}
        for (x, y, features), head in zip(unpacked, self.heads, strict=True):
            self.step = step
            term = self._negative_elbo(model, x, features, [(y, head)])
            total = term if total is None else total + term
            for key in terms:
                terms[key] += self.last[key]
        self.last = {**terms, "beta": self.last["beta"]}
        assert total is not None
        return total


def elbo_loss(
    head: Head | None,
    num_train: int,
    kl_warmup_steps: int,
    *,
    kl_weight: float = 1.0,
    kl_normalizer: str = "sample",
    samples: int = 1,
    label_smoothing: float = 0.0,
) -> ELBOLoss:
    """An objective for :func:`taskvec.train.fit`: ``loss_fn(model, batch)`` with batches (x, y[, features])."""
    return ELBOLoss(
        head,
        num_train,
        kl_warmup_steps,
        kl_weight=kl_weight,
        kl_normalizer=kl_normalizer,
        samples=samples,
        label_smoothing=label_smoothing,
    )
