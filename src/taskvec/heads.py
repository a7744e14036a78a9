"""Classification heads on frozen features: linear probe, nearest prototype, Tip-Adapter, LP++.

A head maps backbone features to logits and stays frozen while task vectors are composed. For a
backbone without a text tower the task's head is a linear probe fitted on the pre-trained features of
its training split (:func:`fit_linear_head`); the few-shot baselines (Tip-Adapter, LP++) adapt on top of
such a head, which plays the part of CLIP's zero-shot classifier.

Everything here runs full-batch on features already extracted (:func:`extract_features`), so fitting
a head is seconds on a CPU, not an epoch loop over images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskvec.io import CheckpointError, PathLike, atomic_save_safetensors, load_state_dict, read_safetensors_metadata

__all__ = [
    "LPPlusPlus",
    "LinearHead",
    "TipAdapter",
    "accuracy",
    "extract_features",
    "fit_linear_head",
    "prototype_head",
    "tip_adapter_search",
]

HEAD_FORMAT = "taskvec-linear-head/1"


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    backbone: nn.Module, batches: Iterable[object], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor | None]:
    """Run ``backbone`` in eval mode without gradients over ``batches`` (``x`` or ``(x, y, ...)``).

    Returns float32 CPU ``(features, labels)``; ``labels`` is None when the batches carry none. The
    backbone's train/eval mode is restored afterwards.
    """
    if device is None:
        first = next(backbone.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    features: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for batch in batches:
            if isinstance(batch, Tensor):
                x, y = batch, None
            elif isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                raise TypeError(f"extract_features: a batch must be x or (x, y, ...); got {type(batch).__name__}")
            features.append(backbone(x.to(device)).float().cpu())
            if y is not None:
                labels.append(torch.as_tensor(y).cpu())
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("extract_features: no batches")
    if labels and len(labels) != len(features):
        raise ValueError("extract_features: some batches carry labels and some do not")
    return torch.cat(features), (torch.cat(labels).long() if labels else None)


def _check_data(features: Tensor, labels: Tensor, num_classes: int | None = None) -> int:
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D); got shape {tuple(features.shape)}")
    if labels.dim() != 1 or len(labels) != len(features):
        raise ValueError(f"labels must be (N,) = ({len(features)},); got shape {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no samples")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices; got {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    classes = num_classes if num_classes is not None else high + 1
    if low < 0 or high >= classes:
        raise ValueError(f"labels span [{low}, {high}], outside [0, {classes}) for num_classes={classes}")
    return classes


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


# ----------------------------------------------------------------------------------------------
# Linear head
# ----------------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """``logits = logit_scale * W f' + b`` with ``f' = f / |f|`` when ``normalize`` (cosine features).

    The scale is fixed, not learned: with free weights a learned temperature only duplicates their
    norm, and weight decay already sets it.
    """

    def __init__(
        self, feature_dim: int, num_classes: int, *, normalize: bool = True, logit_scale: float = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if feature_dim < 1 or num_classes < 1:
            raise ValueError(f"feature_dim and num_classes must be >= 1; got {feature_dim}, {num_classes}")
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.normalize = normalize
        self.logit_scale = float(logit_scale)
        self.linear = nn.Linear(feature_dim, num_classes, bias=bias)

    @classmethod
    def from_weights(
        cls, weight: Tensor, bias: Tensor | None = None, *, normalize: bool = True, logit_scale: float = 1.0
    ) -> LinearHead:
        """A head with the given (C, D) weights (e.g. class prototypes or text embeddings)."""
        head = cls(
            weight.shape[1], weight.shape[0], normalize=normalize, logit_scale=logit_scale, bias=bias is not None
        )
        with torch.no_grad():
            head.linear.weight.copy_(weight)
            if bias is not None:
                head.linear.bias.copy_(bias)
        return head

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    def prepare(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=-1) if self.normalize else features

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.prepare(features)) * self.logit_scale

    def freeze(self) -> LinearHead:
        """No gradients and eval mode: how a head is used while coefficients are learned."""
        self.requires_grad_(False)
        return self.eval()

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, num_classes={self.num_classes}, normalize={self.normalize}, " \
               f"logit_scale={self.logit_scale:g}"

    def save(self, path: PathLike, metadata: dict[str, str] | None = None) -> Path:
        """safetensors with the shape and normalisation in the metadata, so :meth:`load` needs nothing else."""
        meta = {
            "format": HEAD_FORMAT,
            "feature_dim": str(self.feature_dim),
            "num_classes": str(self.num_classes),
            "normalize": str(self.normalize),
            "logit_scale": repr(self.logit_scale),
        }
        meta.update(metadata or {})
        return atomic_save_safetensors(self.state_dict(), path, meta)

    @classmethod
    def load(cls, path: PathLike) -> LinearHead:
        meta = read_safetensors_metadata(path)
        if meta.get("format") != HEAD_FORMAT:
            raise CheckpointError(f"{path}: not a taskvec linear head (format {meta.get('format')!r})")
        tensors = load_state_dict(path)
        try:
            head = cls(
                int(meta["feature_dim"]),
                int(meta["num_classes"]),
                normalize=meta["normalize"] == "True",
                logit_scale=float(meta["logit_scale"]),
                bias="linear.bias" in tensors,
            )
        except KeyError as err:
            raise CheckpointError(f"{path}: metadata lacks the key {err.args[0]!r}") from err
        except ValueError as err:
            raise CheckpointError(f"{path}: malformed metadata ({err})") from err
        try:
            head.load_state_dict(tensors)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: {err}") from err
        return head


def fit_linear_head(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    normalize: bool = True,
    logit_scale: float = 1.0,
    weight_decay: float = 1e-4,
    epochs: int = 100,
    lr: float = 1.0,
    optimizer: Literal["lbfgs", "adam"] = "lbfgs",
) -> LinearHead:
    """A linear probe: mean cross-entropy + ``weight_decay/2 * |W|^2``, full batch, from zero weights.

    ``lbfgs`` (default): ``epochs`` L-BFGS iterations with a strong-Wolfe line search (``lr`` 1 is
    right for it). ``adam``: ``epochs`` full-batch Adam steps at ``lr``. The problem is convex and the
    start fixed, so there is no seed: the result is deterministic. Returns the head frozen.
    """
    _check_data(features, labels, num_classes)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    head = LinearHead(features.shape[1], num_classes, normalize=normalize, logit_scale=logit_scale)
    head.to(features.device)
    nn.init.zeros_(head.linear.weight)
    nn.init.zeros_(head.linear.bias)
    x = head.prepare(features.detach().float())
    y = labels.to(features.device).long()
    params = list(head.parameters())

    def objective() -> Tensor:
        loss = F.cross_entropy(head.linear(x) * logit_scale, y)
        return loss + 0.5 * weight_decay * head.linear.weight.pow(2).sum()

    if optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            params, lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-9, tolerance_change=1e-12,
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)  # type: ignore[arg-type]  # LBFGS takes float(closure()); torch's stub says float
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(epochs):
            opt.zero_grad()
            objective().backward()
            opt.step()
    else:
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam'; got {optimizer!r}")
    return head.freeze()


def prototype_head(
    features: Tensor, labels: Tensor, num_classes: int | None = None, *, logit_scale: float = 10.0
) -> LinearHead:
    """Nearest-centroid head: cosine similarity to each class's mean normalised feature, times
    ``logit_scale`` (a temperature for when the head feeds a cross-entropy). Every class needs a sample."""
    classes = _check_data(features, labels, num_classes)
    unit = F.normalize(features.detach().float(), dim=-1)
    sums = torch.zeros(classes, unit.shape[1], device=unit.device).index_add_(0, labels.to(unit.device), unit)
    counts = torch.bincount(labels.cpu(), minlength=classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"prototype_head: classes {empty[:10]} have no sample")
    prototypes = F.normalize(sums, dim=-1)
    head = LinearHead.from_weights(prototypes, torch.zeros(classes), normalize=True, logit_scale=logit_scale)
    return head.freeze()


# ----------------------------------------------------------------------------------------------
# Tip-Adapter
# ----------------------------------------------------------------------------------------------


class TipAdapter(nn.Module):
    """Tip-Adapter (Zhang et al., ECCV 2022): a training-free key-value cache on top of a frozen head.

    ``logits = base_head(f) + alpha * exp(-beta * (1 - f' K^T)) @ V`` with ``K`` the normalised cache
    features, ``V`` their one-hot labels and ``f'`` the normalised query. ``alpha`` is in the units of
    the base head's logits. ``trainable=True`` makes the keys a parameter (Tip-Adapter-F): train it
    with :func:`taskvec.train.fit` and ``objectives.cross_entropy(None)`` on ``(features, y)`` batches.
    """

    keys: Tensor  # a parameter (Tip-Adapter-F) or a buffer
    values: Tensor

    def __init__(
        self,
        cache_features: Tensor,
        cache_labels: Tensor,
        base_head: nn.Module,
        alpha: float = 1.0,
        beta: float = 5.5,
        *,
        num_classes: int | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        classes = _check_data(cache_features, cache_labels, num_classes)
        self.base_head = base_head.requires_grad_(False)
        keys = F.normalize(cache_features.detach().float(), dim=-1)
        if trainable:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("values", F.one_hot(cache_labels.long(), classes).float())
        self.alpha = float(alpha)
        self.beta = float(beta)

    def cache_logits(self, features: Tensor, beta: float | None = None) -> Tensor:
        beta = self.beta if beta is None else beta
        affinity = F.normalize(features.float(), dim=-1) @ self.keys.T
        return torch.exp(-beta * (1.0 - affinity)) @ self.values

    def forward(self, features: Tensor) -> Tensor:
        base = self.base_head(features)
        if self.alpha == 0:
            return base
        return base + self.alpha * self.cache_logits(features).to(base.dtype)


DEFAULT_TIP_ALPHAS: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
DEFAULT_TIP_BETAS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.5, 5.5, 7.0, 10.0, 20.0)


@torch.no_grad()
def tip_adapter_search(
    cache_features: Tensor,
    cache_labels: Tensor,
    base_head: nn.Module,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    alphas: Sequence[float] = DEFAULT_TIP_ALPHAS,
    betas: Sequence[float] = DEFAULT_TIP_BETAS,
) -> tuple[TipAdapter, list[tuple[float, float, float]]]:
    """Grid-search Tip-Adapter's (alpha, beta) by accuracy on a validation split (never the test set).

    The base logits and the affinities are computed once; returns the best adapter and the table
    ``[(alpha, beta, accuracy), ...]``. The first best wins, so alpha = 0 (the base head) wins ties
    when it is listed first.
    """
    if not alphas or not betas:
        raise ValueError(f"tip_adapter_search: empty grid (alphas={list(alphas)}, betas={list(betas)})")
    base_logits = base_head(val_features)
    adapter = TipAdapter(cache_features, cache_labels, base_head, num_classes=base_logits.shape[-1])
    labels = val_labels.to(base_logits.device)
    table: list[tuple[float, float, float]] = []
    best: tuple[float, float, float] | None = None
    for beta in betas:
        cache = adapter.cache_logits(val_features, float(beta)).to(base_logits.dtype)
        for alpha in alphas:
            score = accuracy(base_logits + alpha * cache, labels)
            table.append((float(alpha), float(beta), score))
            if best is None or score > best[2]:
                best = table[-1]
    assert best is not None
    adapter.alpha, adapter.beta = best[0], best[1]
    return adapter, table


# ----------------------------------------------------------------------------------------------
# LP++
# ----------------------------------------------------------------------------------------------


def _largest_eigenvalue(x: Tensor) -> float:
    """lambda_max(X^T X) from the smaller Gram matrix, with a 0.1% margin for float32 round-off (the
    float64 eigensolver of some CPU builds is a hundred times slower)."""
    x = x.float()
    gram = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    return float(torch.linalg.eigvalsh(gram)[-1]) * 1.001


class LPPlusPlus(nn.Module):
    """LP++ (Huang et al., CVPR 2024): a linear probe blended class by class with the frozen head.

    ``logits_k(f) = w_k . f' + b_k + alpha_k * base_k(f)``: visual weights ``W`` on normalised
    features, and a learnable per-class blending ``alpha`` of the base head's logits (the paper's
    ``alpha_k f . t_k`` with text embeddings t_k; here the task's frozen head plays the text head).
    :meth:`fit` follows the paper's optimisation: full-batch block-coordinate gradient descent on the
    cross-entropy, alternating W (with b) and alpha, each with the implicit step size 1 / L of its
    block's gradient Lipschitz constant, so no learning rate is searched.
    """

    def __init__(self, base_head: nn.Module, feature_dim: int, num_classes: int, *, normalize: bool = True) -> None:
        super().__init__()
        self.base_head = base_head.requires_grad_(False)
        self.normalize = normalize
        self.visual = nn.Linear(feature_dim, num_classes)
        self.alpha = nn.Parameter(torch.ones(num_classes))
        self.train_losses: list[float] = []

    def prepare(self, features: Tensor) -> Tensor:
        return F.normalize(features.float(), dim=-1) if self.normalize else features.float()

    def forward(self, features: Tensor) -> Tensor:
        return self.visual(self.prepare(features)) + self.alpha * self.base_head(features).float()

    @classmethod
    def fit(
        cls,
        features: Tensor,
        labels: Tensor,
        base_head: nn.Module,
        *,
        iterations: int = 300,
        normalize: bool = True,
        alpha_init: float = 1.0,
    ) -> LPPlusPlus:
        """Fit on (few-shot) features; returns the model frozen, with the loss per iteration in
        ``train_losses``.

        Steps: the cross-entropy's Hessian in the logits is bounded by I/2 (Bohning), so with
        ``X = [f', 1]`` the W-block has ``L_W = lambda_max(X^T X) / (2N)`` and the alpha-block, whose
        logits are ``alpha_k z_ik`` with ``z = base_head(f)``, has ``L_alpha = max_k sum_i z_ik^2 / (2N)``.
        Steps of 1/L never increase the loss. Initialisation: W = class means of f' (the paper's
        prototypes), b = 0, alpha = ``alpha_init`` (the paper's data-driven alpha start is tuned to
        CLIP's logit scale of 100, which a generic head does not share).
        """
        with torch.no_grad():
            base_logits = base_head(features).float()
        classes = _check_data(features, labels, base_logits.shape[-1])
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0; got {iterations}")
        model = cls(base_head, features.shape[1], classes, normalize=normalize).to(features.device)
        x = model.prepare(features.detach())
        y = labels.to(x.device).long()
        n = len(x)
        with torch.no_grad():
            sums = torch.zeros(classes, x.shape[1], device=x.device).index_add_(0, y, x)
            counts = torch.bincount(y, minlength=classes).clamp(min=1).to(x.dtype)
            model.visual.weight.copy_(sums / counts[:, None])
            model.visual.bias.zero_()
            model.alpha.fill_(alpha_init)
        with_bias = torch.cat([x, torch.ones(n, 1, device=x.device, dtype=x.dtype)], dim=1)
        step_w = 2.0 * n / max(_largest_eigenvalue(with_bias), 1e-12)
        step_alpha = 2.0 * n / max(float(base_logits.pow(2).sum(0).max()), 1e-12)

        def loss_at() -> Tensor:
            return F.cross_entropy(model.visual(x) + model.alpha * base_logits, y)

        losses = [float(loss_at().detach())]
        for _ in range(iterations):
            w, b = model.visual.weight, model.visual.bias
            grad_w, grad_b = torch.autograd.grad(loss_at(), [w, b])
            with torch.no_grad():
                w.sub_(step_w * grad_w)
                b.sub_(step_w * grad_b)
            (grad_alpha,) = torch.autograd.grad(loss_at(), [model.alpha])
            with torch.no_grad():
                model.alpha.sub_(step_alpha * grad_alpha)
            losses.append(float(loss_at().detach()))
        model.train_losses = losses
        model.requires_grad_(False)
        return model.eval()
