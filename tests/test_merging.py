from __future__ import annotations

import math

import pytest
import torch
from conftest import make_bank, make_base

from taskvec import merging
from taskvec.merging import (
    alpha_search,
    dare,
    dare_merge,
    magnitude_threshold,
    task_arithmetic,
    ties_merge,
)
from taskvec.vectors import BaseMismatchError, LoraTaskVector, TaskVector

META = {"base_fingerprint": "f00d", "name": "v"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny full-batch problems: one intra-op thread avoids oversubscription on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vec(values, name: str = "v", **blocks) -> TaskVector:
    tensors = {"w": torch.tensor(values, dtype=torch.float32)}
    tensors.update({k: torch.tensor(v, dtype=torch.float32) for k, v in blocks.items()})
    return TaskVector(tensors, metadata=dict(META, name=name))


# Hand-computed example, density 0.6 keeps 3 of 5 entries per vector:
#   v1 -> [3, 0, 0, 2, -4], v2 -> [-2, -3, 1.5, 0, 0], v3 -> [1, 2, 0, -5, 0]
#   total mass: [2, -1, 1.5, -3, -4] -> signs [+, -, +, -, -]
#   disjoint mean: [(3+1)/2, -3, 1.5, -5, -4]
V1 = [3.0, -1.0, 0.5, 2.0, -4.0]
V2 = [-2.0, -3.0, 1.5, -1.0, 0.5]
V3 = [1.0, 2.0, -0.2, -5.0, 0.1]


def test_ties_hand_computed_total_mass():
    merged = ties_merge([_vec(V1), _vec(V2), _vec(V3)], density=0.6, alpha=1.0)
    assert merged["w"].tolist() == [2.0, -3.0, 1.5, -5.0, -4.0]
    scaled = ties_merge([_vec(V1), _vec(V2), _vec(V3)], density=0.6, alpha=0.5)
    assert scaled["w"].tolist() == [1.0, -1.5, 0.75, -2.5, -2.0]


def test_ties_frequency_majority_differs_where_counts_tie():
    # Signs by count: [+, tie->+, +, tie->+, -]; entries agreeing with + are averaged.
    merged = ties_merge([_vec(V1), _vec(V2), _vec(V3)], density=0.6, majority="frequency")
    assert merged["w"].tolist() == [2.0, 2.0, 1.5, 2.0, -4.0]


def test_ties_without_trimming_is_sign_aware_mean():
    a, b = _vec([1.0, -2.0, 4.0]), _vec([3.0, 1.0, -1.0])
    merged = ties_merge([a, b], density=1.0)
    # sums [4, -1, 3] -> [+, -, +]; agreeing means [2, -2, 4]
    assert merged["w"].tolist() == [2.0, -2.0, 4.0]


def test_ties_trims_globally_per_vector_not_per_block():
    # One block of large values, one of small: a global top-50% keeps only the large block.
    vector = TaskVector(
        {"big": torch.tensor([5.0, -6.0, 7.0]), "small": torch.tensor([0.1, -0.2, 0.3])},
        metadata=META,
    )
    assert magnitude_threshold(vector, 0.5) == 5.0
    merged = ties_merge([vector], density=0.5)
    assert merged["big"].tolist() == [5.0, -6.0, 7.0]
    assert merged["small"].tolist() == [0.0, 0.0, 0.0]
    # Same numbers in one block: identical trimming.
    single = ties_merge([_vec([5.0, -6.0, 7.0, 0.1, -0.2, 0.3])], density=0.5)
    assert single["w"].tolist() == [5.0, -6.0, 7.0, 0.0, 0.0, 0.0]


def test_bisection_threshold_equals_exact(monkeypatch):
    bank = make_bank(make_base(), 2)
    bf16 = bank[1].to(torch.bfloat16)
    densities = (0.01, 0.2, 0.5, 0.99)
    exact = [magnitude_threshold(v, d) for v in (bank[0], bf16) for d in densities]
    monkeypatch.setattr(merging, "EXACT_LIMIT", 0)
    bisected = [magnitude_threshold(v, d) for v in (bank[0], bf16) for d in densities]
    assert bisected == exact
    k = math.ceil(0.2 * bank[0].numel())
    kept = sum(int((t.abs() >= magnitude_threshold(bank[0], 0.2)).sum()) for t in bank[0].tensors.values())
    assert kept == k


def _ties_by_loops(vectors: list[list[float]], kept: list[list[bool]], alpha: float) -> list[float]:
    """TIES's elect + disjoint mean on plain lists: entry j of vector k counts when kept[k][j] and nonzero."""
    merged = []
    for j in range(len(vectors[0])):
        values = [vec[j] for vec, keep in zip(vectors, kept, strict=True) if keep[j] and vec[j] != 0]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agreeing = [v for v in values if (v > 0) == (sign > 0)]
        merged.append(alpha * sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return merged


def test_ties_on_bank_equals_a_loop_over_entries():
    base = make_base()
    bank = make_bank(base, 3)
    density, alpha = 0.2, 0.7
    names = bank[0].names
    flat = [[x for n in names for x in v[n].reshape(-1).tolist()] for v in bank]
    k = math.ceil(density * len(flat[0]))
    # Per vector, over all its blocks together: keep the k largest magnitudes.
    thresholds = [sorted((abs(x) for x in vec), reverse=True)[k - 1] for vec in flat]
    kept = [[abs(x) >= t for x in vec] for vec, t in zip(flat, thresholds, strict=True)]
    assert all(sum(row) == k for row in kept)  # no ties in random data: exactly k kept
    expected = _ties_by_loops(flat, kept, alpha)
    merged = ties_merge(bank, density=density, alpha=alpha)
    got = [x for n in names for x in merged[n].reshape(-1).tolist()]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert merged.base_fingerprint == bank[0].base_fingerprint
    merged.apply_to(base)  # fingerprint accepted


def test_task_arithmetic_equals_scaled_sum():
    bank = make_bank(make_base(), 3)
    merged = task_arithmetic(bank, 0.3)
    for name in bank[0].names:
        expected = 0.3 * (bank[0][name] + bank[1][name] + bank[2][name])
        assert torch.allclose(merged[name], expected, atol=1e-6)
    assert torch.equal(task_arithmetic(bank[:1], -1.0)["fc.weight"], -bank[0]["fc.weight"])


def test_lora_vectors_accepted_dense():
    base = make_base()
    dense = make_bank(base, 1)[0]
    only_fc = TaskVector({"fc.weight": dense["fc.weight"]}, metadata=dense.metadata)
    generator = torch.Generator().manual_seed(3)
    shape = base.fc.weight.shape
    a = torch.randn(2, shape[1], generator=generator)
    b = torch.randn(shape[0], 2, generator=generator)
    lora = LoraTaskVector({"fc.weight": (a, b)}, {"fc.weight": shape}, 0.5, metadata=dense.metadata)
    delta = lora.dense_block("fc.weight")
    assert torch.allclose(task_arithmetic([lora, only_fc], 2.0)["fc.weight"], 2 * (delta + only_fc["fc.weight"]))
    got = ties_merge([only_fc, lora], density=0.5)
    assert torch.equal(got["fc.weight"], ties_merge([only_fc, lora.to_dense()], density=0.5)["fc.weight"])
    dared = dare_merge([lora, only_fc], drop_rate=0.3, seed=1)
    assert torch.equal(dared["fc.weight"], dare_merge([lora.to_dense(), only_fc], drop_rate=0.3, seed=1)["fc.weight"])
    with pytest.raises(ValueError, match="keys"):  # a vector covering other blocks is refused
        ties_merge([dense, lora])


def test_dare_structure_is_zero_or_rescaled():
    vector = make_bank(make_base(), 1)[0]
    dropped = dare(vector, 0.7, torch.Generator().manual_seed(0))
    zeros = total = 0
    for name, tensor in dropped.tensors.items():
        original = vector[name]
        kept = tensor != 0
        assert torch.allclose(tensor[kept], original[kept] / 0.3, rtol=1e-6)
        zeros += int((~kept).sum())
        total += tensor.numel()
    assert abs(zeros / total - 0.7) < 0.05
    again = dare(vector, 0.7, torch.Generator().manual_seed(0))
    assert all(torch.equal(again[n], dropped[n]) for n in vector.names)  # seeded: reproducible
    identity = dare(vector, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(identity[n], vector[n]) for n in vector.names)


def test_dare_expectation_is_the_original():
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(200_000, generator=generator)
    vector = TaskVector({"w": values}, metadata=META)
    dropped = dare(vector, 0.5, generator)
    # <dare(v), v> / <v, v> has mean 1 and standard deviation ~ sqrt(p/(1-p) * sum v^4) / sum v^2 ~ 0.004.
    ratio = dropped.dot(vector) / vector.dot(vector)
    assert abs(ratio - 1.0) < 0.02
    small = TaskVector({"w": values[:1000]}, metadata=META)
    mean = torch.stack([dare(small, 0.5, generator)["w"] for _ in range(400)]).mean(0)
    # per entry: std of the mean is |v| / sqrt(400) = 0.05 |v|
    assert (mean - values[:1000]).abs().mean() < 0.1 * values[:1000].abs().mean()


def test_dare_ties_hand_made_case():
    vectors = [_vec(V1), _vec(V2), _vec(V3)]
    # drop_rate 0: DARE keeps everything, so DARE+TIES is the sign-elected disjoint mean of the originals:
    # sums [2, -2, 1.8, -4, -3.4] -> signs [+, -, +, -, -]; agreeing means [2, -2, 1, -3, -4].
    assert dare_merge(vectors, drop_rate=0.0, ties=True)["w"].tolist() == [2.0, -2.0, 1.0, -3.0, -4.0]
    assert dare_merge(vectors, drop_rate=0.0, alpha=0.5, ties=True)["w"].tolist() == [1.0, -1.0, 0.5, -1.5, -2.0]
    # drop_rate 1/2: the masks are the documented draws (one generator seeded by `seed`, vectors in order,
    # keep where U >= p), survivors doubled, then the same election and mean, by hand.
    p, seed, alpha = 0.5, 3, 0.8
    generator = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(5, generator=generator) >= p).tolist() for _ in vectors]
    assert 0 < sum(map(sum, masks)) < 15  # some dropped, some kept
    rescaled = [[x / (1 - p) if keep else 0.0 for x, keep in zip(v, m, strict=True)]
                for v, m in zip((V1, V2, V3), masks, strict=True)]
    expected = _ties_by_loops(rescaled, [[True] * 5] * 3, alpha)
    got = dare_merge(vectors, drop_rate=p, alpha=alpha, seed=seed, ties=True)["w"].tolist()
    assert got == pytest.approx(expected, rel=1e-6)
    # Plain DARE on the same draws is alpha times the sum of the rescaled survivors.
    plain = dare_merge(vectors, drop_rate=p, alpha=alpha, seed=seed)["w"].tolist()
    assert plain == pytest.approx([alpha * sum(col) for col in zip(*rescaled, strict=True)], rel=1e-6)


def test_errors_name_the_value():
    bank = make_bank(make_base(), 2)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"density .*" + (r"nan" if bad != bad else str(bad))):
            ties_merge(bank, density=bad)
    for bad in (1.0, -0.2):
        with pytest.raises(ValueError, match=f"drop_rate .*{bad}"):
            dare(bank[0], bad, None)
        with pytest.raises(ValueError, match=f"drop_rate .*{bad}"):
            dare_merge(bank, bad)
    for merge in (task_arithmetic, ties_merge, dare_merge):
        with pytest.raises(ValueError, match="empty"):
            merge([])
    with pytest.raises(ValueError, match="majority"):
        ties_merge(bank, majority="mode")  # type: ignore[arg-type]


def test_vectors_from_different_bases_refused():
    mine = make_bank(make_base(0), 1)[0]
    theirs = make_bank(make_base(1), 1)[0]
    for merge in (task_arithmetic, ties_merge, dare_merge):
        with pytest.raises(BaseMismatchError):
            merge([mine, theirs])


def test_alpha_search_returns_best_and_table():
    best, table = alpha_search(lambda a: -(a - 0.3) ** 2)
    assert best == pytest.approx(0.3)
    assert [a for a, _ in table] == list(merging.DEFAULT_ALPHA_GRID)
    best, table = alpha_search(lambda a: float("nan") if a < -0.8 else abs(a), grid=[-1.0, -0.6, -0.2])
    assert best == -0.6 and math.isnan(table[0][1])
    best, _ = alpha_search(lambda a: (a - 0.5) ** 2, grid=[0.0, 0.4, 1.0], higher_is_better=False)
    assert best == 0.4
    with pytest.raises(ValueError, match="NaN"):
        alpha_search(lambda a: float("nan"), grid=[0.1])
    with pytest.raises(ValueError, match="empty"):
        alpha_search(lambda a: a, grid=[])
