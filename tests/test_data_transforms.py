"""Tensor transforms: shapes, normalisation, determinism under a generator, no flips, lazy batches."""

from __future__ import annotations

import pytest
import torch

from taskvec.data import IMAGENET_MEAN, IMAGENET_STD, ImageSet, augment, batches, denormalize, to_input

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_input_grayscale_normalisation():
    ims = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    ims[1], ims[2] = 255, 128
    x = to_input(ims, 28)
    assert x.shape == (3, 3, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], ((0 - MEAN) / STD)[0].expand(3, 28, 28))
    assert torch.allclose(x[1], ((1 - MEAN) / STD)[0].expand(3, 28, 28))
    assert torch.allclose(denormalize(x)[2], torch.full((3, 28, 28), 128 / 255), atol=1e-6)


def test_to_input_resizes_rgb_and_keeps_constants():
    ims = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    ims[1] = 77
    x = to_input(ims, 32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[1], torch.full_like(x[1], 77 / 255), atol=1e-6)
    # antialiased downsampling averages: a 2x2 checkerboard becomes flat grey
    board = ((torch.arange(64).view(1, -1) + torch.arange(64).view(-1, 1)) % 2 * 255).to(torch.uint8)
    y = to_input(board.expand(1, 1, 64, 64), 32, mean=(0, 0, 0), std=(1, 1, 1))
    assert (y - 0.5).abs().max() < 0.02


def test_to_input_rejects_bad_input():
    with pytest.raises(ValueError, match="C in"):
        to_input(torch.zeros(1, 4, 8, 8, dtype=torch.uint8), 8)
    with pytest.raises(TypeError, match="int32"):
        to_input(torch.zeros(1, 1, 8, 8, dtype=torch.int32), 8)


@pytest.mark.parametrize("strength", ["weak", "strong"])
def test_augment_deterministic_shapes_and_per_sample(strength):
    x = to_input(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), 32)
    x[1] = x[0]
    a = augment(x, _gen(0), strength)
    b = augment(x, _gen(0), strength)
    c = augment(x, _gen(1), strength)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # per-sample random parameters
    assert not torch.equal(x, a)  # the input is not modified in place
    assert torch.equal(x[0], x[1])


def test_augment_weak_is_mild_and_never_flips():
    """Left half bright, right half dark, top bright, bottom dark: must stay so after weak augmentation."""
    img = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    img[..., :, :16] = 200
    img[..., :16, :] += 50
    x = to_input(img, 32)
    a = augment(x, _gen(3), "weak")
    left, right = a[..., :, :16].mean(dim=(1, 2, 3)), a[..., :, 16:].mean(dim=(1, 2, 3))
    top, bottom = a[..., :16, :].mean(dim=(1, 2, 3)), a[..., 16:, :].mean(dim=(1, 2, 3))
    assert (left > right + 1).all() and (top > bottom).all()
    assert (a - x).abs().mean() < 0.6  # a crop of >= 80 % area, not a different image


def test_augment_strong_erases_and_jitters():
    x = to_input(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), 32)
    a = augment(x, _gen(5), "strong")
    erased = (a == 0).all(dim=1).flatten(1).float().mean(1) > 0.01
    assert 10 < int(erased.sum()) < 54  # about half of the samples get an erased box
    assert (denormalize(a) >= -1e-5).all() and (denormalize(a) <= 1 + 1e-5).all()


def test_augment_rejects_bad_args():
    with pytest.raises(ValueError, match="strength"):
        augment(torch.zeros(1, 3, 4, 4), None, "medium")
    with pytest.raises(ValueError, match="float"):
        augment(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), None)
    assert augment(torch.zeros(0, 3, 4, 4), None).shape == (0, 3, 4, 4)


def test_batches_cover_once_and_convert_lazily():
    ims = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 8, 8).contiguous()
    s = ImageSet(ims, torch.arange(10))
    out = list(batches(s, 4, shuffle=True, generator=_gen(0), resolution=16))
    assert [x.shape for x, _ in out] == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]
    labels = torch.cat([y for _, y in out])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
    for x, y in out:  # each input still belongs to its label
        assert torch.allclose(denormalize(x)[:, 0, 0, 0], y.float() / 255, atol=1e-6)
    again = torch.cat([y for _, y in batches(s, 4, shuffle=True, generator=_gen(0), resolution=16)])
    assert torch.equal(again, labels)
    plain = [y.tolist() for _, y in batches(s, 4, shuffle=False, generator=None, resolution=8, drop_last=True)]
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7]]
