"""The task negation recipe: the 95% control rule by hand, and the recipe end to end on a tiny seeded
backbone and synthetic tasks (selection on validation only, the rule holds, reproducible, outputs)."""

from __future__ import annotations

import json

import pytest
import synthetic
import torch
from test_recipe_addition import CONFIG, _is_test, _scrambling, on, recipe_banks

from taskvec.bank import Bank
from taskvec.control import control_kept, default_control, negation_score
from taskvec.recipes.negation import METHODS, NegationConfig, run_negation
from taskvec.suites.vision import VisionSuite

TASKS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def banks(tmp_path_factory) -> tuple[Bank, Bank]:
    return recipe_banks(tmp_path_factory)


def test_control_rule_by_hand():
    # Pre-trained control accuracy 0.80: the bar is 0.95 * 0.80 = 0.76.
    assert control_kept(0.76, 0.80)
    assert control_kept(0.90, 0.80)
    assert not control_kept(0.7599, 0.80)
    assert control_kept(float(torch.tensor(76 / 100, dtype=torch.float32)), 0.80)  # float32 rounding is not a miss
    assert control_kept(0.72, 0.80, fraction=0.9) and not control_kept(0.71, 0.80, fraction=0.9)
    with pytest.raises(ValueError, match="fraction"):
        control_kept(0.5, 0.5, fraction=1.5)
    # Among states that keep the control, the lowest target accuracy wins...
    kept_low = negation_score(0.20, 0.77, 0.80)
    kept_high = negation_score(0.60, 0.95, 0.80)
    assert kept_low == pytest.approx(0.80) and kept_high == pytest.approx(0.40) and kept_low > kept_high
    # ...and any state that breaks the rule ranks below all of them, however low its target accuracy.
    broken = negation_score(0.00, 0.75, 0.80)
    assert broken < kept_high and broken == pytest.approx(-1.25)
    assert negation_score(0.0, 0.70, 0.80) < negation_score(0.0, 0.74, 0.80) < 0
    # The pre-trained state itself always keeps the control.
    assert control_kept(0.80, 0.80) and negation_score(0.9, 0.80, 0.80) >= 0


def test_default_control():
    assert default_control("mnist") == "fashion_mnist"
    assert default_control("digits") == "fashion_mnist"
    assert default_control("fashion_mnist") == "mnist"
    assert default_control("beta", "beta", "alpha") == "alpha"
    with pytest.raises(ValueError, match="differ"):
        default_control("x", "a", "a")


def small(out, **changes) -> NegationConfig:
    settings = dict(targets=("beta", "gamma"), control="beta", fallback_control="alpha", select_per_task=10,
                    fit_per_task=14, epochs=2, batch_size=7, lr=0.2, alpha_grid=(0.0, -1.0, -3.0),
                    out=out, progress=False)
    settings.update(changes)
    return NegationConfig(**settings)


def test_negation_end_to_end(banks, tmp_path):
    standard, linear = banks
    data = {t: synthetic.loader(t, seed=CONFIG.seed) for t in TASKS}
    tests = {t: d.test for t, d in data.items()}
    seen: list = []

    suites = on(banks)

    def spy(model, head, split):  # injected: every accuracy the recipe computes
        seen.append(split)
        return suites["suite"].accuracy(model, head, split)

    config = small(tmp_path / "run")
    result = run_negation(config, **suites, evaluator=spy)
    seen = [split for split in seen if not _is_test(split, tests)]

    # Selection only ever looked at held-out validation images, never at a test split.
    assert seen
    data = {t: synthetic.loader(t, seed=CONFIG.seed) for t in TASKS}
    for split in seen:
        assert len(split) == config.select_per_task
        assert not any(torch.equal(split.images, d.test.images) for d in data.values() if len(d.test) == len(split))
        assert any(all((d.val.images == im).flatten(1).all(1).any() for im in split.images) for d in data.values())

    rows = result["rows"]
    assert [(r["target"], r["key"]) for r in rows] == [(t, m) for t in config.targets for m in METHODS]
    assert {r["target"]: r["control"] for r in rows} == {"beta": "alpha", "gamma": "beta"}
    for r in rows:
        reference_bank = linear if r["key"] in ("task_arithmetic_lin", "atlas_lin") else standard
        assert r["pretrained_control_test"] == reference_bank.meta(r["control"])["head_test_acc"]
        # The selected state satisfies the 95% rule on validation data (the pre-trained state competes).
        assert r["control_kept_val"] is True
        assert control_kept(r["control_val"], r["control_reference_val"])
        if "alpha_table" in r:
            assert r["alpha"] in config.alpha_grid
            feasible = [t for t in r["alpha_table"] if control_kept(t["control_val"], r["control_reference_val"])]
            assert r["target_val"] == min(t["target_val"] for t in feasible)
        if "best_epoch" in r:
            assert 0 <= r["best_epoch"] <= config.epochs
            assert r["learned"] == sum(1 for p in standard.base().parameters())
    pre = {r["target"]: r for r in rows if r["key"] == "pretrained"}
    for target, r in pre.items():
        assert r["target_test"] == standard.meta(target)["head_test_acc"]
        assert r["alpha" if "alpha" in r else "learned"] == 0

    # Averages are the means over targets.
    for average in result["averages"]:
        mine = [r for r in rows if r["method"] == average["method"]]
        assert average["target (test)"] == pytest.approx(sum(r["target_test"] for r in mine) / len(mine))
        assert average["control (test)"] == pytest.approx(sum(r["control_test"] for r in mine) / len(mine))

    out = tmp_path / "run"
    saved = json.loads((out / "negation.json").read_text())
    assert [r["target_test"] for r in saved["rows"]] == [r["target_test"] for r in rows]
    assert saved["config"]["fraction"] == 0.95
    assert (out / "negation.md").read_text().startswith("Task negation on tiny_cnn")
    assert (out / "negation_target.png").stat().st_size > 1000
    assert (out / "negation_gamma_atlas_coefficients.png").stat().st_size > 1000

    # Seeds reproduce: a fresh run elsewhere gives the same numbers for the methods it repeats.
    again = run_negation(small(tmp_path / "again", targets=("gamma",), methods=("task_arithmetic", "atlas")),
                         **on(banks))
    first = {(r["target"], r["key"]): r for r in rows}
    for r in again["rows"]:
        assert (r["target_test"], r["control_test"]) == (first[r["target"], r["key"]]["target_test"],
                                                          first[r["target"], r["key"]]["control_test"])

    # Test labels steer nothing: scored against wrong test labels, every choice is the same.
    blind = run_negation(small(tmp_path / "blind", targets=("gamma",), methods=("task_arithmetic", "atlas")),
                         **suites, evaluator=_scrambling(tests, suites["suite"]))
    for r in blind["rows"]:
        mine = first[r["target"], r["key"]]
        for field in ("alpha", "best_epoch", "target_val", "control_val"):
            assert r.get(field) == mine.get(field), (r["key"], field)
        assert (r["target_test"], r["control_test"]) != (mine["target_test"], mine["control_test"])


def test_negation_rejects_bad_settings(banks, tmp_path):
    standard, _ = banks
    with pytest.raises(ValueError, match="alpha grid"):
        run_negation(small(tmp_path, alpha_grid=(-1.0, -2.0)), suite=VisionSuite(standard, tasks=TASKS))
    with pytest.raises(ValueError, match="alpha grid"):
        run_negation(small(tmp_path, alpha_grid=(0.0, 0.5)), suite=VisionSuite(standard, tasks=TASKS))
    with pytest.raises(ValueError, match="must be bank tasks"):
        run_negation(small(tmp_path, targets=("delta",)), suite=VisionSuite(standard, tasks=TASKS))
