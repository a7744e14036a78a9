from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_base, perturbed
from torch.func import functional_call

from taskvec.compose import Composer
from taskvec.granularity import Granularity, Layout
from taskvec.io import CheckpointError
from taskvec.vectors import LoraTaskVector, TaskVector, parameter_blocks

GRANULARITIES = ["isotropic", "layer", "block", "x3", "x4-random"]


def _random_coefficients(composer: Composer, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        composer.coefficients.copy_(torch.rand(composer.coefficients.shape, generator=generator) - 0.3)


def _element_columns(layout: Layout, name: str) -> torch.Tensor:
    """Independent expansion: which coefficient column scales each element of a block."""
    parts = layout.blocks[name]
    numel = layout.shapes[name].numel()
    if parts.parts == 1:
        return parts.columns.repeat(numel)
    if parts.sizes is not None:
        return torch.cat([torch.full((int(s),), int(c)) for s, c in zip(parts.sizes, parts.columns, strict=True)])
    return parts.columns[parts.index]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradient_is_contraction_with_task_vectors(base, bank, images, granularity):
    composer = Composer(base, bank, granularity)
    _random_coefficients(composer)
    loss = composer(images).logsumexp(-1).sum()
    loss.backward()
    learned = composer.coefficients.grad

    # Independently: gradient of the same loss wrt the composed weights, contracted with each tau.
    coefficients = composer.coefficients.detach()
    layout = composer.layout
    weights = {}
    for name, param in parameter_blocks(base).items():
        columns = _element_columns(layout, name)
        per_element = coefficients[:, columns]  # (n, numel)
        delta = sum(per_element[i] * bank[i][name].reshape(-1) for i in range(len(bank)))
        weights[name] = (param.detach() + delta.reshape(param.shape)).requires_grad_(True)
    reference = functional_call(base, weights, (images,)).logsumexp(-1).sum()
    grads = torch.autograd.grad(reference, list(weights.values()))
    expected = torch.zeros_like(coefficients)
    for (name, _), grad in zip(weights.items(), grads, strict=True):
        columns = _element_columns(layout, name)
        for i in range(len(bank)):
            expected[i].index_add_(0, columns, grad.reshape(-1) * bank[i][name].reshape(-1))
    assert torch.allclose(learned, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_merge_equals_composed_forward(base, bank, images, granularity):
    composer = Composer(base, bank, granularity)
    _random_coefficients(composer, 1)
    merged = composer.merge()
    assert type(merged) is type(base)
    assert not any(name.startswith("_bank") for name, _ in merged.named_buffers())
    with torch.no_grad():
        assert torch.allclose(merged(images), composer(images), atol=1e-5)


def test_block_coefficients_match_task_arithmetic(base, bank, images):
    composer = Composer(base, bank, "block", init=0.4)
    summed = sum(bank).apply_to(base, 0.4)
    with torch.no_grad():
        assert torch.allclose(composer(images), summed(images), atol=1e-5)


def test_caller_models_and_vectors_untouched(base, bank, images):
    state = copy.deepcopy(base.state_dict())
    grads_flags = [p.requires_grad for p in base.parameters()]
    tensors = [{k: v.clone() for k, v in vector.tensors.items()} for vector in bank]
    composer = Composer(base, bank, "block", init=0.5)
    composer(images).sum().backward()
    composer.merge()
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert [p.requires_grad for p in base.parameters()] == grads_flags
    assert all(torch.equal(t[k], v[k]) for t, v in zip(tensors, bank, strict=True) for k in t)
    assert [name for name, p in composer.named_parameters() if p.requires_grad] == ["coefficients"]


def test_partitions_cover_every_block_kind():
    shapes = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "norm.weight": (8,), "tiny": (2,)}
    for partition in ("rows", "random"):
        layout = Layout(shapes, Granularity(kind="block", parts=4, partition=partition))
        assert layout.blocks["conv.bias"].parts == 4
        assert layout.blocks["norm.weight"].parts == 4
        assert layout.blocks["tiny"].parts == 2
        for name in shapes:
            columns = _element_columns(layout, name)
            counts = torch.bincount(columns - layout.blocks[name].columns.min())
            assert counts.sum() == torch.Size(shapes[name]).numel()
            assert (counts > 0).all()
    assert Layout(shapes, "x4").num_columns == 4 + 4 + 4 + 2
    assert Layout(shapes, "layer").labels == ["conv", "norm", ""]


def test_granularity_parse_errors():
    assert str(Granularity.parse("x8-random")) == "x8-random"
    with pytest.raises(ValueError, match="unknown granularity 'blocks'"):
        Granularity.parse("blocks")


def test_lora_vectors_compose_from_factors(base, images):
    blocks = parameter_blocks(base)
    generator = torch.Generator().manual_seed(3)
    loras = []
    for i in range(2):
        factors = {}
        for name in ("conv.weight", "fc.weight"):
            shape = blocks[name].shape
            fan_in = shape[1:].numel()
            factors[name] = (torch.randn(2, fan_in, generator=generator) * 0.1,
                             torch.randn(shape[0], 2, generator=generator) * 0.1)
        shapes = {k: blocks[k].shape for k in factors}
        loras.append(LoraTaskVector(factors, shapes, 0.5 + i, metadata={"name": f"l{i}"}))
    dense_one = TaskVector.from_models(base, perturbed(base, 9), name="dense")
    mixed = [*loras, dense_one]
    reference = [*[lora.to_dense() for lora in loras], dense_one]
    for granularity in ("block", "x2"):
        composer = Composer(base, mixed, granularity, init=0.7, check_base=False)
        dense = Composer(base, reference, granularity, init=0.7, check_base=False)
        _random_coefficients(composer, 5)
        _random_coefficients(dense, 5)
        assert torch.allclose(composer(images), dense(images), atol=1e-5)
        composer(images).sum().backward()
        dense(images).sum().backward()
        assert torch.allclose(composer.coefficients.grad, dense.coefficients.grad, atol=1e-5)


def test_bf16_storage_matches_fp32(base, bank, images):
    low = [vector.to(torch.bfloat16) for vector in bank]
    composer = Composer(base, low, "block", init=0.5)
    reference = Composer(base, [v.to(torch.float32) for v in low], "block", init=0.5)
    out = composer(images)
    assert torch.allclose(out, reference(images), atol=1e-5)
    out.sum().backward()
    reference(images).sum().backward()
    assert torch.allclose(composer.coefficients.grad, reference.coefficients.grad, atol=1e-4)


def test_coefficients_save_load_and_layout_check(tmp_path, base, bank, images):
    composer = Composer(base, bank, "x2")
    _random_coefficients(composer, 2)
    path = composer.save_coefficients(tmp_path / "coef.safetensors")
    fresh = Composer(base, bank, "x2")
    fresh.load_coefficients(path)
    assert torch.equal(fresh.coefficients, composer.coefficients)
    other = Composer(base, bank, "block")
    with pytest.raises(CheckpointError, match="granularity 'x2'"):
        other.load_coefficients(path)
    fewer = Composer(base, bank[:2], "x2")
    with pytest.raises(CheckpointError, match=r"shape \(3, "):
        fewer.load_coefficients(path)


def test_empty_bank_and_unknown_blocks(base, bank):
    with pytest.raises(ValueError, match="bank is empty"):
        Composer(base, [])
    with pytest.raises(KeyError, match="nope"):
        Composer(base, bank, blocks=["nope.weight"])


def test_block_subset_leaves_other_blocks_at_base(base, bank, images):
    composer = Composer(base, bank, "block", init=1.0, blocks=["fc.weight", "fc.bias"])
    expected = copy.deepcopy(base)
    with torch.no_grad():
        for vector in bank:
            expected.fc.weight += vector["fc.weight"]
            expected.fc.bias += vector["fc.bias"]
        assert torch.allclose(composer(images), expected(images), atol=1e-5)


def test_base_stays_in_eval_mode(base, bank, images):
    composer = Composer(base, bank)
    composer.train()
    assert not composer.base.training
    running = composer.base.bn.running_mean.clone()
    composer(images)
    assert torch.equal(running, composer.base.bn.running_mean)


def test_linearized_composition(base, bank, images):
    composer = Composer(base, bank, "block", init=0.0, linearized=True)
    with torch.no_grad():
        assert torch.allclose(composer(images), base(images), atol=1e-6)
    _random_coefficients(composer, 4)
    with torch.no_grad():
        composer.coefficients.mul_(1e-3)  # first order: f_lin ~ f for small steps
        deltas = composer.deltas()
        moved = copy.deepcopy(base)
        for name, param in moved.named_parameters():
            param.add_(deltas[name])
        lin, full = composer(images), moved(images)
    assert torch.allclose(lin, full, atol=1e-5)
    # Linear in the coefficients: f_lin(2c) - f_lin(0) == 2 (f_lin(c) - f_lin(0)).
    with torch.no_grad():
        zero = composer(images, coefficients=torch.zeros_like(composer.coefficients))
        one = composer(images)
        two = composer(images, coefficients=2 * composer.coefficients)
    assert torch.allclose(two - zero, 2 * (one - zero), atol=1e-5)
    merged = composer.merge()
    with torch.no_grad():
        assert torch.allclose(merged(images), composer(images), atol=1e-5)


@pytest.mark.parametrize("granularity", ["block", "x3"])
def test_linearized_gradient_matches_jvp_vjp_and_finite_differences(base, bank, images, granularity):
    """d/dc <w, f_lin(x; c)> two independent ways, in float64: (1) explicit vjp of f at theta_0, then
    per coefficient the inner product with its masked task vector (f_lin is linear in c, so that is the
    whole gradient); (2) central finite differences of the composer's own forward."""
    composer = Composer(copy.deepcopy(base).double(), [v.to(torch.float64) for v in bank], granularity,
                        linearized=True).double()
    _random_coefficients(composer, 5)
    x = images.double()
    weight = torch.randn(x.shape[0], 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (composer(x) * weight).sum().backward()
    got = composer.coefficients.grad.clone()

    theta0 = {name: p.detach() for name, p in parameter_blocks(composer.base).items()}
    _, vjp = torch.func.vjp(lambda w: functional_call(composer.base, w, (x,)), theta0)
    (cotangent,) = vjp(weight)
    expected = torch.zeros_like(got)
    for name in composer.block_names:
        columns = _element_columns(composer.layout, name)
        for i, vector in enumerate(bank):
            contribution = cotangent[name].reshape(-1) * vector[name].reshape(-1).double()
            expected[i].index_add_(0, columns, contribution)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)

    step = 1e-4
    numeric = torch.zeros_like(got)
    with torch.no_grad():
        for index in torch.cartesian_prod(*(torch.arange(k) for k in got.shape)).tolist():
            i = tuple(index)
            up, down = composer.coefficients.detach().clone(), composer.coefficients.detach().clone()
            up[i] += step
            down[i] -= step
            difference = (composer(x, coefficients=up) - composer(x, coefficients=down)) * weight
            numeric[i] = difference.sum() / (2 * step)
    assert torch.allclose(got, numeric, rtol=1e-6, atol=1e-9)
    assert float(got.abs().min()) > 0  # every coefficient has a gradient to compare


def test_double_precision_move(base, bank, images):
    composer = Composer(base, bank, "x2", init=0.3).double()
    out = composer(images.double())
    assert out.dtype == torch.float64
    merged = composer.merge()
    assert torch.allclose(merged(images.double()), out, atol=1e-10)


def test_other_base_refused(bank):
    with pytest.raises(ValueError, match="fingerprint"):
        Composer(make_base(seed=3), bank)
