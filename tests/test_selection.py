"""Selection under a memory budget: every informed method finds the planted best vector."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskvec.compose import Composer
from taskvec.selection import (
    coefficient_gradients,
    count_for_budget,
    mean_features,
    select_blockwise,
    select_by_features,
    select_by_gradient,
    select_random,
    selection_nbytes,
    vector_nbytes,
)
from taskvec.vectors import LoraTaskVector, TaskVector


def _linear_base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(6, 4)


def _vector(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor, name: str) -> TaskVector:
    finetuned = _linear_base()
    with torch.no_grad():
        finetuned.weight.add_(weight)
        finetuned.bias.add_(bias)
    return TaskVector.from_models(base, finetuned, name=name)


def _shots(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor, n: int = 32):
    """Regression shots whose exact solution is base + (weight, bias); inputs have zero mean
    (x and -x), so the bias residual does not leak into the weight gradient."""
    half = torch.randn(n // 2, 6, generator=torch.Generator().manual_seed(5))
    x = torch.cat([half, -half])
    with torch.no_grad():
        y = base(x) + x @ weight.T + bias
    return [(x[: n // 2 + 3], y[: n // 2 + 3]), (x[n // 2 + 3 :], y[n // 2 + 3 :])]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _planted_bank(base):
    g = torch.Generator().manual_seed(1)
    direction_w, direction_b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    vectors = []
    for i in range(5):
        w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
        vectors.append(_vector(base, w / w.norm(), b / b.norm() * 0.3, f"task{i}"))
    planted = 3
    vectors[planted] = _vector(base, direction_w / direction_w.norm(), direction_b / direction_b.norm() * 0.3, "good")
    return vectors, planted, direction_w / direction_w.norm(), direction_b / direction_b.norm() * 0.3


def test_gradient_selection_picks_planted_vector():
    base = _linear_base()
    vectors, planted, w, b = _planted_bank(base)
    shots = _shots(base, w, b)
    chosen = select_by_gradient(base, vectors, 1, mse, shots)
    assert chosen.indices == [planted] and chosen.vectors[0] is vectors[planted]
    assert select_by_gradient(base, vectors, 2, mse, shots, reduce="isotropic").indices[0] == planted
    # the scores are the contraction <dL/dtheta, tau_i> (independent oracle: autograd on the plain model)
    params = dict(base.named_parameters())
    loss = sum(mse(base, batch) for batch in shots) / len(shots)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    expected = torch.tensor([[float((grads[k] * v[k]).sum()) for k in ("weight", "bias")] for v in vectors])
    got, names = coefficient_gradients(base, vectors, mse, shots)
    assert names == ["weight", "bias"]
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(torch.tensor(chosen.scores), expected.norm(dim=1), atol=1e-5)


def test_feature_selection_uses_every_batch():
    vectors = [TaskVector({"w": torch.zeros(1)}, metadata={"name": n}) for n in ("a", "b", "c")]
    e = torch.eye(3)
    g = torch.Generator().manual_seed(0)

    def around(mean, n):
        return mean + 0.05 * torch.randn(n, 3, generator=g)

    bank_batches = [[around(e[0], 4), around(e[0], 4)], [around(e[1], 6)], [around(-e[0] + e[2], 5)]]
    # Most of the target is like task a; only its *last* batch looks like task b.
    target = [(around(3 * e[0], 8), torch.zeros(8)), (around(e[1], 2), torch.zeros(2))]
    features = nn.Identity()
    chosen = select_by_features(vectors, 1, features, target, bank_batches)
    assert chosen.indices == [0]
    last_only = select_by_features(vectors, 1, features, target[-1:], bank_batches)
    assert last_only.indices == [1]  # what a last-batch-only implementation would have picked
    mean = mean_features(features, target)
    assert torch.allclose(mean, torch.cat([target[0][0], target[1][0]]).mean(0).double())
    assert chosen.scores[2] < 0  # the opposite task scores negatively
    with pytest.raises(ValueError, match="2 batch sources for 3 vectors"):
        select_by_features(vectors, 1, features, target, bank_batches[:2])


def test_blockwise_mixes_the_best_block_of_each_vector():
    base = _linear_base()
    g = torch.Generator().manual_seed(2)
    good_w, good_b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    good_w, good_b = good_w / good_w.norm(), good_b / good_b.norm()
    vectors = [
        _vector(base, torch.randn(4, 6, generator=g) * 0.2, torch.randn(4, generator=g) * 0.2, "noise0"),
        _vector(base, good_w, torch.randn(4, generator=g) * 0.05, "good_weight"),
        _vector(base, torch.randn(4, 6, generator=g) * 0.05, good_b, "good_bias"),
        _vector(base, torch.randn(4, 6, generator=g) * 0.2, torch.randn(4, generator=g) * 0.2, "noise3"),
    ]
    shots = _shots(base, good_w, good_b)
    chosen = select_blockwise(base, vectors, 1, mse, shots)
    assert chosen.sources == [{"weight": 1, "bias": 2}]
    assert chosen.indices == [1, 2]
    synthetic = chosen.vectors[0]
    assert torch.equal(synthetic["weight"], vectors[1]["weight"])
    assert torch.equal(synthetic["bias"], vectors[2]["bias"])
    # the synthetic vector beats every single vector at its best isotropic scale 1
    x = torch.cat([b[0] for b in shots])
    y = torch.cat([b[1] for b in shots])
    with torch.no_grad():
        losses = [float(mse(v.apply_to(base, check_base=False), (x, y))) for v in [*vectors, synthetic]]
    assert losses[-1] < min(losses[:-1])
    two = select_blockwise(base, vectors, 2, mse, shots)
    assert len(two.vectors) == 2 and two.sources[0] == {"weight": 1, "bias": 2}
    assert all(two.sources[1][k] != two.sources[0][k] for k in ("weight", "bias"))
    Composer(base, two.vectors)  # the synthetic vectors compose (fingerprint carried over)


def test_blockwise_with_partial_lora_vectors():
    base = _linear_base()
    g = torch.Generator().manual_seed(3)
    shape = base.weight.shape
    loras = [LoraTaskVector({"weight": (torch.randn(1, 6, generator=g), torch.randn(4, 1, generator=g))},
                            {"weight": shape}, 0.2 * (i + 1), metadata={"name": f"l{i}"}) for i in range(3)]
    shots = _shots(base, loras[2].dense_block("weight"), torch.zeros(4))
    chosen = select_blockwise(base, loras, 1, mse, shots, check_base=False)
    assert isinstance(chosen.vectors[0], LoraTaskVector) and chosen.sources == [{"weight": 2}]


def test_random_and_budget():
    vectors = [TaskVector({"w": torch.zeros(10)}, metadata={"name": str(i)}) for i in range(6)]
    a, b = select_random(vectors, 3, seed=4), select_random(vectors, 3, seed=4)
    assert a.indices == b.indices and len(set(a.indices)) == 3
    assert {tuple(select_random(vectors, 3, seed=s).indices) for s in range(6)} != {tuple(a.indices)}
    assert vector_nbytes(vectors[0]) == 40 and selection_nbytes(a) == 120
    assert count_for_budget(vectors, 125) == 3 and count_for_budget(vectors, 10_000) == 6
    half = [v.to(torch.bfloat16) for v in vectors]
    assert count_for_budget(half, 125) == 6
    with pytest.raises(ValueError, match="n=7 of a bank of 6"):
        select_random(vectors, 7)
