"""The fused composition kernel, low-precision banks and memory-mapped banks (issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from taskvec.compose import Composer, map_safetensors
from taskvec.io import CheckpointError
from taskvec.vectors import TaskVector, parameter_blocks


def _grad(composer: Composer, images: torch.Tensor) -> torch.Tensor:
    composer.coefficients.grad = None
    composer(images).logsumexp(-1).sum().backward()
    return composer.coefficients.grad.clone()


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_bank_gradients_match_fp32_bank(base, bank, images, low):
    """The fp32 bank against the same bank stored in bf16/fp16: equal up to the storage rounding."""
    reference = Composer(base, bank, "block", init=0.4)
    stored = Composer(base, [v.to(low) for v in bank], "block", init=0.4)
    stacks = [buffer for key, buffer in stored._bank.named_buffers() if key.startswith("dense_") and "idx" not in key]
    assert stacks and all(stack.dtype == low for stack in stacks)
    with torch.no_grad():
        out, expected = stored(images), reference(images)
    eps = torch.finfo(low).eps
    assert torch.allclose(out, expected, rtol=8 * eps, atol=8 * eps * expected.abs().max())
    g_low, g_ref = _grad(stored, images), _grad(reference, images)
    assert g_low.dtype == torch.float32
    assert torch.allclose(g_low, g_ref, rtol=8 * eps, atol=8 * eps * g_ref.abs().max())
    assert not torch.equal(g_low, g_ref)  # the bank really is stored rounded


def test_fused_path_matches_generic_path(base, bank, images):
    """Independent oracle: the composed blocks written out by hand, run through functional_call."""
    composer = Composer(base, bank, "block", init=0.0)
    assert composer._fused is not None
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        composer.coefficients.copy_(torch.randn(composer.coefficients.shape, generator=generator))
    coefficients = composer.coefficients.detach()
    weights = {}
    for name, param in parameter_blocks(base).items():
        column = int(composer.layout.blocks[name].columns[0])
        delta = sum(coefficients[i, column] * bank[i][name] for i in range(len(bank)))
        weights[name] = param.detach() + delta
    expected = functional_call(base, weights, (images,))
    assert torch.allclose(composer(images), expected, atol=1e-5)


def test_vector_subset_per_block(base, bank, images):
    """Vectors covering different blocks: each block's stack holds only its own vectors' rows."""
    partial = TaskVector({k: v for k, v in bank[1].tensors.items() if k.startswith("fc")}, metadata=bank[1].metadata)
    composer = Composer(base, [bank[0], partial, bank[2]], "block", init=0.3, check_base=False)
    assert composer._fused is not None
    grad = _grad(composer, images)
    columns = {int(composer.layout.blocks[k].columns[0]) for k in composer.block_names if not k.startswith("fc")}
    assert all(grad[1, c] == 0 for c in columns)
    merged = composer.merge()
    with torch.no_grad():
        assert torch.allclose(merged(images), composer(images), atol=1e-5)


def test_from_files_maps_and_matches_in_memory(tmp_path, base, bank, images):
    paths = []
    for i, vector in enumerate(bank):
        paths.append(vector.save(tmp_path / f"v{i}.safetensors", dtype=torch.bfloat16))
    before = {p: p.read_bytes() for p in paths}
    mapped = Composer.from_files(base, paths, "block", init=0.2, copy_base=True)
    in_memory = Composer(base, [TaskVector.load(p) for p in paths], "block", init=0.2)
    with torch.no_grad():
        assert torch.equal(mapped(images), in_memory(images))
    assert {p: p.read_bytes() for p in paths} == before  # inputs never written
    assert mapped.vector_fingerprints == in_memory.vector_fingerprints  # coefficients files interchange


def test_from_files_refuses_a_flipped_byte(tmp_path, base, bank):
    """One flipped low mantissa bit (still a finite number) in one tensor of one file: refused, naming it."""
    paths = [vector.save(tmp_path / f"v{i}.safetensors") for i, vector in enumerate(bank)]
    Composer.from_files(base, paths, copy_base=True)  # intact files load
    victim = paths[1]
    data = bytearray(victim.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = sorted(key for key in header if key != "__metadata__")[-1]
    begin, end = header[name]["data_offsets"]
    assert header[name]["dtype"] == "F32" and end - begin >= 8
    offset = 8 + length + begin + 4 * ((end - begin) // 8)  # the low byte of a float32 mid-tensor
    data[offset] ^= 0x01
    victim.write_bytes(bytes(data))
    flipped = load_file(victim)[name]  # safetensors itself does not notice
    assert torch.isfinite(flipped).all() and not torch.equal(flipped, bank[1].tensors[name])
    with pytest.raises(CheckpointError, match=r"v1\.safetensors.*sha256"):
        Composer.from_files(base, paths, copy_base=True)


def test_map_safetensors_is_zero_copy(tmp_path):
    tensor = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    path = TaskVector({"w": tensor}, metadata={"name": "t"}).save(tmp_path / "t.safetensors")
    views, meta, mapping = map_safetensors(path)
    assert meta["name"] == "t" and torch.equal(views["w"], tensor)
    # The view's memory lies inside the mapping: nothing was copied out of it.
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    assert address <= views["w"].data_ptr() < address + len(mapping)
    del views


def test_from_files_rejects_corrupt_header(tmp_path, base):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(Exception, match="bad.safetensors"):
        Composer.from_files(base, [bad])


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    from taskvec.compose import Composer
    torch.set_num_threads(1)
    paths = json.loads(sys.argv[1])
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
    base = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(4)])
    Composer.from_files(base, paths[-1:], check_base=False)  # warm-up, dropped: code pages of the path run once
    start = rss()
    composer = Composer.from_files(base, paths, check_base=False)
    built = rss()
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report the forked test worker's size.
    peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
    print(json.dumps({"start": start, "built": built, "peak": peak}))
    """
)


def test_from_files_resident_memory_is_one_bank(tmp_path):
    """Sixteen 4M-parameter bf16 vectors (128 MiB bank): building adds one bank, not two.

    The issue's budget: peak resident memory <= (base + bank) * 1.15. Measured from after the base
    exists, so the base (16 MiB) is subtracted from the budget.
    """
    blocks = {f"{i}.weight": torch.Size((1024, 1024)) for i in range(4)}
    paths = []
    for k in range(16):
        generator = torch.Generator().manual_seed(k)
        tensors = {name: torch.randn(shape, generator=generator).to(torch.bfloat16) for name, shape in blocks.items()}
        paths.append(str(TaskVector(tensors, metadata={"name": f"t{k}"}).save(tmp_path / f"t{k}.safetensors")))
    bank_mib, base_mib = 16 * 4 * 2.0, 4 * 4.0
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, json.dumps(paths)], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    grown = result["built"] - result["start"]
    assert bank_mib * 0.95 < grown < bank_mib * 1.10, result  # the bank is resident once
    assert result["peak"] - result["start"] < (bank_mib + base_mib) * 1.15 - base_mib, result


def test_hi_lo_split_keeps_sixteen_bits():
    """The GPU path multiplies bf16 hi + lo rows; their sum must carry the fp32 value to ~2^-16."""
    from taskvec.compose import _split

    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    parts = _split(values, torch.bfloat16)
    assert parts.dtype == torch.bfloat16 and parts.shape == (2, 1000)
    error = (parts.float().sum(0) - values).abs().max() / values.abs().max()
    assert error < 2**-15
    assert (values.to(torch.bfloat16).float() - values).abs().max() / values.abs().max() > 2**-12  # bf16 alone is not
