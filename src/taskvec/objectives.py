"""Objectives for learning coefficients: factories of ``loss_fn(model, batch) -> Tensor`` for
:func:`taskvec.train.fit`, and the pure pieces they are made of.

The model (usually a :class:`~taskvec.compose.Composer`) outputs features; a frozen ``head`` maps them
to logits (``head=None`` when the model already outputs logits). Factories freeze the heads they are
given (``requires_grad_(False)``), since only the model's coefficients are learned.

Batch conventions
    supervised: ``(x, y)``; extra trailing items are ignored.
    multi-task: ``(x, y, task)`` with ``task`` a head name, an index into the heads, or a per-sample
    index tensor; or a list of such batches; or a list of ``(x, y)`` aligned with the heads' order; or
    a dict ``{task name: (x, y)}``.
    negation: ``(target_batch, control_batch)``, each ``(x, y)``.
    unlabelled: ``x`` or ``(x, ...)``; augmented views are made inside by the callables given to the
    factory (any ``augment(x) -> x``; close over a generator for reproducible views).
    UFM: ``x`` or ``(x, targets)`` with ``targets`` the trusted pseudo-labels from
    :func:`trusted_targets` (``-1`` for samples outside the trusted set).

Sharpness-aware losses (SAR, :func:`sharpness_aware`) need two passes. Rather than an optimizer with a
closure, the loss function does both: it takes the gradient g of the first-pass loss with respect to
the trainable parameters (``torch.autograd.grad``, so ``.grad`` is untouched), and returns the loss
evaluated through :func:`torch.func.functional_call` at ``theta + rho * g / ||g||`` with the offset
detached. ``loss.backward()`` therefore yields the gradient at the perturbed point while the
parameters themselves never move: any optimizer in ``fit`` applies the SAM update at ``theta``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from taskvec.train import Batch, LossFn

Augment = Callable[[Tensor], Tensor]
NegationBound = Literal["clamp", "uniform", "none"]

__all__ = [
    "cross_entropy",
    "default_trusted_k",
    "entropy",
    "multitask_cross_entropy",
    "negation",
    "nt_xent",
    "sam_perturbation",
    "sar",
    "sharpness_aware",
    "shifted",
    "simclr",
    "softmax_entropy",
    "trusted_set",
    "trusted_targets",
    "ufm",
    "ufm_loss",
    "unlabelled_selection",
]


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------


def _frozen(head: nn.Module | None) -> nn.Module | None:
    if head is not None:
        head.requires_grad_(False)
    return head


def _logits(model: nn.Module, head: nn.Module | None, x: Tensor) -> Tensor:
    features = model(x)
    return features if head is None else head(features)


def _inputs(batch: Batch) -> Tensor:
    """The inputs of an unlabelled batch: ``x`` itself or the first item of a tuple/list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"expected a tensor batch or (x, ...); got {type(batch).__name__}")


def _labelled(batch: Batch, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Sequence) and len(batch) >= 2 and isinstance(batch[0], Tensor):
        return batch[0], batch[1]
    raise TypeError(f"{what}: expected a batch (x, y, ...); got {type(batch).__name__}")


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of ``softmax(logits)`` in nats, shape (N,)."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def _zero(like: Tensor) -> Tensor:
    """A zero loss that still belongs to the graph (``backward`` gives zero gradients)."""
    return like.sum() * 0.0


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad")
    return params


# ----------------------------------------------------------------------------------------------
# Supervised
# ----------------------------------------------------------------------------------------------


def cross_entropy(head: nn.Module | None = None, *, label_smoothing: float = 0.0) -> LossFn:
    """Mean cross-entropy on ``(x, y)`` batches (few-shot, PEFT)."""
    head = _frozen(head)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        x, y = _labelled(batch, "cross_entropy")
        return F.cross_entropy(_logits(model, head, x).float(), y, label_smoothing=label_smoothing)

    return loss_fn


def _task_groups(batch: Batch, names: list[str]) -> list[tuple[int, Tensor, Tensor]]:
    """Normalise every multi-task batch form into ``[(task index, x, y), ...]``."""

    def index_of(task: object) -> int:
        if isinstance(task, str):
            if task not in names:
                raise KeyError(f"task {task!r} has no head; heads: {names}")
            return names.index(task)
        value = int(task)  # type: ignore[call-overload]
        if not 0 <= value < len(names):
            raise IndexError(f"task index {value} out of range for {len(names)} heads")
        return value

    if isinstance(batch, Mapping):
        return [(index_of(name), *_labelled(item, f"task {name!r}")) for name, item in batch.items()]
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        if len(batch) < 3:
            raise TypeError("multitask_cross_entropy: a single batch must be (x, y, task)")
        x, y, task = batch[0], batch[1], batch[2]
        if isinstance(task, Tensor) and task.numel() > 1:
            task = task.to(torch.long)
            groups = []
            for value in torch.unique(task).tolist():
                rows = task == value
                groups.append((index_of(value), x[rows], y[rows]))
            return groups
        return [(index_of(task), x, y)]
    if isinstance(batch, Sequence) and batch:
        groups = []
        for position, item in enumerate(batch):
            if isinstance(item, Sequence) and len(item) >= 3:
                groups.extend(_task_groups(item, names))
            else:
                if len(batch) != len(names):
                    raise ValueError(
                        f"a list of {len(batch)} (x, y) batches must align with the {len(names)} heads; "
                        "or give (x, y, task) items"
                    )
                groups.append((position, *_labelled(item, f"task {names[position]!r}")))
        return groups
    raise TypeError(f"multitask_cross_entropy: cannot read a batch of type {type(batch).__name__}")


def multitask_cross_entropy(heads: Mapping[str, nn.Module]) -> LossFn:
    """Task addition: the sum over tasks present in the batch of each task's mean cross-entropy, each
    through its own head. Inputs of equal shape share one forward pass."""
    if not heads:
        raise ValueError("multitask_cross_entropy: needs at least one head; got none")
    names = list(heads)
    head_list = [_frozen(heads[name]) for name in names]

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        groups = _task_groups(batch, names)
        if len({tuple(x.shape[1:]) for _, x, _ in groups}) == 1 and len(groups) > 1:
            features = model(torch.cat([x for _, x, _ in groups])).split([len(x) for _, x, _ in groups])
        else:
            features = [model(x) for _, x, _ in groups]
        total: Tensor | None = None
        for (task, _, y), feats in zip(groups, features, strict=True):
            head = head_list[task]
            assert head is not None
            term = F.cross_entropy(head(feats).float(), y)
            total = term if total is None else total + term
        assert total is not None
        return total

    return loss_fn


def negation(
    target_head: nn.Module | None,
    control_head: nn.Module | None,
    *,
    bound: NegationBound = "clamp",
    tau: float | None = None,
    control_weight: float = 1.0,
) -> LossFn:
    """Task negation on ``(target_batch, control_batch)``: raise the target loss, keep the control.

    The plain ``-CE(target) + CE(control)`` (aTLAS's code, made safe there by early stopping) is
    unbounded below. ``bound`` picks a bounded target term:

    - ``"clamp"`` (default): ``-mean_i min(CE_i, tau)`` with ``tau = ln C`` by default. A sample
      whose true-class probability is below 1/C is certainly misclassified, so it stops pushing once
      forgotten, and the target term lies in ``[-tau, 0]``.
    - ``"uniform"``: ``+CE(target logits, uniform)``, minimised by a flat target prediction (>= ln C).
    - ``"none"``: the plain negative cross-entropy; stop it early yourself.

    Model selection (lowest target accuracy with control accuracy >= 95% of the base's) belongs to the
    evaluation passed to ``fit``.
    """
    if bound not in ("clamp", "uniform", "none"):
        raise ValueError(f"bound must be 'clamp', 'uniform' or 'none'; got {bound!r}")
    if tau is not None and not tau > 0:
        raise ValueError(f"tau must be positive; got {tau!r}")
    target_head, control_head = _frozen(target_head), _frozen(control_head)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        if not (isinstance(batch, Sequence) and len(batch) == 2):
            raise TypeError("negation: expected a batch (target_batch, control_batch)")
        (xt, yt), (xc, yc) = _labelled(batch[0], "target batch"), _labelled(batch[1], "control batch")
        if xt.shape[1:] == xc.shape[1:]:
            ft, fc = model(torch.cat([xt, xc])).split([len(xt), len(xc)])
        else:
            ft, fc = model(xt), model(xc)
        lt = (ft if target_head is None else target_head(ft)).float()
        lc = (fc if control_head is None else control_head(fc)).float()
        if bound == "clamp":
            limit = tau if tau is not None else math.log(lt.shape[-1])
            target_term = -F.cross_entropy(lt, yt, reduction="none").clamp(max=limit).mean()
        elif bound == "uniform":
            target_term = -lt.log_softmax(-1).mean(-1).mean()
        else:
            target_term = -F.cross_entropy(lt, yt)
        return target_term + control_weight * F.cross_entropy(lc, yc)

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Test-time adaptation: entropy, SAR
# ----------------------------------------------------------------------------------------------


def entropy(head: nn.Module | None = None) -> LossFn:
    """Tent (Wang et al., 2021): mean prediction entropy on unlabelled inputs."""
    head = _frozen(head)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        return softmax_entropy(_logits(model, head, _inputs(batch))).mean()

    return loss_fn


class _Shifted(nn.Module):
    """``model`` called with some parameters replaced by ``param + offset`` (offsets constant)."""

    def __init__(self, model: nn.Module, offsets: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.inner = model
        params = dict(model.named_parameters())
        self._weights = {name: params[name] + offset for name, offset in offsets.items()}

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self._weights, args, kwargs, strict=False)


def sam_perturbation(loss: Tensor, params: Mapping[str, Tensor], rho: float) -> dict[str, Tensor] | None:
    """SAM's ascent step ``rho * g / ||g||`` (global norm over ``params``), detached; ``None`` when the
    gradient is zero or not finite (then there is no direction to perturb in)."""
    names = list(params)
    raw = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, raw, strict=True)]
    norm = torch.sqrt(functools.reduce(operator.add, [g.float().pow(2).sum() for g in grads]))
    if not torch.isfinite(norm) or float(norm) == 0.0:
        return None
    return {n: (g * (rho / (norm + 1e-12))).to(g.dtype) for n, g in zip(names, grads, strict=True)}


def shifted(model: nn.Module, offsets: Mapping[str, Tensor]) -> nn.Module:
    """A view of ``model`` whose named parameters are ``param + offset``; gradients reach ``param``."""
    return _Shifted(model, offsets)


def sharpness_aware(loss_fn: LossFn, rho: float = 0.05) -> LossFn:
    """SAM (Foret et al., 2021) for any objective: returns ``loss_fn`` evaluated at the perturbed point
    ``theta + rho * g / ||g||``; its backward gives the SAM gradient, applied at ``theta``."""
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0; got {rho!r}")

    def wrapped(model: nn.Module, batch: Batch) -> Tensor:
        params = _trainable(model)
        first = loss_fn(model, batch)
        offsets = sam_perturbation(first, params, rho) if rho > 0 else None
        if offsets is None:
            return first
        return loss_fn(shifted(model, offsets), batch)

    return wrapped


def sar(head: nn.Module | None = None, *, e_margin: float | None = None, rho: float = 0.05) -> LossFn:
    """SAR (Niu et al., 2023): sharpness-aware minimisation of the *reliable* entropy.

    First pass: keep samples with entropy below ``e_margin`` (default ``0.4 * ln C``), take their mean
    entropy, and perturb the parameters along its gradient. Second pass at the perturbed point: the
    same samples, filtered again by ``e_margin``, give the returned loss (as the SAR reference code).
    With no reliable sample the loss is a graph-connected zero, so that step changes nothing.
    SAR's model-recovery reset (an entropy moving average below 0.2) is left out: ``fit``'s model
    selection is where a run is rolled back.
    """
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0; got {rho!r}")
    if e_margin is not None and not e_margin > 0:
        raise ValueError(f"e_margin must be positive; got {e_margin!r}")
    head = _frozen(head)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        x = _inputs(batch)
        logits = _logits(model, head, x)
        margin = e_margin if e_margin is not None else 0.4 * math.log(logits.shape[-1])
        first = softmax_entropy(logits)
        reliable = first < margin
        if not bool(reliable.any()):
            return _zero(first)
        loss = first[reliable].mean()
        offsets = sam_perturbation(loss, _trainable(model), rho) if rho > 0 else None
        if offsets is None:
            return loss
        second = softmax_entropy(_logits(shifted(model, offsets), head, x))[reliable]
        still = second < margin
        if not bool(still.any()):
            return _zero(second)
        return second[still].mean()

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Self-supervised: SimCLR
# ----------------------------------------------------------------------------------------------


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR): each of the 2N embeddings must pick its partner view among the other 2N - 1,
    by cosine similarity over ``temperature``."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of one shape; got {tuple(z1.shape)}, {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"nt_xent needs at least 2 samples for negatives; got {n}")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, partner)


def simclr(projection: nn.Module | None, augment: Augment, temperature: float = 0.5) -> LossFn:
    """SimCLR test-time objective: NT-Xent between two augmented views of each input, on the model's
    features passed through ``projection`` (the frozen head, or None for the features themselves)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive; got {temperature!r}")
    projection = _frozen(projection)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        x = _inputs(batch)
        views = torch.cat([augment(x), augment(x)])
        z1, z2 = _logits(model, projection, views).chunk(2)
        return nt_xent(z1, z2, temperature)

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Unsupervised FixMatch (UFM)
# ----------------------------------------------------------------------------------------------


def default_trusted_k(pool_size: int, num_classes: int) -> int:
    """aTLAS's choice: a tenth of the per-class share of the pool, at most 100, at least 1."""
    return max(1, min(pool_size // num_classes // 10, 100))


def trusted_set(logits: Tensor, k_per_class: int) -> tuple[Tensor, Tensor]:
    """The trusted set for UFM: for every class, the ``k_per_class`` pool samples most confidently
    predicted as it (softmax probability of that class, among samples whose prediction it is).

    A class predicted for fewer than k samples is topped up with the not yet chosen samples that give
    it the highest probability (aTLAS ranks every sample by each class's probability), so every
    class gets exactly k and no sample is chosen twice. Returns ``(indices, labels)``, class by class,
    most confident first. Compute it once, before training, from the pre-trained model's logits.
    """
    if logits.dim() != 2:
        raise ValueError(f"trusted_set expects (N, C) logits; got shape {tuple(logits.shape)}")
    n, classes = logits.shape
    if k_per_class < 1:
        raise ValueError(f"k_per_class must be >= 1; got {k_per_class}")
    if k_per_class * classes > n:
        raise ValueError(f"k_per_class={k_per_class} x {classes} classes exceeds the pool of {n} samples")
    probs = logits.detach().float().softmax(-1).cpu()
    predicted = probs.argmax(-1)
    taken = torch.zeros(n, dtype=torch.bool)
    chosen: list[Tensor] = []
    for c in range(classes):
        own = torch.nonzero(predicted == c).flatten()
        own = own[torch.argsort(probs[own, c], descending=True, stable=True)][:k_per_class]
        taken[own] = True
        chosen.append(own)
    for c in range(classes):
        missing = k_per_class - len(chosen[c])
        if missing > 0:
            free = torch.nonzero(~taken).flatten()
            extra = free[torch.argsort(probs[free, c], descending=True, stable=True)][:missing]
            taken[extra] = True
            chosen[c] = torch.cat([chosen[c], extra])
    indices = torch.cat(chosen)
    labels = torch.arange(classes).repeat_interleave(k_per_class)
    return indices, labels


def trusted_targets(logits: Tensor, k_per_class: int) -> Tensor:
    """Per-sample trusted pseudo-labels for the pool (``-1`` outside the trusted set), to be carried in
    UFM batches as ``(x, targets[idx])``."""
    indices, labels = trusted_set(logits, k_per_class)
    targets = torch.full((logits.shape[0],), -1, dtype=torch.long)
    targets[indices] = labels
    return targets


class TrustedTargets:
    """Pseudo-labels of UFM's trusted stream, one per sample of a batch, ``-1`` where a sample is untrusted.

    A type of its own so that a labelled batch ``(x, y)`` can never pass for pseudo-labels: :func:`ufm`
    accepts ``(x, TrustedTargets(...))`` and refuses ``(x, tensor)``.
    """

    def __init__(self, targets: Tensor) -> None:
        if not isinstance(targets, Tensor) or targets.dtype != torch.long or targets.dim() != 1:
            what = getattr(targets, "dtype", type(targets).__name__)
            raise TypeError(f"TrustedTargets wraps a 1-D long tensor (-1 = untrusted); got {what} "
                            f"of shape {tuple(getattr(targets, 'shape', ()))}")
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str) -> TrustedTargets:
        return TrustedTargets(self.targets.to(device))


def ufm_loss(
    weak_logits: Tensor, strong_logits: Tensor, targets: Tensor | None = None, *, threshold: float = 0.99,
    hard: bool = False,
) -> Tensor:
    """UFM loss given both views' logits: the weak view's (detached) prediction is the target of the
    strong view, kept where its confidence exceeds ``threshold``; trusted samples (``targets >= 0``)
    use their fixed pseudo-label and are always kept. ``hard`` uses the argmax instead of the soft
    weak prediction (aTLAS's code uses the soft one). Mean over kept samples; zero when none is kept."""
    target = weak_logits.detach().float().softmax(-1)
    if hard:
        target = F.one_hot(target.argmax(-1), target.shape[-1]).float()
    if targets is not None:
        trusted = targets >= 0
        if bool(trusted.any()):
            target = target.clone()
            target[trusted] = F.one_hot(targets[trusted], target.shape[-1]).float()
    keep = (target.max(-1).values > threshold).float()
    losses = F.cross_entropy(strong_logits.float(), target, reduction="none")
    return (losses * keep).sum() / keep.sum().clamp(min=1.0)


def ufm(
    head: nn.Module | None, weak: Augment, strong: Augment, *, threshold: float = 0.99, hard: bool = False
) -> LossFn:
    """Unsupervised FixMatch as aTLAS: pseudo-labels from the weak view (no gradient) train the strong
    view; the trusted set (:func:`trusted_targets`, carried in the batch) anchors the most confident
    samples per class to the pre-trained model's predictions. Batches: ``x`` or ``(x, TrustedTargets)``;
    a plain ``(x, y)`` is refused, since its labels would be taken as pseudo-labels. aTLAS draws every
    batch from both the untrusted and the trusted stream: :func:`taskvec.batching.unlabelled_loader`."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1); got {threshold!r}")
    head = _frozen(head)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        x = _inputs(batch)
        targets = None
        if isinstance(batch, Sequence) and len(batch) > 1:
            if not isinstance(batch[1], TrustedTargets):
                raise TypeError(f"ufm: the batch's second element is a {type(batch[1]).__name__}, not TrustedTargets; "
                                "a labelled batch (x, y) is refused so labels never pass for pseudo-labels")
            targets = batch[1].targets.to(x.device)
        with torch.no_grad():
            weak_logits = _logits(model, head, weak(x))
        strong_logits = _logits(model, head, strong(x))
        return ufm_loss(weak_logits, strong_logits, targets, threshold=threshold, hard=hard)

    return loss_fn


def unlabelled_selection(loss_fn: LossFn, batches: Callable[[torch.Generator], Iterable[Batch]], seed: int
                         ) -> Callable[[nn.Module], float]:
    """Model selection without labels, as ``fit``'s ``evaluate``: minus the mean objective over one pass of
    ``batches(generator)`` with the generator and torch's global one (augmentations) seeded by ``seed``,
    so every candidate state is scored on the same views."""

    def evaluate(model: nn.Module) -> float:
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            values = [float(loss_fn(model, batch).detach()) for batch in batches(generator)]
        return -sum(values) / len(values)

    return evaluate
