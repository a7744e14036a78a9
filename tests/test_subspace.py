"""Random bases for the intrinsic-dimension experiment: same block norms, seeded, and spans as expected."""

from __future__ import annotations

import pytest
import torch

from taskvec.compose import Composer
from taskvec.subspace import block_norms, gram, project, random_bases
from taskvec.vectors import LoraTaskVector, TaskVector, parameter_blocks


def test_block_norms_match_templates(bank):
    bases = random_bases(bank, seed=3)
    assert len(bases) == len(bank)
    for template, basis in zip(bank, bases, strict=True):
        assert basis.names == template.names
        for name in template.names:
            expected = float(template[name].double().norm())
            assert float(basis[name].double().norm()) == pytest.approx(expected, rel=1e-5)
            assert not torch.allclose(basis[name], template[name])
        assert block_norms(basis) == pytest.approx(block_norms(template), rel=1e-5)


def test_seeding_and_count(bank):
    a, b = random_bases(bank, seed=1), random_bases(bank, seed=1)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x.names)
    other = random_bases(bank, seed=2)
    assert not torch.equal(a[0]["fc.weight"], other[0]["fc.weight"])
    more = random_bases(bank, count=7, seed=1)
    assert len(more) == 7
    assert all(torch.equal(more[k][n], a[k][n]) for k in range(3) for n in a[k].names)  # prefix-stable
    assert block_norms(more[4]) == pytest.approx(block_norms(bank[1]), rel=1e-5)  # cycles the templates
    assert not torch.equal(more[4]["fc.weight"], more[1]["fc.weight"])


def test_random_bases_span_full_dimension_and_are_near_orthogonal(base, bank):
    bases = random_bases(bank, count=6, seed=0)
    g = gram(bases)
    assert torch.linalg.matrix_rank(g) == 6
    norms = g.diagonal().sqrt()
    cosine = g / norms[:, None] / norms[None, :]
    off = cosine - torch.eye(6, dtype=cosine.dtype)
    assert off.abs().max() < 0.25  # ~ 1/sqrt(numel) for independent Gaussian directions
    Composer(base, bases)  # they carry the base fingerprint of their templates


def test_project_recovers_span_coefficients(bank):
    bases = random_bases(bank, count=3, seed=5)
    coefficients = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    inside = TaskVector({name: sum(float(c) * b[name] for c, b in zip(coefficients, bases, strict=True))
                         for name in bank[0].names}, metadata={"name": "inside"})
    found, residual = project(inside, bases)
    assert torch.allclose(found, coefficients, atol=1e-4) and residual < 1e-5
    # add a component orthogonal to the span: coefficients unchanged, residual = its relative size
    found_t, _ = project(bank[0], bases)
    ortho = {name: bank[0][name].double() - sum(float(c) * b[name].double() for c, b in zip(found_t, bases,
                                                                                             strict=True))
             for name in bank[0].names}
    mixed = TaskVector({name: inside[name].double() + ortho[name] for name in ortho}, metadata={"name": "mixed"})
    found_m, residual_m = project(mixed, bases)
    ortho_norm = sum(float(t.norm() ** 2) for t in ortho.values()) ** 0.5
    mixed_norm = sum(float(t.norm() ** 2) for t in mixed.tensors.values()) ** 0.5
    assert torch.allclose(found_m, coefficients, atol=1e-4)
    assert residual_m == pytest.approx(ortho_norm / mixed_norm, rel=1e-4)
    # the task vectors themselves lie in their own span
    assert project(bank[1], bank)[1] < 1e-6


def test_lora_templates_give_dense_bases(base):
    blocks = parameter_blocks(base)
    shape = blocks["fc.weight"].shape
    g = torch.Generator().manual_seed(0)
    lora = LoraTaskVector({"fc.weight": (torch.randn(1, shape[1], generator=g), torch.randn(shape[0], 1, generator=g))},
                          {"fc.weight": shape}, 0.5, metadata={"name": "l"})
    (basis,) = random_bases([lora])
    assert basis.names == ["fc.weight"]
    assert float(basis["fc.weight"].norm()) == pytest.approx(float(lora.dense_block("fc.weight").norm()), rel=1e-5)
    assert torch.linalg.matrix_rank(basis["fc.weight"]) > 1  # a random direction, not rank-1 like the adapter
    with pytest.raises(ValueError, match="at least one template"):
        random_bases([])
