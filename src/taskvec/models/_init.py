"""Seeded construction: identical weights for the same seed, without disturbing the global RNG."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run module construction under ``torch.manual_seed(seed)``, restoring the caller's RNG afterwards.

    Why: tests and benchmarks need the same "pre-trained" random model in every process, and building
    a model must not change the random stream of the code around it. ``seed=None`` uses the global RNG.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
