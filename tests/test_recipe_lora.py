"""`taskvec run lora` end to end on the tiny vision bank (1x1 conv adapters) and the tiny text suite
(attention + MLP adapters): adapters are PEFT directories read back through the import, bank bytes follow
r * (in + out) per adapted module, the dense row is plain aTLAS, and saved adapters are reused."""

from __future__ import annotations

import math

import pytest
import synthetic
from test_suite_text import (
    make_suite,
    tiny,  # noqa: F401  (the tiny BERT fixture, reused)
)

import taskvec.recipes.lora as recipe
from taskvec.bank import BankConfig
from taskvec.heldout import HeldOutTarget
from taskvec.lora_train import lora_target_modules
from taskvec.recipes.lora import LoraConfig, run_lora
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import learn_atlas

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=2, lr=3e-3, batch_size=16, pretrained=False)


def _config(out, **overrides) -> LoraConfig:
    settings = dict(target="gamma", shots=(4,), seeds=(0,), epochs=2, batch_size=8, min_steps=2, augmentation="none",
                    ranks=(2,), modules=("conv1x1",), lora_steps=3, lora_batch_size=8, out=out, progress=False)
    settings.update(overrides)
    return LoraConfig(**settings)


def _check(suite, config: LoraConfig, result: dict, monkeypatch) -> None:
    records = {r["bank"]: r for r in result["records"]}
    ctx = HeldOutTarget(suite, config.target)
    n, (targets,), (rank,) = len(ctx.sources), config.modules, config.ranks
    weights = {name: p.shape for name, p in ctx.base.named_parameters()}
    adapted = [weights[f"{m}.weight"] for m in lora_target_modules(ctx.base, targets)]
    lora_bytes = sum(4 * rank * (shape[0] + math.prod(shape[1:])) for shape in adapted)
    assert records[f"lora-r{rank}-{targets}"]["bank_bytes"] == n * lora_bytes
    assert records[f"dense-{targets}"]["bank_bytes"] == n * sum(4 * math.prod(s) for s in adapted)
    assert records[f"dense-{targets}"]["blocks"] == len(adapted)
    train, val = ctx.shots(config.shots[0], 0)
    merged, _, _ = learn_atlas(suite.backbone(), ctx.vectors(), ctx.head, train, val, suite, config.schedule(0), 0,
                               progress=False)
    assert records["dense"]["test_acc"] == pytest.approx(ctx.test_scores(merged)["acc"])
    for task in ctx.sources:
        assert len(list((config.out / "adapters").glob(f"*/lora-r{rank}-{targets}/{task}/adapter_config.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a saved adapter was trained again")

    monkeypatch.setattr(recipe, "train_lora", refuse)
    again = run_lora(LoraConfig(**{**config.__dict__, "resume": False}), suite=suite)
    assert [r["test_acc"] for r in again["records"]] == [r["test_acc"] for r in result["records"]]


def test_lora_on_the_vision_bank(tmp_path_factory, monkeypatch):
    bank = synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)
    suite = VisionSuite(bank, tasks=TASKS, progress=False)
    config = _config(tmp_path_factory.mktemp("out"))
    _check(suite, config, run_lora(config, suite=suite), monkeypatch)
    assert (config.out / "lora.png").is_file() and "lora-r2-conv1x1" in (config.out / "lora.md").read_text()


def test_lora_on_the_text_suite(tiny, tmp_path, monkeypatch):  # noqa: F811 (the imported fixture)
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    suite = make_suite(tiny, tmp_path / "bank")
    config = _config(tmp_path / "out", target="beta", shots=(2,), modules=("both",), lora_batch_size=4)
    _check(suite, config, run_lora(config, suite=suite), monkeypatch)


def test_lora_config_names_the_bad_value():
    with pytest.raises(ValueError, match="ranks"):
        LoraConfig(ranks=(0,))
    with pytest.raises(ValueError, match="qkv"):
        LoraConfig(modules=("qkv",))
