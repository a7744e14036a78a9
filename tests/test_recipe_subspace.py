"""`taskvec run subspace` end to end on the tiny vision bank and the tiny text suite: the normaliser is the
fine-tuned accuracy the bank recorded when it built the target's entry, the task-vector row at d = n is an
isotropic composition of the whole leave-one-out bank trained on the same shots, and random rows learn d
coefficients over norm-matched random directions."""

from __future__ import annotations

import pytest
import synthetic
from test_suite_text import (
    make_suite,
    tiny,  # noqa: F401  (the tiny BERT fixture, reused)
)

from taskvec.bank import BankConfig
from taskvec.compose import Composer
from taskvec.heldout import HeldOutTarget
from taskvec.recipes.subspace import SubspaceConfig, run_subspace
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import train_through_backbone

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=2, lr=3e-3, batch_size=16, pretrained=False)


def _config(out, **overrides) -> SubspaceConfig:
    settings = dict(target="gamma", shots=(4,), seeds=(0,), dims=(1, 2), epochs=2, batch_size=8, min_steps=2,
                    augmentation="none", out=out, progress=False)
    settings.update(overrides)
    return SubspaceConfig(**settings)


def _check(suite, bank, config: SubspaceConfig, result: dict) -> None:
    reference = bank.meta(config.target)["finetuned_test_acc"]
    assert result["finetuned_test_acc"] == pytest.approx(reference, abs=1e-6)
    records = {(r["basis"], r["d"]): r for r in result["records"]}
    ctx = HeldOutTarget(suite, config.target)
    for (basis, d), record in records.items():
        assert record["normalized"] == pytest.approx(record["test_acc"] / reference)
        assert record["learned"] == d  # isotropic: one coefficient per basis vector
        expected = ctx.sources[:d] if basis == "task-vectors" else [f"random_{i}" for i in range(d)]
        assert record["vectors"] == expected
    k, n = config.shots[0], len(ctx.sources)
    train, val = ctx.shots(k, 0)
    composer = Composer(suite.backbone(), suite.vectors(ctx.sources), "isotropic", init=0.0)
    train_through_backbone(composer, ctx.head, train, val, suite, config.schedule(0), 0, config.lr, "oracle", False)
    assert records[("task-vectors", n)]["test_acc"] == pytest.approx(ctx.test_scores(composer.merge())["acc"])


def test_subspace_on_the_vision_bank(tmp_path_factory):
    bank = synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)
    suite = VisionSuite(bank, tasks=TASKS, progress=False)
    config = _config(tmp_path_factory.mktemp("out"))
    _check(suite, bank, config, run_subspace(config, suite=suite))
    assert "random (same block norms)" in (config.out / "subspace.md").read_text()
    assert (config.out / "subspace.png").is_file()


def test_subspace_on_the_text_suite(tiny, tmp_path, monkeypatch):  # noqa: F811 (the imported fixture)
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    suite = make_suite(tiny, tmp_path / "bank")
    config = _config(tmp_path / "out", target="beta", shots=(2,))
    _check(suite, suite.bank, config, run_subspace(config, suite=suite))


def test_subspace_refuses_more_dimensions_than_vectors(tmp_path_factory):
    bank = synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)
    suite = VisionSuite(bank, tasks=TASKS, progress=False)
    with pytest.raises(ValueError, match="d=3 exceeds"):
        run_subspace(_config(tmp_path_factory.mktemp("out"), dims=(3,), bases=("random",)), suite=suite)
    with pytest.raises(ValueError, match="granularity"):
        SubspaceConfig(granularity="x2")
