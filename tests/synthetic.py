"""Small in-memory image tasks for end-to-end tests: class-dependent patterns plus noise, seeded."""

from __future__ import annotations

import torch

from taskvec.bank import Bank
from taskvec.data import ImageSet, Task

CLASSES = 4


def _images(task_seed: int, labels: torch.Tensor, generator: torch.Generator, size: int = 12) -> torch.Tensor:
    """Each class is a fixed random template per task; samples add noise."""
    templates = torch.rand(CLASSES, 3, size, size, generator=torch.Generator().manual_seed(task_seed)) * 255
    noise = torch.randn(len(labels), 3, size, size, generator=generator) * 90
    return (templates[labels] + noise).clamp(0, 255).to(torch.uint8)


def make_task(name: str, *, seed: int = 0, train: int = 48, val: int = 24, test: int = 40) -> Task:
    """A 4-class task; ``name`` picks the templates, ``seed`` the samples."""
    task_seed = sum(ord(c) for c in name)
    generator = torch.Generator().manual_seed(task_seed * 31 + seed)
    splits = []
    for n in (train, val, test):
        labels = torch.arange(n) % CLASSES
        splits.append(ImageSet(_images(task_seed, labels, generator), labels))
    return Task(name, [f"c{i}" for i in range(CLASSES)], *splits)


def loader(name: str, *, seed: int = 0) -> Task:
    return make_task(name, seed=seed)


def relabelled_loader(name: str, *, seed: int = 0) -> Task:
    """The same tasks with every *test* label shifted by one class: a recipe whose selection or
    training read test labels would behave differently on it."""
    task = make_task(name, seed=seed)
    task.test.labels = (task.test.labels + 1) % len(task.classes)
    return task


def built_bank(config, root, tasks) -> Bank:
    """A bank of synthetic tasks under ``root``, built (or reused when already built)."""
    bank = Bank(config, root=root, loader=loader)
    bank.build(tasks, progress=False)
    return bank


def tiny_vit_bank(count: int, scale: float = 0.05):
    """A tiny ViT and ``count`` seeded task vectors over its blocks (positional tokens left out)."""
    import copy

    from taskvec.models import build_backbone
    from taskvec.vectors import TaskVector, parameter_blocks

    vit, _ = build_backbone("tiny_vit", pretrained=False, seed=0)
    blocks = [k for k in parameter_blocks(vit) if k not in ("cls_token", "pos_embed")]
    bank = []
    for i in range(count):
        tuned = copy.deepcopy(vit)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in tuned.named_parameters():
                if name in blocks:
                    param.add_(torch.randn(param.shape, generator=generator) * scale)
        bank.append(TaskVector.from_state_dicts(vit.state_dict(), tuned.state_dict(), names=blocks, name=f"v{i}"))
    return vit, bank, blocks
