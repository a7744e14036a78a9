"""`taskvec run gradient-free` end to end on the tiny vision bank and the tiny text suite: the gradient row
is plain aTLAS on the same shots, the search's losses are the training-shot cross-entropy of the model it
returns (and of the pre-trained model at its start), and the budget is what was spent."""

from __future__ import annotations

import pytest
import synthetic
import torch
import torch.nn.functional as F
from test_suite_text import (
    make_suite,
    tiny,  # noqa: F401  (the tiny BERT fixture, reused)
)

from taskvec.bank import BankConfig
from taskvec.heldout import HeldOutTarget
from taskvec.recipes.gradient_free import METHODS, GradientFreeConfig, run_gradient_free
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import learn_atlas

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=2, lr=3e-3, batch_size=16, pretrained=False)


def _config(out, **overrides) -> GradientFreeConfig:
    settings = dict(target="gamma", shots=(4,), seeds=(0,), epochs=2, batch_size=64, min_steps=2,
                    augmentation="none", budget=12, out=out, progress=False)
    settings.update(overrides)
    return GradientFreeConfig(**settings)


def _shot_loss(suite, ctx: HeldOutTarget, model: torch.nn.Module, train) -> float:
    """Cross-entropy of ``model`` on every training shot, batched by the suite, one mean per batch averaged."""
    losses = []
    with torch.no_grad():
        for x, y in ctx.batches(train, 64):
            losses.append(float(F.cross_entropy(ctx.head(model(x)), y)))
    return sum(losses) / len(losses)


def _check(suite, config: GradientFreeConfig, result: dict, k: int) -> None:
    records = {r["method"]: r for r in result["records"]}
    assert set(records) == set(METHODS)
    ctx = HeldOutTarget(suite, config.target)
    train, val = ctx.shots(k, 0)
    merged, _, _ = learn_atlas(suite.backbone(), ctx.vectors(), ctx.head, train, val, suite, config.schedule(0), 0,
                               progress=False)
    assert records["atlas"]["test_acc"] == pytest.approx(ctx.test_scores(merged)["acc"])
    start = _shot_loss(suite, ctx, suite.backbone(), train)  # lambda = 0: the pre-trained model
    bank = len(ctx.sources)
    for mode, learned in (("isotropic", bank), ("block", records["atlas"]["learned"])):
        record = records[f"ngopt-{mode}"]
        assert record["evaluations"] == config.budget and 1 <= record["best_at"] <= config.budget
        assert record["initial_loss"] == pytest.approx(start, rel=1e-5)
        assert record["best_loss"] <= record["initial_loss"]
        assert record["learned"] == learned
        assert record["memory"]["reset"] and record["seconds"] > 0


def test_gradient_free_on_the_vision_bank(tmp_path_factory):
    bank = synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)
    suite = VisionSuite(bank, tasks=TASKS, progress=False)
    config = _config(tmp_path_factory.mktemp("out"))
    result = run_gradient_free(config, suite=suite)
    _check(suite, config, result, 4)
    assert "NGOpt (block)" in (config.out / "gradient_free.md").read_text()
    assert (config.out / "gradient_free.png").is_file()


def test_search_loss_is_the_loss_of_the_returned_model(tmp_path_factory, monkeypatch):
    """The best loss recorded is recomputed from the merged model the search hands back."""
    import taskvec.recipes.gradient_free as recipe

    bank = synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)
    suite = VisionSuite(bank, tasks=TASKS, progress=False)
    config = _config(tmp_path_factory.mktemp("out"), methods=("ngopt-block",))
    ctx = HeldOutTarget(suite, "gamma")
    train, val = ctx.shots(4, 0)
    merged, detail = recipe.METHODS["ngopt-block"].run(ctx, config, ctx.vectors(), train, val, 0)
    assert _shot_loss(suite, ctx, merged, train) == pytest.approx(detail["best_loss"], rel=1e-5)


def test_gradient_free_on_the_text_suite(tiny, tmp_path, monkeypatch):  # noqa: F811 (the imported fixture)
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    suite = make_suite(tiny, tmp_path / "bank")
    config = _config(tmp_path / "out", target="beta", shots=(2,), budget=6)
    _check(suite, config, run_gradient_free(config, suite=suite), 2)


def test_gradient_free_config_names_the_bad_value():
    with pytest.raises(ValueError, match="ngopt-diagonal"):
        GradientFreeConfig(methods=("ngopt-diagonal",))
    with pytest.raises(ValueError, match="budget"):
        GradientFreeConfig(budget=0)
