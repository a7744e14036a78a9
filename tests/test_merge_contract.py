"""One contract, every registered merge method: what any merge must guarantee, whatever it computes.

Per-method numbers (hand-computed TIES, DARE statistics, ...) live in tests/test_merging.py; here the
guarantees are checked over ``list_methods()``, so a newly registered method is covered without edits.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import make_bank, make_base

from taskvec import merging
from taskvec.methods import (
    MergeMethod,
    MergeParameterError,
    Param,
    UnknownMethodError,
    get_method,
    list_methods,
    merge,
    method_names,
    register,
)
from taskvec.vectors import BaseMismatchError, LoraTaskVector, TaskVector, parameter_blocks

METHODS = method_names()
# Non-default values inside every declared range, so the contract is not only checked at the defaults.
SETTINGS = {"alpha": 0.7, "density": 0.4, "drop_rate": 0.3, "seed": 5, "majority": "frequency"}
# The library function behind each name, and the keywords the registry fixes for it.
LIBRARY = {
    "sum": (merging.task_arithmetic, {}),
    "ties": (merging.ties_merge, {}),
    "dare": (merging.dare_merge, {"ties": False}),
    "dare_ties": (merging.dare_merge, {"ties": True}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(method: MergeMethod) -> dict:
    return {p.name: SETTINGS[p.name] for p in method.params if p.name in SETTINGS}


def _equal(a: TaskVector, b: TaskVector) -> bool:
    return a.names == b.names and all(torch.equal(a[n], b[n]) for n in a.names)


def _lora_bank(base, n: int = 3) -> list[LoraTaskVector]:
    """Rank-2 LoRA vectors over every block of the base (1-D blocks as (out, 1) matrices)."""
    blocks = parameter_blocks(base)
    meta = make_bank(base, 1)[0].metadata  # the base fingerprint
    generator = torch.Generator().manual_seed(11)
    bank = []
    for i in range(n):
        factors = {}
        for name, block in blocks.items():
            fan_in = block.shape[1:].numel() if block.dim() > 1 else 1
            factors[name] = (
                torch.randn(2, fan_in, generator=generator) * 0.2,
                torch.randn(block.shape[0], 2, generator=generator) * 0.2,
            )
        shapes = {name: block.shape for name, block in blocks.items()}
        bank.append(LoraTaskVector(factors, shapes, 0.5, metadata=dict(meta, name=f"lora{i}")))
    return bank


def test_registry_lists_the_library_methods():
    assert METHODS == ["sum", "ties", "dare", "dare_ties"]
    assert [m.name for m in list_methods()] == METHODS
    for method in list_methods():
        assert method.reference and method.summary
        assert method.name in method.describe() and all(p.name in method.describe() for p in method.params)


@pytest.mark.parametrize("name", METHODS)
def test_declared_defaults_are_the_library_defaults(name):
    """The registry never drifts from taskvec.merging: same defaults, same result."""
    method = get_method(name)
    function, fixed = LIBRARY[name]
    signature = inspect.signature(function)
    for p in method.params:
        assert signature.parameters[p.name].default == p.default, p.name
    bank = make_bank(make_base(), 3)
    assert _equal(merge(name, bank), function(bank, **fixed))
    assert _equal(merge(name, bank, **_params(method)), function(bank, **_params(method), **fixed))


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_never_mutated(name):
    base = make_base()
    dense = make_bank(base, 3)
    lora = _lora_bank(base, 2)
    for vectors in (dense, lora, [dense[0], lora[1]]):
        tensors = [
            {k: v.clone() for k, v in vec.tensors.items()} if isinstance(vec, TaskVector)
            else {k: (a.clone(), b.clone()) for k, (a, b) in vec.factors.items()}
            for vec in vectors
        ]
        metadata = [dict(vec.metadata) for vec in vectors]
        merged = merge(name, vectors, **_params(get_method(name)))
        for vec, before, meta in zip(vectors, tensors, metadata, strict=True):
            assert vec.metadata == meta
            if isinstance(vec, TaskVector):
                assert all(torch.equal(vec.tensors[k], before[k]) for k in before)
                assert all(merged.tensors[k] is not vec.tensors[k] for k in before)  # no aliasing either
            else:
                assert all(torch.equal(a, before[k][0]) and torch.equal(b, before[k][1])
                           for k, (a, b) in vec.factors.items())


@pytest.mark.parametrize("name", METHODS)
def test_vectors_of_another_base_are_refused(name):
    mine = make_bank(make_base(0), 2)
    theirs = make_bank(make_base(1), 1)[0]
    with pytest.raises(BaseMismatchError, match="different base"):
        merge(name, [*mine, theirs])
    merged = merge(name, mine)
    assert merged.base_fingerprint == mine[0].base_fingerprint
    merged.check_base(make_base(0))  # and the result is accepted by its own base
    with pytest.raises(BaseMismatchError):
        merged.check_base(make_base(1))


@pytest.mark.parametrize("name", METHODS)
def test_lora_input_equals_its_dense_form(name):
    base = make_base()
    lora = _lora_bank(base, 3)
    params = _params(get_method(name))
    expected = merge(name, [v.to_dense() for v in lora], **params)
    assert _equal(merge(name, lora, **params), expected)
    mixed = [lora[0], lora[1].to_dense(), lora[2]]
    assert _equal(merge(name, mixed, **params), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", METHODS)
def test_storage_dtype_is_kept(name, dtype):
    bank = [v.to(dtype) for v in make_bank(make_base(), 3)]
    merged = merge(name, bank, **_params(get_method(name)))
    assert {t.dtype for t in merged.tensors.values()} == {dtype}
    assert merged.shapes == bank[0].shapes


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_under_a_seed(name):
    method = get_method(name)
    bank = make_bank(make_base(), 3)
    params = _params(method)
    torch.manual_seed(1)
    first = merge(name, bank, **params)
    torch.manual_seed(2)  # the global generator plays no part
    torch.rand(10)
    assert _equal(merge(name, bank, **params), first)
    if method.stochastic:  # and the declared seed really is the source of randomness
        other = merge(name, bank, **dict(params, seed=params["seed"] + 1))
        assert not _equal(other, first)


@pytest.mark.parametrize("name", METHODS)
def test_parameters_are_validated_with_the_culprit_named(name):
    method = get_method(name)
    bank = make_bank(make_base(), 2)
    with pytest.raises(MergeParameterError, match=rf"merge method '{name}' has no parameter 'nope'"):
        merge(name, bank, nope=1)
    for p in method.params:
        bad_values: list = [True, [1]] if p.kind is not bool else ["yes"]
        if p.kind in (float, int):
            bad_values += ["0.5", float("nan"), float("inf")]
            if p.kind is int:
                bad_values.append(1.5)
            if p.low is not None:
                bad_values.append(p.low if p.low_open else p.low - 1)
            if p.high is not None:
                bad_values.append(p.high if p.high_open else p.high + 1)
        if p.choices is not None:
            bad_values.append("not-a-choice")
        for bad in bad_values:
            with pytest.raises(MergeParameterError, match=rf"'{name}': parameter '{p.name}' must be .*got"):
                merge(name, bank, **{p.name: bad})
        # Command-line strings convert to the declared type.
        assert p.parse(str(p.default).lower() if p.kind is bool else str(p.default), name) == p.default
    with pytest.raises(ValueError, match="empty"):
        merge(name, [])


def test_unknown_method_and_duplicate_registration():
    with pytest.raises(UnknownMethodError, match="unknown merge method 'tie'; registered methods: sum, ties"):
        get_method("tie")
    with pytest.raises(ValueError, match="already registered"):
        register(get_method("sum"))
    bad_default = MergeMethod("bad", merging.task_arithmetic, (Param("alpha", float, 2.0, "", high=1.0),), "r", "s")
    with pytest.raises(MergeParameterError, match="'alpha' must be \\[-inf, 1\\]|'alpha' must be \\(-inf, 1\\]"):
        register(bad_default)
    assert "bad" not in method_names()


def test_param_parse_and_range_text():
    density = get_method("ties").param("density")
    assert density.range_text() == "(0, 1]" and density.parse("0.25") == 0.25
    with pytest.raises(MergeParameterError, match="'density' must be \\(0, 1\\] \\(float\\); got 'abc'"):
        density.parse("abc")
    seed = get_method("dare").param("seed")
    assert seed.parse("7") == 7
    with pytest.raises(MergeParameterError, match="'seed'"):
        seed.parse("7.5")
    flag = Param("flag", bool, False, "")
    assert flag.parse("true") is True and flag.parse("0") is False
    with pytest.raises(MergeParameterError, match="'flag' must be true or false"):
        flag.parse("maybe")
