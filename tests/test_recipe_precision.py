"""`taskvec run precision` end to end on the tiny vision bank and the tiny text suite: the fp32 row is a
plain aTLAS run on the same shots, stored bytes follow the storage formats' own arithmetic, and a rerun
reads the record store instead of training again."""

from __future__ import annotations

import json
import math

import pytest
import synthetic
import torch
from test_suite_text import (
    make_suite,
    tiny,  # noqa: F401  (the tiny BERT fixture, reused)
)

import taskvec.recipes.precision as precision
from taskvec.bank import BankConfig
from taskvec.heldout import HeldOutTarget
from taskvec.recipes.precision import PrecisionConfig, run_precision
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import learn_atlas

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=2, lr=3e-3, batch_size=16, pretrained=False)


@pytest.fixture(scope="module")
def vision_suite(tmp_path_factory) -> VisionSuite:
    bank = synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)
    return VisionSuite(bank, tasks=TASKS, progress=False)


def _config(out, **overrides) -> PrecisionConfig:
    settings = dict(target="gamma", shots=(4,), seeds=(0,), epochs=2, batch_size=8, min_steps=2,
                    augmentation="none", step_repeats=1, out=out, progress=False)
    settings.update(overrides)
    return PrecisionConfig(**settings)


def _stored_bytes(shapes: list[torch.Size], storage: str) -> int:
    """Bytes of a bank in storage form, from the formats' definitions (codes + fp32 scales)."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        if storage == "fp32":
            total += 4 * numel
        elif storage in ("bf16", "fp16"):
            total += 2 * numel
        else:
            bits, grouping = storage.split("-")
            if grouping == "row":
                groups = shape[0] if len(shape) >= 2 else 1
                padded = numel
            else:
                size = int(grouping[1:])
                groups = -(-numel // size)
                padded = groups * size
            codes = padded if bits == "int8" else -(-padded // 2)
            total += codes + 4 * groups
    return total


def _plain_atlas(suite, config: PrecisionConfig, k: int, seed: int) -> float:
    """aTLAS through the workflow directly, on the shots the recipe must draw."""
    ctx = HeldOutTarget(suite, config.target)
    train, val = ctx.shots(k, seed)
    merged, _, _ = learn_atlas(suite.backbone(), suite.vectors(ctx.sources), suite.head(config.target), train, val,
                               suite, config.schedule(seed), seed, progress=False)
    return suite.scores(merged, suite.head(config.target), suite.splits(config.target).test)["acc"]


def test_precision_on_the_vision_bank(vision_suite, tmp_path, monkeypatch):
    storages = ("fp32", "bf16", "int8-row", "int4-g64")
    config = _config(tmp_path / "out", storages=storages, addition=True, alphas=(0.2, 0.5))
    result = run_precision(config, suite=vision_suite)
    records = {r["storage"]: r for r in result["records"]}
    assert set(records) == set(storages)
    assert records["fp32"]["test_acc"] == pytest.approx(_plain_atlas(vision_suite, config, 4, 0))
    shapes = [t.shape for t in vision_suite.vectors(["alpha"])[0].tensors.values()]
    for storage, record in records.items():
        assert record["bank_bytes"] == 2 * _stored_bytes(shapes, storage)  # two source vectors: alpha, beta
        assert record["memory"]["reset"] and record["memory"]["peak_mib"] >= record["memory"]["start_mib"] > 0
        assert record["step_seconds"] > 0 and record["step_cpu_seconds"] > 0
        assert record["train_shots"] == 3 * 4  # 3 of 4 shots per class train, 4 classes
    assert records["int4-g64"]["bank_bytes"] < records["int8-row"]["bank_bytes"] < records["bf16"]["bank_bytes"]
    assert {a["storage"] for a in result["addition"]} == set(storages)
    assert all(a["alpha"] in (0.2, 0.5) for a in result["addition"])
    saved = json.loads((tmp_path / "out" / "precision.json").read_text())
    assert len(saved["records"]) == len(storages) and (tmp_path / "out" / "precision.png").is_file()
    assert "int4-g64 (quantised)" in (tmp_path / "out" / "precision.md").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a recorded job was trained again")

    monkeypatch.setattr(precision, "learn_atlas", refuse)
    again = run_precision(config, suite=vision_suite)
    assert again["records"] == result["records"]


def test_precision_config_names_the_bad_value():
    with pytest.raises(ValueError, match="int3"):
        PrecisionConfig(storages=("fp32", "int3"))
    with pytest.raises(ValueError, match="shots"):
        PrecisionConfig(shots=(0,))


def test_precision_on_the_text_suite(tiny, tmp_path, monkeypatch):  # noqa: F811 (the imported fixture)
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    suite = make_suite(tiny, tmp_path / "bank")
    config = _config(tmp_path / "out", target="beta", shots=(2,), storages=("fp32", "int4-row"))
    result = run_precision(config, suite=suite)
    records = {r["storage"]: r for r in result["records"]}
    assert records["fp32"]["test_acc"] == pytest.approx(_plain_atlas(suite, config, 2, 0))
    shapes = [t.shape for t in suite.vectors(["alpha"])[0].tensors.values()]
    assert records["int4-row"]["bank_bytes"] == 2 * _stored_bytes(shapes, "int4-row")
    assert records["fp32"]["bank_bytes"] == 2 * _stored_bytes(shapes, "fp32")

