"""Tensor-only image transforms: batched, on any device, deterministic under a ``torch.Generator``.

Why not torchvision: it cannot be used with the CPU torch build the project pins. Everything here works
on whole batches: per-sample random parameters are drawn in one call (on the generator's device, so a
CPU generator gives the same augmentation whether the batch sits on CPU or GPU) and applied with one
``affine_grid`` / ``grid_sample`` and a few broadcast ops, never a Python loop over samples.

No transform flips: a flipped digit or letter changes meaning.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from taskvec.data.types import ImageSet

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "augment", "batches", "denormalize", "to_input"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_Stats = Sequence[float]


def _stat(v: _Stats, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def to_input(
    images_uint8: torch.Tensor, resolution: int, mean: _Stats = IMAGENET_MEAN, std: _Stats = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float (N, 3, R, R): gray repeated to RGB, bilinear antialiased resize.

    A floating input is taken as already scaled to [0, 1].
    """
    x = images_uint8
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_input expects (N, C, H, W) images with C in {{1, 3}}, got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    elif x.is_floating_point():
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    else:
        raise TypeError(f"to_input expects uint8 or floating images, got {x.dtype}")
    if x.shape[-2:] != (resolution, resolution):
        # resize before the gray->RGB repeat: a third of the work for grayscale sets
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - _stat(mean, x)) / _stat(std, x)


def denormalize(x: torch.Tensor, mean: _Stats = IMAGENET_MEAN, std: _Stats = IMAGENET_STD) -> torch.Tensor:
    """Inverse of the normalisation in :func:`to_input` (values back in [0, 1] space)."""
    return x * _stat(std, x) + _stat(mean, x)


def _gray(y: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of an RGB batch; a 1-channel batch is its own luma."""
    if y.shape[1] != 3:
        return y
    return 0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)


_STRENGTHS = {
    # crop area range, translation (fraction of the image side), colour jitter, erase probability
    "weak": {"scale": (0.8, 1.0), "shift": 0.0625, "jitter": 0.0, "gray_p": 0.0, "erase_p": 0.0},
    "strong": {"scale": (0.5, 1.0), "shift": 0.0625, "jitter": 0.4, "gray_p": 0.2, "erase_p": 0.5},
}


def augment(
    x: torch.Tensor,
    generator: torch.Generator | None,
    strength: str = "weak",
    *,
    mean: _Stats = IMAGENET_MEAN,
    std: _Stats = IMAGENET_STD,
) -> torch.Tensor:
    """Random per-sample augmentation of a normalised float batch (N, C, H, W); returns a new tensor.

    ``weak``: random resized crop (area 0.8-1, aspect 3/4-4/3) and a small translation (up to 1/16 of
    the side). ``strong`` (FixMatch/UFM and SimCLR views): crop with area 0.5-1 and translation, colour
    jitter (brightness, contrast, saturation +-40%, grayscale with p=0.2), random erasing with p=0.5.
    Never flips. The same generator state gives the same output on any device.
    """
    if strength not in _STRENGTHS:
        raise ValueError(f"augment strength must be one of {sorted(_STRENGTHS)}, got {strength!r}")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augment expects a float (N, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")
    cfg = _STRENGTHS[strength]
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    dev, dt = x.device, x.dtype

    def u(lo: float, hi: float) -> torch.Tensor:
        return _uniform(n, lo, hi, generator).to(device=dev, dtype=dt)

    # --- random resized crop + translation, as one affine map of the sampling grid
    area = u(*cfg["scale"])
    log_r = u(math.log(3 / 4), math.log(4 / 3))
    sx = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # crop width / image width
    sy = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (1 - sx) * u(-1.0, 1.0) + 2 * cfg["shift"] * u(-1.0, 1.0)  # grid coords span [-1, 1]
    cy = (1 - sy) * u(-1.0, 1.0) + 2 * cfg["shift"] * u(-1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if strength == "weak":
        return out

    # --- colour jitter in [0, 1] space
    j = cfg["jitter"]
    bright, contrast, sat = u(1 - j, 1 + j), u(1 - j, 1 + j), u(1 - j, 1 + j)
    to_gray = u(0.0, 1.0) < cfg["gray_p"]
    sat = torch.where(to_gray, torch.zeros_like(sat), sat)
    y = denormalize(out, mean, std) * bright.view(-1, 1, 1, 1)
    m = _gray(y.clamp(0, 1)).mean(dim=(1, 2, 3), keepdim=True)
    y = (y - m) * contrast.view(-1, 1, 1, 1) + m
    g = _gray(y)
    y = (y - g) * sat.view(-1, 1, 1, 1) + g
    out = (y.clamp(0, 1) - _stat(mean, y)) / _stat(std, y)

    # --- random erasing: one rectangle per sample, filled with 0 (the mean colour after normalising)
    erase = u(0.0, 1.0) < cfg["erase_p"]
    e_area, e_logr = u(0.02, 0.25), u(math.log(0.3), math.log(1 / 0.3))
    eh = (torch.sqrt(e_area / torch.exp(e_logr)) * h).clamp(1, h)
    ew = (torch.sqrt(e_area * torch.exp(e_logr)) * w).clamp(1, w)
    top, left = u(0.0, 1.0) * (h - eh), u(0.0, 1.0) * (w - ew)
    ys = torch.arange(h, device=dev, dtype=dt).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=dt).view(1, 1, w)
    t, le = top.view(-1, 1, 1), left.view(-1, 1, 1)
    mask = (ys >= t) & (ys < t + eh.view(-1, 1, 1)) & (xs >= le) & (xs < le + ew.view(-1, 1, 1))
    mask &= erase.view(-1, 1, 1)
    return out.masked_fill(mask.unsqueeze(1), 0.0)


def batches(
    images: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    resolution: int,
    drop_last: bool = False,
    device: torch.device | str | None = None,
    mean: _Stats = IMAGENET_MEAN,
    std: _Stats = IMAGENET_STD,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalised float inputs (B, 3, R, R), int64 labels (B,)), converting one batch at a time.

    The uint8 batch moves to ``device`` first (4x less to copy), then is converted there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    if shuffle:
        gdev = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gdev).cpu()
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if idx.numel() == 0:
            break
        im, lab = images.images[idx], images.labels[idx]
        if device is not None:
            im, lab = im.to(device, non_blocking=True), lab.to(device, non_blocking=True)
        yield to_input(im, resolution, mean, std), lab
