"""In-memory containers for image classification data.

Images stay uint8 at native resolution (N, C, H, W) so a whole task fits in a few MB and conversion to
the model's float input happens lazily, per batch (see :mod:`taskvec.data.transforms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImageSet", "Task"]


@dataclass
class ImageSet:
    """One split: uint8 images (N, C, H, W) with C in {1, 3}, and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        im, lab = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] not in (1, 3):
            raise ValueError(
                f"ImageSet.images must be uint8 (N, C, H, W) with C in {{1, 3}}, got {im.dtype} {tuple(im.shape)}"
            )
        if lab.dtype != torch.int64 or lab.dim() != 1 or lab.shape[0] != im.shape[0]:
            raise ValueError(
                f"ImageSet.labels must be int64 (N,) with N={im.shape[0]}, got {lab.dtype} {tuple(lab.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> ImageSet:
        """The samples at ``idx`` (an index or boolean mask tensor), in that order."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(device=self.labels.device, dtype=torch.int64)
        return ImageSet(self.images[idx], self.labels[idx])

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Number of samples per class (length ``num_classes``, or max label + 1)."""
        n = num_classes if num_classes is not None else (int(self.labels.max()) + 1 if len(self) else 0)
        return torch.bincount(self.labels, minlength=n)


@dataclass
class Task:
    """A named classification task: class names and fixed train / val / test splits."""

    name: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        c, h, w = self.train.images.shape[1:]
        return (
            f"Task({self.name!r}, {self.num_classes} classes, {c}x{h}x{w}, "
            f"train={len(self.train)}, val={len(self.val)}, test={len(self.test)})"
        )
