"""Property: every kind of file taskvec reads, truncated, bit-flipped or with edited metadata, gives a
named taskvec error (a :class:`CheckpointError`) or a verified rebuild, never a raw exception and
never silently different data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_bank, make_base
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from taskvec.bank import Bank, write_manifest
from taskvec.compose import Composer
from taskvec.data.sources import RawData
from taskvec.data.store import load_decoded, save_decoded
from taskvec.heads import LinearHead
from taskvec.io import CheckpointError, write_json
from taskvec.train import Loader, TrainConfig, fit
from taskvec.vectors import LoraTaskVector, TaskVector, load_task_vector

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


# -- mutations -------------------------------------------------------------------------------------


@st.composite
def mutations(draw) -> tuple[str, float, int, str]:
    kind = draw(st.sampled_from(["truncate", "flip", "metadata"]))
    return kind, draw(st.floats(0.0, 1.0, exclude_max=True)), draw(st.integers(0, 7)), draw(st.text(max_size=8))


def _mutate(path: Path, mutation: tuple[str, float, int, str]) -> bool:
    """Apply ``mutation`` to ``path``; False when it changed nothing (then there is nothing to check)."""
    kind, where, bit, text = mutation
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: int(where * len(data))])
        return True
    if kind == "flip":
        position = int(where * len(data))
        changed = bytearray(data)
        changed[position] ^= 1 << bit
        path.write_bytes(bytes(changed))
        return True
    # metadata edit: a safetensors header value or a JSON value, rewritten as a well-formed file
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        keys = sorted(meta)
        key = keys[int(where * len(keys))]
        if meta[key] == text:
            return False
        meta[key] = text
        save_file(tensors, str(path), metadata=meta)
        return True
    if path.suffix == ".json":
        obj = json.loads(data)
        if not isinstance(obj, dict) or not obj:
            return False
        keys = sorted(obj)
        key = keys[int(where * len(keys))]
        if obj[key] == text:
            return False
        obj[key] = text
        path.write_text(json.dumps(obj))
        return True
    return False  # torch files have no separate metadata; flips and truncations cover them


def _check(read: Callable[[], object], same: Callable[[object], bool]) -> None:
    """Reading gives a CheckpointError (named, one line), or data equal to the original."""
    try:
        value = read()
    except CheckpointError as err:
        assert str(err) and "\n" not in str(err).strip(), str(err)
        return
    assert same(value), "a corrupted file was read as different data without an error"


def _equal_vectors(a, b) -> bool:
    if isinstance(a, TaskVector) and isinstance(b, TaskVector):
        return a.names == b.names and all(torch.equal(a[k], b[k]) for k in a.names) and a.metadata == b.metadata
    if isinstance(a, LoraTaskVector) and isinstance(b, LoraTaskVector):
        return (a.names == b.names and a.scales == b.scales and a.shapes == b.shapes and a.metadata == b.metadata
                and all(torch.equal(x, y) for k in a.names for x, y in zip(a.factors[k], b.factors[k], strict=True)))
    return False


# -- the files ---------------------------------------------------------------------------------------


BASE = make_base()
BANK = make_bank(BASE, 2)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    files = {"dense": BANK[0].save(root / "dense.safetensors")}
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    lora = LoraTaskVector({"fc.weight": (a, b)}, {"fc.weight": (5, 8)}, 0.5, metadata={"name": "l"})
    files["lora"] = lora.save(root / "lora.safetensors")
    composer = Composer(BASE, BANK, "x2")
    with torch.no_grad():
        composer.coefficients.normal_()
    files["coefficients"] = composer.save_coefficients(root / "coefficients.safetensors")
    model = nn.Linear(3, 2)
    state = root / "train_state.pt"
    fit(model, lambda m, batch: m(batch).square().mean(), Loader(lambda g: [torch.ones(4, 3)], 1),
        TrainConfig(epochs=1, progress=False, checkpoint=state))
    files["train_state"] = state
    images = torch.randint(0, 255, (30, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_decoded(root / "decoded.safetensors", RawData({"train": (images, torch.arange(30) % 3)}, list("abc"), {}),
                 "key")
    files["decoded"] = root / "decoded.safetensors"
    entry = root / "bank" / "t"
    entry.mkdir(parents=True)
    BANK[0].save(entry / "vector.safetensors")
    LinearHead(8, 5).save(entry / "head.safetensors")
    write_json(entry / "meta.json", {"task": "t", "head_test_acc": 0.5, "finetuned_test_acc": 0.9, "epochs": 1,
                                     "seconds": 1.0})
    write_manifest(entry)
    files["bank"] = entry
    return files


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for file in src.iterdir():
            (dst / file.name).write_bytes(file.read_bytes())
    else:
        dst.write_bytes(src.read_bytes())
    return dst


@SETTINGS
@given(mutation=mutations(), which=st.sampled_from(["dense", "lora"]))
def test_task_vector_files(originals, tmp_path_factory, mutation, which):
    path = _copy(originals[which], tmp_path_factory.mktemp("v") / f"{which}.safetensors")
    original = load_task_vector(originals[which])
    if _mutate(path, mutation):
        _check(lambda: load_task_vector(path), lambda v: _equal_vectors(v, original))


@SETTINGS
@given(mutation=mutations())
def test_coefficient_files(originals, tmp_path_factory, mutation):
    path = _copy(originals["coefficients"], tmp_path_factory.mktemp("c") / "coefficients.safetensors")
    reference = Composer(BASE, BANK, "x2")
    reference.load_coefficients(originals["coefficients"])
    if _mutate(path, mutation):
        composer = Composer(BASE, BANK, "x2")

        def read():
            composer.load_coefficients(path)
            return composer.coefficients.detach().clone()

        _check(read, lambda value: torch.equal(value, reference.coefficients))


@SETTINGS
@given(mutation=mutations())
def test_training_checkpoints(originals, tmp_path_factory, mutation):
    path = _copy(originals["train_state"], tmp_path_factory.mktemp("t") / "train_state.pt")
    if not _mutate(path, mutation):
        return
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    reference = nn.Linear(3, 2)
    reference_path = _copy(originals["train_state"], path.with_name("reference.pt"))
    config = TrainConfig(epochs=2, progress=False, resume=True)
    loader = Loader(lambda g: [torch.ones(4, 3)], 1)

    def loss(m, batch):
        return m(batch).square().mean()

    fit(reference, loss, loader, TrainConfig(epochs=2, progress=False, resume=True, checkpoint=reference_path))

    def read():
        fit(model, loss, loader, TrainConfig(**{**config.__dict__, "checkpoint": path}))
        return model

    _check(read, lambda m: all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                                  reference.state_dict().values(), strict=True)))


@SETTINGS
@given(mutation=mutations(), victim=st.sampled_from(["vector.safetensors", "head.safetensors", "meta.json",
                                                     "manifest.json"]))
def test_bank_entries(originals, tmp_path_factory, mutation, victim):
    root = tmp_path_factory.mktemp("bank")
    entry = _copy(originals["bank"], root / "t")
    if not _mutate(entry / victim, mutation):
        return
    bank = Bank(root=root)
    if bank.tasks() == ["t"]:  # still complete: then it must read back exactly
        assert _equal_vectors(bank.vector("t"), load_task_vector(originals["bank"] / "vector.safetensors"))
        assert (entry / "meta.json").read_bytes() == (originals["bank"] / "meta.json").read_bytes()
        assert (entry / "head.safetensors").read_bytes() == (originals["bank"] / "head.safetensors").read_bytes()
    else:
        assert "t" in bank.incomplete()
        _check(lambda: bank.vector("t"), lambda v: False)
        _check(lambda: bank.meta("t"), lambda v: False)


@SETTINGS
@given(mutation=mutations())
def test_cached_datasets(originals, tmp_path_factory, mutation):
    path = _copy(originals["decoded"], tmp_path_factory.mktemp("d") / "decoded.safetensors")
    reference = load_decoded(originals["decoded"], "key")
    if not _mutate(path, mutation):
        return
    raw = load_decoded(path, "key")  # None means: decoded again (the caller rebuilds it)
    if raw is not None:
        assert raw.classes == reference.classes
        for pool, (images, labels) in reference.pools.items():
            assert torch.equal(raw.pools[pool][0], images) and torch.equal(raw.pools[pool][1], labels)
