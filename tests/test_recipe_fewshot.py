"""The few-shot recipe end to end on a tiny seeded backbone and synthetic tasks: bookkeeping, not accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import synthetic
import torch

import taskvec.recipes.fewshot as fewshot
from taskvec.bank import Bank, BankConfig
from taskvec.data import ImageSet
from taskvec.evaluate import logit_scores, selection_metric
from taskvec.experiment import mean_se, summarize
from taskvec.recipes.fewshot import METHODS, FewShotConfig, run_fewshot
from taskvec.suites.vision import VisionSuite

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=2, lr=3e-3, batch_size=16, pretrained=False)
SHOTS, SEEDS, TARGETS = (1, 4), (0, 1), ("gamma", "beta")


def small_config(out, **overrides) -> FewShotConfig:
    settings = dict(
        targets=TARGETS, shots=SHOTS, seeds=SEEDS, epochs=2, batch_size=8,
        ood_source="alpha", ood_target="beta", ood_shots=(4,), out=out, progress=False, resume=False,
    )
    settings.update(overrides)
    return FewShotConfig(**settings)


def vision(bank: Bank) -> VisionSuite:
    return VisionSuite(bank, tasks=TASKS, progress=False)


class SpySuite:
    """An injected spy: the suite it wraps, recording every split it batches, extracts or scores (the
    suite is a recipe's only way to the inputs), and every ``vectors`` request."""

    def __init__(self, suite) -> None:
        self.suite, self.seen, self.vector_requests = suite, [], []

    def __getattr__(self, name):
        return getattr(self.suite, name)

    def loader(self, split, **kwargs):
        self.seen.append(("train", split))
        return self.suite.loader(split, **kwargs)

    def features(self, model, split):
        self.seen.append(("features", split))
        return self.suite.features(model, split)

    def logits(self, model, head, split):
        self.seen.append(("logits", split))
        return self.suite.logits(model, head, split)

    def scores(self, model, head, split):
        self.seen.append(("scores", split))
        return self.suite.scores(model, head, split)

    def accuracy(self, model, head, split):
        self.seen.append(("scores", split))
        return self.suite.accuracy(model, head, split)

    def vectors(self, tasks):
        self.vector_requests.append(list(tasks))
        return self.suite.vectors(tasks)


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Bank:
    return synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)


@pytest.fixture(scope="module")
def result(bank, tmp_path_factory):
    return run_fewshot(small_config(tmp_path_factory.mktemp("fewshot")), suite=vision(bank))


def _key(record: dict) -> tuple:
    return record["target"], record["k"], record["seed"], record["method"]


# -- statistics ---------------------------------------------------------------------------------


def test_mean_se_matches_the_textbook_formula():
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    std = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert se == pytest.approx(std / math.sqrt(3))
    assert mean_se([0.5])[0] == 0.5 and math.isnan(mean_se([0.5])[1])
    assert all(math.isnan(v) for v in mean_se([]))


def test_summarize_averages_targets_per_seed_then_seeds():
    records = [
        {"target": t, "k": 4, "seed": s, "method": "atlas", "test_acc": acc}
        for (t, s, acc) in [("a", 0, 0.5), ("b", 0, 0.7), ("a", 1, 0.6), ("b", 1, 1.0), ("a", 2, 0.9)]
    ]
    summary = summarize(records)
    average = summary["average"][0]
    assert average["n"] == 2  # seed 2 lacks target b: left out of the over-target average
    assert average["mean"] == pytest.approx((0.6 + 0.8) / 2)
    assert average["se"] == pytest.approx(mean_se([0.6, 0.8])[1])
    per_a = next(r for r in summary["per_target"] if r["target"] == "a")
    assert (per_a["mean"], per_a["se"]) == pytest.approx(mean_se([0.5, 0.6, 0.9]))


def test_selection_metric_orders_by_accuracy_then_cross_entropy():
    split = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    confident = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.5, 0.0]])  # 3/4 right, sure of itself
    hesitant = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.1, 0.0], [0.1, 0.0]])  # the same 3/4, barely
    wrong = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])  # 1/4
    metric = selection_metric
    assert metric(confident, split) > metric(hesitant, split) > metric(wrong, split)
    assert 0.75 < metric(hesitant, split) < metric(confident, split) < 0.75 + 1 / 5
    # Any accuracy gain beats any cross-entropy gain: a perfect but hesitant model beats a confident 3/4.
    perfect = torch.tensor([[0.01, 0.0], [0.0, 0.01], [0.01, 0.0], [0.0, 0.01]])
    assert metric(perfect, split) > metric(confident, split)


# -- end to end ---------------------------------------------------------------------------------


def test_every_method_target_shot_and_seed_is_run_and_written(result, bank):
    records = result["records"]
    assert len(records) == len(TARGETS) * len(SHOTS) * len(SEEDS) * len(METHODS)
    assert {_key(r) for r in records} == {
        (t, k, s, m) for t in TARGETS for k in SHOTS for s in SEEDS for m in METHODS
    }
    for r in records:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["seconds"] >= 0
        k = r["k"]
        # A quarter of the k shots (at least one) select; k = 1 has no selection split at all.
        assert r["selection_images"] == (0 if k == 1 else 4 * max(1, k // 4))
        assert r["train_images"] == 4 * k - r["selection_images"]
        if k == 1 or r["method"] == "pretrained":
            assert r["selection_acc"] is None
    # The reference row is the bank head on pre-trained features, whatever k and seed.
    from taskvec.evaluate import accuracy

    base = bank.base()
    for target in TARGETS:
        task = synthetic.loader(target, seed=CONFIG.seed)
        expected = accuracy(base, bank.head(target), task.test, 16, mean=(0.5,) * 3, std=(0.5,) * 3)
        values = [r["test_acc"] for r in records if r["method"] == "pretrained" and r["target"] == target]
        assert values == pytest.approx([expected] * len(SHOTS) * len(SEEDS))

    files = result["files"]
    saved = json.loads(Path(files["json"]).read_text())
    assert [r["test_acc"] for r in saved["records"]] == [r["test_acc"] for r in records]
    table = Path(files["markdown"]).read_text()
    assert table.startswith("Few-shot adaptation") and "Subset of the full grid" in table
    for method in METHODS.values():
        assert f"| {method.label} |" in table
    assert "Out of distribution" in table and "Runtime per method" in table
    assert Path(files["plot"]).read_bytes()[:4] == b"\x89PNG"
    # The table's averages are the summary's, and the summary is the records'.
    for row in result["summary"]["average"]:
        per_seed = []
        for seed in SEEDS:
            values = [r["test_acc"] for r in records
                      if (r["method"], r["k"], r["seed"]) == (row["method"], row["k"], seed)]
            per_seed.append(sum(values) / len(values))
        mean, se = mean_se(per_seed)
        assert row["mean"] == pytest.approx(mean) and (row["se"] or 0.0) == pytest.approx(0.0 if se != se else se)


def test_ood_uses_neither_emoji_vector_and_one_head(result):
    ood = result["ood"]["records"]
    assert len(ood) == len(SEEDS)
    for r in ood:
        assert r["sources"] == ["gamma"]  # alpha (source) and beta (OOD target) left out
        for name in ("pretrained_in_domain", "atlas_in_domain", "pretrained_ood", "atlas_ood"):
            assert 0.0 <= r[name] <= 1.0
    summary = result["ood"]["summary"][0]
    changes = [r["atlas_ood"] - r["pretrained_ood"] for r in ood]
    assert summary["ood_change_vs_pretrained"][0] == pytest.approx(sum(changes) / len(changes))


def test_seeds_reproduce_and_test_labels_never_steer_anything(bank, result, tmp_path, monkeypatch):
    """Rerun with the same seeds: identical numbers. Rerun with every target's *test labels permuted*:
    every selection score, selected hyper-parameter and selected epoch stays identical, so test labels
    never reached training or selection; only the final test accuracies change."""
    again = run_fewshot(small_config(tmp_path / "again", targets=("gamma",), shots=(4,), ood=False),
                        suite=vision(bank))
    assert [(_key(r), r["test_acc"], r["selection_acc"]) for r in again["records"]] == [
        (_key(r), r["test_acc"], r["selection_acc"]) for r in result["records"] if (r["target"], r["k"]) == ("gamma", 4)
    ]

    poisoned_bank = Bank(CONFIG, root=bank.root, loader=synthetic.relabelled_loader)
    poisoned = run_fewshot(small_config(tmp_path / "poisoned"), suite=vision(poisoned_bank))
    steering = [(_key(r), r["selection_acc"], json.dumps(r["detail"], sort_keys=True)) for r in poisoned["records"]]
    assert steering == [(_key(r), r["selection_acc"], json.dumps(r["detail"], sort_keys=True))
                        for r in result["records"]]
    assert any(a["test_acc"] != b["test_acc"] for a, b in zip(poisoned["records"], result["records"], strict=True))
    for a, b in zip(poisoned["ood"]["records"], result["ood"]["records"], strict=True):
        assert (a["selection_acc"], a["detail"]) == (b["selection_acc"], b["detail"])


def test_training_and_selection_see_only_the_k_shot_data(bank, tmp_path):
    """Every split a method trains on or is scored on before the end is drawn from the target's
    validation split (its head was fitted on the training split) and holds at most k images per class;
    the test split's labels are read only by the evaluator, once per method. The spies are injected
    (a wrapping suite and an evaluator), so the proof holds whatever the recipe's internals are."""
    spy = SpySuite(vision(bank))
    evaluated = []

    def evaluator(logits, split):
        evaluated.append(split)
        return logit_scores(logits, split)

    run_fewshot(small_config(tmp_path, targets=("gamma",), shots=(4,), seeds=(0,), ood=False), suite=spy,
                evaluator=evaluator)

    task = synthetic.loader("gamma", seed=CONFIG.seed)
    pool_rows = {bytes(image.numpy()) for image in task.val.images}
    test_rows = {bytes(image.numpy()) for image in task.test.images}
    kinds = {"train": 0, "features": 0, "logits": 0, "test": 0}
    for kind, split in spy.seen:
        rows = {bytes(image.numpy()) for image in split.images}
        assert kind != "scores", "the suite scored a split: labels read outside the evaluator"
        if len(split) == len(task.test) and rows <= test_rows:
            assert kind != "train", "trained on the test split"
            kinds["test"] += 1  # inputs of the final evaluation (their labels stay with the evaluator)
            continue
        kinds[kind] += 1
        assert rows <= pool_rows, f"{kind}: a split not drawn from the validation split"
        assert torch.all(split.class_counts(4) <= 4), f"{kind}: more than k images of a class"
    assert kinds["train"] >= 2 and kinds["logits"] >= 1 and kinds["features"] >= 2 and kinds["test"] >= 1
    assert len(evaluated) == len(METHODS)
    assert all({bytes(image.numpy()) for image in split.images} == test_rows for split in evaluated)
    assert all("gamma" not in request for request in spy.vector_requests)  # leave-one-out


def test_resume_reuses_finished_jobs(bank, tmp_path, monkeypatch):
    config = small_config(tmp_path, targets=("gamma",), shots=(2,), seeds=(0,), ood=False,
                          methods=("probe", "atlas"), resume=True)
    first = run_fewshot(config, suite=vision(bank))

    def fail(*args, **kwargs):
        raise AssertionError("a finished job was recomputed")

    monkeypatch.setattr(fewshot, "run_job", fail)
    second = run_fewshot(config, suite=vision(bank))
    assert [r["test_acc"] for r in second["records"]] == [r["test_acc"] for r in first["records"]]


def test_bad_requests_fail_clearly(bank, tmp_path):
    with pytest.raises(ValueError, match="unknown few-shot methods"):
        run_fewshot(small_config(tmp_path, methods=("probe", "magic")), suite=vision(bank))
    with pytest.raises(ValueError, match="not bank tasks"):
        run_fewshot(small_config(tmp_path, targets=("delta",)), suite=vision(bank))


def test_cli_options_size_the_run(monkeypatch):
    from taskvec.cli import build_parser

    captured = {}

    def fake(config, *, suite=None):
        captured["config"] = config
        return {"table": "t", "files": {"json": "j", "markdown": "m", "plot": "p"}, "seconds": 0.0}

    monkeypatch.setattr(fewshot, "run_fewshot", fake)
    args = build_parser().parse_args(
        ["run", "fewshot", "--targets", "all", "--shots", "2", "8", "--seeds", "3", "--methods", "probe", "atlas",
         "--epochs", "5", "--no-ood", "--quiet", "--head-from", "auto"])
    assert args.run(args) == 0
    config = captured["config"]
    assert config.targets == ("mnist", "fashion_mnist", "animal_mnist", "digits", "emoji_google", "emoji_twitter")
    assert (config.shots, config.seeds, config.methods) == ((2, 8), (3,), ("probe", "atlas"))
    assert config.head_from == "auto"
    assert config.schedule.epochs == 5 and not config.ood and not config.progress


def test_borrowed_head_scores_the_target_and_keys_its_own_records(bank, tmp_path):
    from taskvec.evaluate import accuracy

    config = small_config(tmp_path, targets=("gamma",), shots=(4,), seeds=(0,), methods=("pretrained", "tip"),
                          ood=False, head_from="alpha")
    result = run_fewshot(config, suite=vision(bank))
    pretrained = next(r for r in result["records"] if r["method"] == "pretrained")
    target = synthetic.loader("gamma", seed=CONFIG.seed)
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    expected = accuracy(bank.base(), bank.head("alpha"), target.test, CONFIG.resolution, **norm)
    assert pretrained["test_acc"] == pytest.approx(expected, abs=1e-6)
    assert "gamma scored by alpha's" in result["table"]
    own = small_config(tmp_path, head_from="own")
    assert fewshot.settings_fingerprint(config, vision(bank)) != fewshot.settings_fingerprint(own, vision(bank))
    with pytest.raises(ValueError, match="not bank tasks"):
        run_fewshot(small_config(tmp_path, head_from="delta"), suite=vision(bank))
