"""Multi-task batches, validation splits and UFM's two-stream batches with their trusted-targets type."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskvec.batching import mixed_loader, split_validation, unlabelled_loader
from taskvec.data import ImageSet, to_input
from taskvec.objectives import TrustedTargets, ufm

NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _marked(n: int, offset: int = 0) -> ImageSet:
    """Images whose first pixel encodes their index, so a batch tells which samples it holds."""
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(offset, offset + n, dtype=torch.uint8)
    return ImageSet(images, torch.arange(offset, offset + n) % 3)


def _index(x: torch.Tensor) -> list[int]:
    return [round(float(v) * 255) for v in (x[:, 0, 0, 0] * 0.5 + 0.5)]


def test_two_stream_batches_pair_each_trusted_sample_with_its_own_pseudo_label():
    pool = _marked(30)
    trusted_index = torch.tensor([2, 9, 17, 25])
    pseudo = torch.tensor([1, 0, 2, 1])
    loader = unlabelled_loader(pool.images, 4, NORM, 6, (trusted_index, pseudo))
    expected = dict(zip(trusted_index.tolist(), pseudo.tolist(), strict=True))
    untrusted_seen = []
    for x, wrapped in loader.epoch(torch.Generator().manual_seed(3)):
        assert isinstance(wrapped, TrustedTargets)
        idx = _index(x)
        for i, target in zip(idx, wrapped.targets.tolist(), strict=True):
            if target >= 0:
                assert expected[i] == target  # the pseudo-label of that very sample
            else:
                assert i not in expected
                untrusted_seen.append(i)
    assert sorted(untrusted_seen) == [i for i in range(30) if i not in expected]  # one pass over the untrusted


def test_ufm_refuses_a_labelled_batch():
    head = nn.Linear(48, 3)
    loss_fn = ufm(head, lambda v: v, lambda v: v, threshold=0.5)
    model = nn.Flatten()
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(TypeError, match="TrustedTargets"):
        loss_fn(model, (x, torch.tensor([0, 1, 2, 0])))
    value = loss_fn(model, (x, TrustedTargets(torch.tensor([-1, 1, -1, 0]))))
    assert value.ndim == 0 and torch.isfinite(value)
    with pytest.raises(TypeError, match="1-D long"):
        TrustedTargets(torch.tensor([0.5, 1.0]))


def test_mixed_loader_takes_every_part_in_every_batch():
    parts = [_marked(10), _marked(5, offset=100)]
    loader = mixed_loader(parts, [3, 2], 4, NORM)
    assert len(loader) == 3  # the part with the fewest batches: min(ceil(10 / 3), ceil(5 / 2))
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == len(loader)
    for (x0, y0), (x1, y1) in batches:
        assert x0.shape[0] == 3 and x1.shape[0] == 2
        assert all(i < 10 for i in _index(x0)) and all(100 <= i < 105 for i in _index(x1))
        assert torch.equal(y0, torch.tensor(_index(x0)) % 3)  # labels stay with their images
    unlabelled = list(mixed_loader(parts, 2, 4, NORM, labels=False).epoch(torch.Generator()))
    assert all(isinstance(b[0], torch.Tensor) and b[0].dim() == 4 for b in unlabelled)


def test_split_validation_is_disjoint_and_seeded():
    val = _marked(40)
    select, fit = split_validation(val, 10, 20, seed=1, name="a")
    a, b = set(_index(to_input(select.images, 4, **NORM))), set(_index(to_input(fit.images, 4, **NORM)))
    assert len(a) == 10 and len(b) == 20 and not a & b
    again, _ = split_validation(val, 10, 20, seed=1, name="a")
    other, _ = split_validation(val, 10, 20, seed=1, name="b")
    assert torch.equal(again.images, select.images) and not torch.equal(other.images, select.images)
    with pytest.raises(ValueError, match="cannot hold out"):
        split_validation(val, 40, 1, seed=0)
