"""`taskvec run peft` end to end on the tiny vision bank and the tiny text suite: learnable counts follow
K * blocks * vectors, LoRA's rank is matched to the largest K by r * (in + out), fine-tuning counts every
weight, the data fractions have the sizes asked for, and aTLAS x1 is plain block aTLAS on the same data."""

from __future__ import annotations

import pytest
import synthetic
from test_suite_text import (
    make_suite,
    tiny,  # noqa: F401  (the tiny BERT fixture, reused)
)

from taskvec.bank import BankConfig
from taskvec.heldout import HeldOutTarget
from taskvec.lora_train import lora_target_modules, rank_for_budget
from taskvec.models import build_backbone
from taskvec.recipes.peft import PeftConfig, run_peft
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import learn_atlas

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=2, lr=3e-3, batch_size=16, pretrained=False)


def _config(out, **overrides) -> PeftConfig:
    settings = dict(target="gamma", seeds=(0,), fractions=(0.5, 1.0), ks=(1, 2), epochs=2, batch_size=8,
                    min_steps=2, augmentation="none", lora_targets="conv1x1", out=out, progress=False)
    settings.update(overrides)
    return PeftConfig(**settings)


def _check(suite, config: PeftConfig, result: dict) -> None:
    records = {(r["method"], r["fraction"]): r for r in result["records"]}
    ctx = HeldOutTarget(suite, config.target)
    blocks, n = len(ctx.vectors()[0].names), len(ctx.sources)
    x2 = records[("atlas-x2", 1.0)]["learned"]
    assert records[("atlas-x1", 1.0)]["learned"] == n * blocks and x2 == 2 * n * blocks
    modules = dict(ctx.base.named_modules())
    per_rank = sum(modules[m].weight.shape[0] + modules[m].weight[0].numel()
                   for m in lora_target_modules(ctx.base, config.lora_targets))
    rank = max(1, round(x2 / per_rank))
    assert records[("lora", 1.0)]["learned"] == rank * per_rank
    assert records[("finetune", 1.0)]["learned"] == sum(p.numel() for p in ctx.base.parameters())
    pool = len(ctx.pool())
    for fraction in config.fractions:
        record = records[("atlas-x1", fraction)]
        assert record["train"] + record["selection"] == round(fraction * pool)
        assert record["selection"] == max(1, round(fraction * pool) // 4)
    train, val = ctx.fraction(1.0, 0)
    merged, _, _ = learn_atlas(suite.backbone(), ctx.vectors(), ctx.head, train, val, suite, config.schedule(0), 0,
                               progress=False)
    assert records[("atlas-x1", 1.0)]["test_acc"] == pytest.approx(ctx.test_scores(merged)["acc"])


def test_peft_on_the_vision_bank(tmp_path_factory):
    bank = synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)
    suite = VisionSuite(bank, tasks=TASKS, progress=False)
    config = _config(tmp_path_factory.mktemp("out"), lora_targets="auto")  # the default: 1x1 convolutions on a CNN
    _check(suite, config, run_peft(config, suite=suite))
    table = (config.out / "peft.md").read_text()
    assert (config.out / "peft.png").is_file() and "atlas-x2" in table and "LoRA on conv1x1" in table


def test_peft_on_the_text_suite(tiny, tmp_path, monkeypatch):  # noqa: F811 (the imported fixture)
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    suite = make_suite(tiny, tmp_path / "bank")
    config = _config(tmp_path / "out", target="beta", fractions=(1.0,), lora_targets="attention")
    _check(suite, config, run_peft(config, suite=suite))


def test_rank_for_budget_counts_r_times_in_plus_out():
    cnn, _ = build_backbone("tiny_cnn", pretrained=False)  # one 1x1 conv: 16 -> 32 channels
    assert rank_for_budget(cnn, "conv1x1", 48 * 3) == 3
    assert rank_for_budget(cnn, "conv1x1", 48 * 3 + 23) == 3 and rank_for_budget(cnn, "conv1x1", 48 * 3 + 25) == 4
    assert rank_for_budget(cnn, "conv1x1", 1) == 1


def test_peft_config_names_the_bad_value():
    with pytest.raises(ValueError, match="fractions"):
        PeftConfig(fractions=(0.0,))
    with pytest.raises(ValueError, match="ks"):
        PeftConfig(ks=(0,))
