"""Predictions and accuracy of a backbone + head on an image split, batch by batch, without gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskvec.data import ImageSet, batches
from taskvec.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def logits(
    model: nn.Module,
    head: nn.Module,
    split: ImageSet,
    resolution: int,
    *,
    batch_size: int = 256,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """Logits of ``head(model(x))`` for every image of ``split`` (in order), on the CPU."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = [
        head(model(x)).float().cpu()
        for x, _ in batches(
            split, batch_size, shuffle=False, generator=None, resolution=resolution, device=device, mean=mean, std=std
        )
    ]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def features(
    model: nn.Module,
    split: ImageSet,
    resolution: int,
    *,
    batch_size: int = 256,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """Backbone features of every image of ``split``: what heads are fitted on."""
    return logits(model, nn.Identity(), split, resolution, batch_size=batch_size, mean=mean, std=std)


def accuracy(
    model: nn.Module, head: nn.Module, split: ImageSet, resolution: int, *, batch_size: int = 256, **norm
) -> float:
    """Top-1 accuracy of ``head(model(x))`` on ``split``."""
    predicted = logits(model, head, split, resolution, batch_size=batch_size, **norm).argmax(-1)
    return float((predicted == split.labels.cpu()).float().mean())


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in ``labels``.

    Why: on imbalanced tasks (WordNet, fortunes, drug reviews: majority class 22-39 %) plain accuracy
    rewards predicting the big class; this weighs every class the same. Classes that occur only in
    ``predicted`` are ignored, as in scikit-learn's ``balanced_accuracy_score``.
    """
    predicted, labels = torch.as_tensor(predicted).flatten().cpu(), torch.as_tensor(labels).flatten().cpu()
    if predicted.shape != labels.shape:
        raise ValueError(f"balanced_accuracy: {predicted.numel()} predictions for {labels.numel()} labels")
    if labels.numel() == 0:
        raise ValueError("balanced_accuracy: no labels")
    classes = torch.unique(labels)
    recalls = [(predicted[labels == c] == c).double().mean() for c in classes]
    return float(torch.stack(recalls).mean())


def score(logits: Tensor, split: ImageSet) -> float:
    """Top-1 accuracy of precomputed logits against a split's labels: the one place a recipe reads
    labels of an evaluation split (selection shots during selection, the test split at the end)."""
    return float((logits.argmax(-1) == split.labels.cpu()).float().mean())


def selection_metric(logits: Tensor, split: ImageSet) -> float:
    """Model selection score on a few selection shots: accuracy, ties broken by lower cross-entropy.

    The tie-break term lies in (0, 1 / (n + 1)), below one sample's worth of accuracy (1 / n), so it
    only orders states of equal accuracy. Without it, a few dozen selection images and a strong head
    make most trained states tie with the untrained start, which then always wins.
    """
    labels = split.labels.cpu()
    loss = float(F.cross_entropy(logits.float(), labels))
    return score(logits, split) + 1.0 / ((len(split) + 1) * (1.0 + loss))


def logit_scores(logits: Tensor, split: ImageSet) -> dict[str, float]:
    """``{"acc", "balanced_acc"}`` of precomputed logits against a split's labels (any split with
    ``labels``), reading them once: the final evaluation of test-time adaptation."""
    labels = split.labels.cpu()
    predicted = logits.argmax(-1)
    return {"acc": float((predicted == labels).float().mean()), "balanced_acc": balanced_accuracy(predicted, labels)}


def prediction_spread(logits: Tensor) -> dict:
    """Label-free collapse check: classes predicted at least once, and the entropy of the mean
    prediction over ln C (1 = every class equally likely on average, 0 = one class)."""
    classes = logits.shape[-1]
    mean = logits.float().softmax(-1).mean(0)
    marginal = float(-(mean * mean.clamp_min(1e-12).log()).sum()) / math.log(classes)
    return {"classes_predicted": int(logits.argmax(-1).unique().numel()), "marginal_entropy": marginal}
