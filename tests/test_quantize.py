"""Quantised banks: error bounds per scheme, storage sizes, safetensors round trip, and the
composition kernel checked against composing the dequantised vectors (forward and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_base, perturbed

from taskvec import quantize as q
from taskvec.compose import Composer
from taskvec.io import CheckpointError
from taskvec.quantize import QuantizedComposer, QuantizedTaskVector, QuantScheme, quantize_bank, quantize_block
from taskvec.vectors import LoraTaskVector, TaskVector, parameter_blocks

INT_SCHEMES = ["int8-block", "int8-row", "int8-g5", "int4-block", "int4-row", "int4-g7"]
SCHEMES = ["fp32", "bf16", "fp16", *INT_SCHEMES]


def _tensors() -> dict[str, torch.Tensor]:
    """Blocks of every rank, an odd element count, a constant row and an all-zero block."""
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 11, generator=g) * torch.logspace(-3, 1, 6)[:, None]  # rows of very different size
    matrix[2] = 0.0
    return {
        "matrix": matrix,
        "conv": torch.randn(4, 3, 3, 3, generator=g) * 0.05,
        "bias": torch.randn(7, generator=g),
        "scalar": torch.tensor(0.37),
        "zeros": torch.zeros(3, 5),
        "tiny": torch.tensor([1e-30, -3e-39, 5e-8, 2.0]),  # fp32 subnormal / fp16 underflow region
    }


def _groups_oracle(x: torch.Tensor, grouping: str) -> list[torch.Tensor]:
    """Independent split of the flattened block into scale groups, as the scheme defines them."""
    flat = x.reshape(-1)
    if grouping == "block" or (grouping == "row" and x.dim() < 2):
        return [flat]
    if grouping == "row":
        return list(x.reshape(x.shape[0], -1))
    size = int(grouping[1:])
    return list(flat.split(size))


@pytest.mark.parametrize("spec", INT_SCHEMES)
def test_integer_error_bound_is_half_a_step(spec):
    fmt, grouping = spec.split("-")
    qmax = {"int8": 127, "int4": 7}[fmt]
    for name, x in _tensors().items():
        stored = quantize_block(x, spec, name=name)
        restored = q.dequantize_block(stored, fmt)
        assert restored.shape == x.shape
        errors = (x - restored).reshape(-1)
        offset = 0
        for group in _groups_oracle(x, grouping):
            scale = group.abs().max() / qmax
            err = errors[offset : offset + group.numel()]
            offset += group.numel()
            # scale/2 plus the fp32 rounding of x/scale and scale*code (a few ulps of |x|).
            slack = 4 * torch.finfo(torch.float32).eps * group.abs().max()
            assert (err.abs() <= scale / 2 + slack).all(), (name, spec)
        if x.abs().max() > 0:
            assert errors.abs().max() > 0 or name == "scalar", f"{spec} {name}: lossless is suspicious"
        # the library's own bound agrees with the oracle and is achieved
        assert ((x - restored).abs() <= q.error_bound(x, spec) * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("spec", ["fp32", "bf16", "fp16"])
def test_float_error_bound_is_half_an_ulp(spec):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]
    mantissa = {"fp32": 23, "bf16": 7, "fp16": 10}[spec]
    for name, x in _tensors().items():
        restored = q.dequantize_block(quantize_block(x, spec, name=name), spec)
        assert restored.dtype == torch.float32
        info = torch.finfo(dtype)
        # Independent: half an ulp of the nearest representable number's binade, never below subnormal/2.
        exponent = torch.floor(torch.log2(x.abs().clamp(min=info.smallest_normal)))
        half_ulp = torch.exp2(exponent - mantissa) / 2
        bound = torch.zeros_like(x) if spec == "fp32" else half_ulp
        assert ((x - restored).abs() <= bound).all(), (name, spec)
    with pytest.raises(ValueError, match="block 'big'.*exceeds fp16"):
        quantize_block(torch.tensor([7e4]), "fp16", name="big")


def test_int4_packing_two_per_byte_and_sizes():
    codes = torch.tensor([-7, 7, 0, -1, 3, -4], dtype=torch.int8)
    packed = q.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 3
    assert torch.equal(q.unpack_int4(packed), codes)
    x = torch.randn(64, 33)
    sizes = {spec: quantize_block(x, spec).nbytes() for spec in ("fp32", "bf16", "int8-row", "int4-row", "int4-block")}
    assert sizes["fp32"] == 64 * 33 * 4
    assert sizes["bf16"] == 64 * 33 * 2
    assert sizes["int8-row"] == 64 * 33 + 64 * 4
    assert sizes["int4-row"] == math.ceil(64 * 33 / 2) + 64 * 4
    assert sizes["int4-block"] == math.ceil(64 * 33 / 2) + 4


def test_scheme_parsing():
    assert str(QuantScheme.parse("int8")) == "int8-row"
    assert str(QuantScheme.parse("INT4-g64")) == "int4-g64"
    assert str(QuantScheme.parse("bf16")) == "bf16"
    for bad in ("int3", "int8-col", "fp8", "int8-g0"):
        with pytest.raises(ValueError, match="quantisation|grouping"):
            QuantScheme.parse(bad)


@pytest.mark.parametrize("spec", SCHEMES)
def test_save_load_round_trip(tmp_path, base, bank, spec):
    vector = QuantizedTaskVector.from_vector(bank[0], spec)
    path = vector.save(tmp_path / "v.safetensors")
    loaded = QuantizedTaskVector.load(path)
    assert str(loaded.scheme) == spec and loaded.names == vector.names and loaded.name == "task0"
    for name in vector.names:
        assert torch.equal(loaded.dense_block(name), vector.dense_block(name))
    loaded.check_base(base)
    with pytest.raises(CheckpointError, match="not a quantised task vector"):
        QuantizedTaskVector.load(bank[0].save(tmp_path / "dense.safetensors"))


def test_load_refuses_mismatched_codes(tmp_path, bank):
    from safetensors.torch import load_file, save_file

    from taskvec.io import read_safetensors_metadata

    path = QuantizedTaskVector.from_vector(bank[0], "int4-row").save(tmp_path / "v.safetensors")
    tensors, meta = load_file(str(path)), read_safetensors_metadata(path)
    tensors["fc.weight.codes"] = tensors["fc.weight.codes"][:-1].clone()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"'fc.weight.codes' is torch.uint8 \(19,\)"):
        QuantizedTaskVector.load(tmp_path / "bad.safetensors")


GRANULARITIES = ["isotropic", "block", "x3", "x4-random"]


@pytest.mark.parametrize("spec", ["fp32", "bf16", "int8-row", "int4-g5", "int4-block"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantised_composition_equals_dequantised(base, bank, images, spec, granularity):
    quantized = quantize_bank(bank, spec)
    # a tiny chunk makes every block cross many chunk and group boundaries
    composer = QuantizedComposer(base, quantized, granularity, chunk=6)
    reference = Composer(base, [v.to_dense() for v in quantized], granularity, check_base=False)
    generator = torch.Generator().manual_seed(11)
    values = torch.rand(composer.coefficients.shape, generator=generator) - 0.3
    with torch.no_grad():
        composer.coefficients.copy_(values)
        reference.coefficients.copy_(values)
    out, expected = composer(images), reference(images)
    assert torch.allclose(out, expected, atol=1e-5)
    out.logsumexp(-1).sum().backward()
    expected.logsumexp(-1).sum().backward()
    assert torch.allclose(composer.coefficients.grad, reference.coefficients.grad, atol=1e-5, rtol=1e-4)
    # ... and the quantisation itself is not the identity for integer schemes
    if spec.startswith("int"):
        assert not torch.equal(quantized[0].dense_block("fc.weight"), bank[0]["fc.weight"])
    merged = composer.merge()
    with torch.no_grad():
        assert torch.allclose(merged(images), composer(images), atol=1e-5)


def test_kernel_gradient_matches_autograd_oracle():
    """quantized_weighted_sum on its own: d/dw of <g, sum_i w_i dq_i> is <g, dq_i>, per part too."""
    from taskvec.granularity import Layout

    g = torch.Generator().manual_seed(2)
    blocks = [torch.randn(5, 9, generator=g) for _ in range(3)]
    stored = [quantize_block(b, "int4-g4") for b in blocks]
    dense = torch.stack([q.dequantize_block(s, "int4") for s in stored]).reshape(3, -1)
    stack = q.QuantizedStack(stored, QuantScheme.parse("int4-g4"), chunk=8)
    upstream = torch.randn(45, generator=g)
    w = torch.randn(3, generator=g, requires_grad=True)
    (q.quantized_weighted_sum(w, stack) * upstream).sum().backward()
    assert torch.allclose(w.grad, dense @ upstream, atol=1e-5)
    # the storage interface a composer's fused kernel calls: base + weights @ stack, and stack @ grad
    offset = torch.randn(5, 9, generator=g)
    with torch.no_grad():
        assert torch.allclose(stack.weighted_sum(w, offset), offset.reshape(-1) + w @ dense, atol=1e-5)
    assert torch.allclose(stack.contract(upstream), dense @ upstream, atol=1e-5)
    for spec in ("x4", "x4-random"):
        parts = Layout({"b": (5, 9)}, spec).blocks["b"]
        owner = torch.cat([torch.full((int(s),), k) for k, s in enumerate(parts.sizes)]) if parts.sizes is not None \
            else parts.index
        wk = torch.randn(3, 4, generator=g, requires_grad=True)
        out = q.quantized_weighted_sum(wk, stack, parts)
        assert torch.allclose(out, (wk[:, owner] * dense).sum(0), atol=1e-5)
        (out * upstream).sum().backward()
        expected = torch.zeros(3, 4).index_add_(1, owner, dense * upstream)
        assert torch.allclose(wk.grad, expected, atol=1e-5)


def test_kernel_dequantises_chunk_by_chunk(monkeypatch, base, bank, images):
    """Neither direction ever holds more than (m, chunk) dequantised values of a block."""
    seen: list[int] = []
    original = q.dequantize_range

    def spy(codes, scales, fmt, group, start, stop, dtype=torch.float32):
        seen.append(stop - start)
        return original(codes, scales, fmt, group, start, stop, dtype)

    monkeypatch.setattr(q, "dequantize_range", spy)
    composer = QuantizedComposer(base, quantize_bank(bank, "int8-row"), "block", init=0.5, chunk=32)
    seen.clear()
    composer(images).sum().backward()
    largest = max(math.prod(s) for s in composer.layout.shapes.values())
    assert largest > 32 and seen and max(seen) <= 32
    assert sum(seen) == 2 * sum(math.prod(s) for s in composer.layout.shapes.values())  # forward + backward


def test_composer_holds_the_small_bank(base, bank):
    fp32 = QuantizedComposer(base, quantize_bank(bank, "fp32"))
    int4 = QuantizedComposer(base, quantize_bank(bank, "int4-row"))
    numel = sum(v.numel() for v in bank)
    assert fp32.bank_nbytes() == 4 * numel
    assert int4.bank_nbytes() < 0.3 * fp32.bank_nbytes()
    moved = int4.double()
    assert moved.stacks["0"].codes.dtype == torch.uint8 and moved.stacks["0"].scales.dtype == torch.float32


def test_content_fingerprint_follows_the_stored_values(tmp_path, base, bank):
    """The composer records each vector's print: equal after a file round trip, different for other storage."""
    int8 = QuantizedTaskVector.from_vector(bank[0], "int8-row")
    again = QuantizedTaskVector.load(int8.save(tmp_path / "q.safetensors"))
    assert again.content_fingerprint() == int8.content_fingerprint()
    others = [QuantizedTaskVector.from_vector(v, spec) for v, spec in ((bank[0], "int4-row"), (bank[1], "int8-row"))]
    assert all(o.content_fingerprint() != int8.content_fingerprint() for o in others)
    assert int8.content_fingerprint() != bank[0].content_fingerprint()
    changed = QuantizedTaskVector.from_vector(bank[0], "int8-row")
    first = changed.names[0]
    changed.blocks[first].codes[0] += 1  # one stored code moved: another vector
    assert changed.content_fingerprint() != int8.content_fingerprint()
    assert QuantizedComposer(base, [int8]).vector_fingerprints == [int8.content_fingerprint()]


def test_mixed_bank_and_lora_source(base, images):
    blocks = parameter_blocks(base)
    g = torch.Generator().manual_seed(4)
    shape = blocks["fc.weight"].shape
    lora = LoraTaskVector({"fc.weight": (torch.randn(2, shape[1], generator=g), torch.randn(shape[0], 2, generator=g))},
                          {"fc.weight": shape}, 0.5, metadata={"name": "lora"})
    dense = TaskVector.from_models(base, perturbed(base, 3), name="dense")
    quant = QuantizedTaskVector.from_vector(TaskVector.from_models(base, perturbed(base, 4), name="q"), "int8-row")
    qlora = QuantizedTaskVector.from_vector(lora, "int8-block")
    with pytest.raises(ValueError, match="mixes"):
        QuantizedComposer(base, [quant, qlora])
    mixed = QuantizedComposer(base, [dense, quant, lora], "x2", init=0.6, check_base=False)
    reference = Composer(base, [dense, quant.to_dense(), lora], "x2", init=0.6, check_base=False)
    assert torch.allclose(mixed(images), reference(images), atol=1e-5)
    mixed(images).sum().backward()
    reference(images).sum().backward()
    assert torch.allclose(mixed.coefficients.grad, reference.coefficients.grad, atol=1e-5)
    assert torch.allclose(qlora.dense_block("fc.weight"), lora.dense_block("fc.weight"),
                          atol=float(q.error_bound(lora.dense_block("fc.weight"), "int8-block").max()) * 1.001)


def test_other_base_refused(bank):
    with pytest.raises(ValueError, match="fingerprint"):
        QuantizedComposer(make_base(seed=3), quantize_bank(bank, "int8"))


@pytest.mark.parametrize("spec", ["int8-g5", "int4-g5", "int4-row", "int4-block", "bf16"])
def test_any_range_dequantises_like_the_whole_block(spec):
    """Every [start, stop), odd starts of int4 bytes and ranges across groups included."""
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(9))
    scheme = QuantScheme.parse(spec)
    stored = quantize_block(x, scheme)
    whole = q.dequantize_block(stored, scheme.format).reshape(-1)
    for start in range(42):
        for stop in range(start + 1, 43):
            part = q.dequantize_range(stored.codes, stored.scales, scheme.format, stored.group, start, stop)
            assert torch.equal(part, whole[start:stop]), (start, stop)


def _by_hand(base, vectors, layout, coefficients):
    """Independent oracle: theta_0 + sum_i Lambda_i[column of each element] * dense_i, element by element."""
    weights = {}
    for name, param in parameter_blocks(base).items():
        parts = layout.blocks[name]
        numel = param.numel()
        if parts.index is not None:
            owner = parts.index
        elif parts.sizes is not None:
            owner = torch.cat([torch.full((int(s),), k) for k, s in enumerate(parts.sizes)])
        else:
            owner = torch.zeros(numel, dtype=torch.long)
        columns = torch.as_tensor(parts.columns)[owner]
        delta = torch.zeros(numel)
        for i, vector in enumerate(vectors):
            if name in vector.names:
                delta += coefficients[i, columns] * vector.dense_block(name).reshape(-1)
        weights[name] = param.detach() + delta.reshape(param.shape)
    return weights


@pytest.mark.parametrize(("granularity", "mix"), [("block", False), ("x4", False), ("x4-random", False),
                                                  ("block", True)])
def test_plain_composer_fuses_quantised_banks(monkeypatch, base, bank, images, granularity, mix):
    """Composer itself composes quantised vectors in its fused kernel (x K too, and dense + quantised rows of
    one block), never via the generic per-block path, and matches the composition written out by hand."""
    from torch.func import functional_call

    from taskvec import compose

    quantized = quantize_bank(bank, "int4-g5")
    vectors = [bank[0], *quantized[1:]] if mix else quantized

    def generic(*args, **kwargs):
        raise AssertionError("the generic per-block path ran")

    monkeypatch.setattr(compose, "quantized_weighted_sum", generic)
    composer = Composer(base, vectors, granularity, chunk=7)
    assert composer._fused is not None
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        composer.coefficients.copy_(torch.randn(composer.coefficients.shape, generator=generator))
    coefficients = composer.coefficients.detach().clone().requires_grad_(True)
    expected = functional_call(base, _by_hand(base, vectors, composer.layout, coefficients), (images,))
    out = composer(images)
    assert torch.allclose(out, expected, atol=1e-5)
    out.logsumexp(-1).sum().backward()
    expected.logsumexp(-1).sum().backward()
    assert torch.allclose(composer.coefficients.grad, coefficients.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", SCHEMES)
def test_content_fingerprint_is_the_dequantised_vectors(tmp_path, base, bank, spec):
    vectors = quantize_bank(bank, spec)
    prints = [v.content_fingerprint() for v in vectors]
    assert len(set(prints)) == len(prints)  # different vectors, different prints
    assert prints[0] == vectors[0].to_dense().content_fingerprint()
    if spec in ("fp32", "bf16"):  # the print samples bf16-rounded values, so these keep the dense print
        assert prints[0] == bank[0].content_fingerprint()
    loaded = QuantizedTaskVector.load(vectors[0].save(tmp_path / "v.safetensors"))
    assert loaded.content_fingerprint() == prints[0]


def test_coefficients_move_between_quantised_and_dequantised_banks(tmp_path, base, bank):
    quantized = quantize_bank(bank, "int8-row")
    composer = Composer(base, quantized, "x2", init=0.3)
    with torch.no_grad():
        composer.coefficients.add_(torch.arange(composer.coefficients.numel()).reshape(composer.coefficients.shape))
    path = composer.save_coefficients(tmp_path / "c.safetensors")
    twin = Composer(base, [v.to_dense() for v in quantized], "x2", check_base=False)
    twin.load_coefficients(path)
    assert torch.equal(twin.coefficients, composer.coefficients)
    swapped = Composer(base, [quantized[1], quantized[0], quantized[2]], "x2")
    with pytest.raises(CheckpointError, match="vector"):
        swapped.load_coefficients(path)


def test_saved_quantised_vector_is_digest_checked(tmp_path, bank):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = QuantizedTaskVector.from_vector(bank[0], "int8-row").save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        raw = dict(handle.metadata())
    assert "taskvec_sha256" in raw
    tensors = load_file(str(path))
    tensors["fc.weight.codes"][0] += 1  # one code off by one step: shapes and dtypes still fit
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=raw)
    with pytest.raises(CheckpointError, match="sha256"):
        QuantizedTaskVector.load(tmp_path / "bad.safetensors")
