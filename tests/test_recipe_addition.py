"""The task addition recipe end to end on a tiny seeded backbone and synthetic tasks: bookkeeping,
selection on validation data only, normalisation, reproducibility and outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import synthetic
import torch
from safetensors.torch import load_file

from taskvec.bank import Bank, BankConfig
from taskvec.batching import mixed_loader, split_validation
from taskvec.compose import Composer
from taskvec.data import ImageSet, to_input
from taskvec.recipes.addition import METHODS, AdditionConfig, run_addition
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import bank_and_norm

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=1, lr=3e-3, batch_size=16, pretrained=False)
NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def recipe_banks(tmp_path_factory) -> tuple[Bank, Bank]:
    """A standard and a linearised tiny bank, built once per pytest process (the negation tests reuse
    them: ``Bank.build`` skips finished entries)."""
    root = tmp_path_factory.getbasetemp() / "recipe_banks"
    standard = Bank(CONFIG, root=root / "standard", loader=synthetic.loader)
    linear = Bank(replace(CONFIG, linearized=True), root=root / "linear", loader=synthetic.loader)
    standard.build(TASKS, progress=False)
    linear.build(TASKS, progress=False)
    return standard, linear


@pytest.fixture(scope="module")
def banks(tmp_path_factory) -> tuple[Bank, Bank]:
    return recipe_banks(tmp_path_factory)


def on(banks: tuple[Bank, Bank], tasks=TASKS) -> dict:
    """The recipes' suite arguments over the tiny banks: the standard suite and its linearised twin."""
    return {"suite": VisionSuite(banks[0], tasks=tasks), "linear_suite": VisionSuite(banks[1], tasks=tasks)}


def small(out, **changes) -> AdditionConfig:
    settings = dict(select_per_task=8, fit_per_task=16, epochs=2, batch_per_task=4, adamerging_steps=3,
                    alpha_grid=(0.0, 0.5, 1.0), ties_grid=(0.0, 1.0), out=out, progress=False)
    settings.update(changes)
    return AdditionConfig(**settings)


def test_split_validation_is_disjoint_seeded_and_per_task():
    val = synthetic.make_task("alpha").val
    select, fit = split_validation(val, 8, 10, seed=0, name="alpha")
    assert len(select) == 8 and len(fit) == 10
    rows = {tuple(im.flatten().tolist()) for im in val.images}
    picked = [tuple(im.flatten().tolist()) for im in torch.cat([select.images, fit.images])]
    assert len(set(picked)) == 18 and set(picked) <= rows  # disjoint parts of the validation split
    again, _ = split_validation(val, 8, 10, seed=0, name="alpha")
    assert torch.equal(again.images, select.images)
    other, _ = split_validation(val, 8, 10, seed=0, name="beta")
    assert not torch.equal(other.images, select.images)
    _, rest = split_validation(val, 8, 100, seed=0)
    assert len(rest) == len(val) - 8
    with pytest.raises(ValueError, match="cannot hold out"):
        split_validation(val, len(val), 4, seed=0)


def test_mixed_loader_mixes_tasks_and_hides_labels():
    a, b = synthetic.make_task("alpha").val, synthetic.make_task("beta", val=10).val
    loader = mixed_loader([a, b], 4, 16, NORM)
    assert len(loader) == 3  # the smaller part (10 images) sets the epoch
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == 3 and all(len(batch) == 2 for batch in batches)
    (xa, ya), (xb, _) = batches[0]
    assert xa.shape == xb.shape == (4, 3, 16, 16) and ya.dtype == torch.int64
    again = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert torch.equal(again[1][0][0], batches[1][0][0])
    unlabelled = mixed_loader([a, b], 2, 16, NORM, steps=5, labels=False)
    items = list(unlabelled.epoch(torch.Generator().manual_seed(0)))
    assert len(items) == 5 and all(isinstance(x, torch.Tensor) for batch in items for x in batch)


def _is_test(split, tests) -> bool:
    return any(len(split) == len(t) and torch.equal(split.images, t.images) for t in tests.values())


def _scrambling(tests, suite):
    """An evaluator that scores every test split against wrong labels (each label shifted by one class)."""

    def evaluate(model, head, split):
        if _is_test(split, tests):
            split = ImageSet(split.images, (split.labels + 1) % (int(split.labels.max()) + 1))
        return suite.accuracy(model, head, split)

    return evaluate


def test_addition_end_to_end(banks, tmp_path):
    standard, linear = banks
    vals = {t: synthetic.loader(t, seed=CONFIG.seed).val for t in TASKS}
    tests = {t: synthetic.loader(t, seed=CONFIG.seed).test for t in TASKS}
    seen: list = []

    suites = on(banks)

    def spy(model, head, split):  # injected: every accuracy the recipe computes
        seen.append(split)
        return suites["suite"].accuracy(model, head, split)

    config = small(tmp_path / "run")
    result = run_addition(config, **suites, evaluator=spy)

    # Every split scored but the test splits is a held-out selection part of a validation split.
    selection = [split for split in seen if not _is_test(split, tests)]
    assert selection, "model selection evaluated nothing"
    for split in selection:
        assert len(split) == config.select_per_task
        assert any(all((v.images == im).flatten(1).all(1).any() for im in split.images) for v in vals.values())

    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == list(METHODS)
    for key, row in rows.items():
        reference = linear if key == "atlas_lin" else standard
        for task in TASKS:
            finetuned = reference.meta(task)["finetuned_test_acc"]
            assert row["normalized"][task] == pytest.approx(row["test_acc"][task] / finetuned)
        assert row["avg_normalized"] == pytest.approx(sum(row["normalized"].values()) / len(TASKS))
        assert row["seconds"] >= 0
    for task in TASKS:
        assert rows["pretrained"]["test_acc"][task] == standard.meta(task)["head_test_acc"]
    # An independent oracle for one row: rebuild task arithmetic at the chosen alpha by hand (base
    # parameters + alpha * sum of the vectors' deltas) and score it here; normalised = that / fine-tuned.
    _, norm, resolution = bank_and_norm(standard)
    merged = standard.base().eval()
    vectors = standard.vectors(TASKS)
    state = merged.state_dict()
    for name in vectors[0].names:
        delta = sum(v.dense_block(name).float() for v in vectors)
        state[name] = (state[name].float() + rows["task_arithmetic"]["alpha"] * delta).to(state[name].dtype)
    merged.load_state_dict(state)
    for task in TASKS:
        x = to_input(tests[task].images, resolution, **norm)
        with torch.no_grad():
            own = float((standard.head(task)(merged(x)).argmax(-1) == tests[task].labels).float().mean())
        assert rows["task_arithmetic"]["test_acc"][task] == pytest.approx(own, abs=1e-6)
        assert rows["task_arithmetic"]["normalized"][task] == pytest.approx(
            own / standard.meta(task)["finetuned_test_acc"], abs=1e-6)
    assert rows["task_arithmetic"]["alpha"] in config.alpha_grid
    assert rows["ties"]["scale"] in config.ties_grid
    assert rows["atlas"]["learned"] == len(TASKS) * sum(1 for p in standard.base().parameters())
    assert rows["isotropic"]["learned"] == len(TASKS)
    low, high = rows["adamerging"]["coefficient_range"]
    assert 0.0 <= low <= high <= 1.0
    # Model selection keeps the best validation epoch (epoch 0 = the initial state competes).
    for key in ("isotropic", "atlas", "atlas_lin"):
        history = rows[key]["history"]
        assert rows[key]["selection_acc"] == max(h["selection"] for h in history)

    out = tmp_path / "run"
    saved = json.loads((out / "addition.json").read_text())
    assert [r["avg_acc"] for r in saved["rows"]] == [r["avg_acc"] for r in result["rows"]]
    assert saved["config"]["sizes"]["alpha"]["select"] == 8
    assert (out / "addition.md").read_text().startswith("Task addition over 3 tasks")
    for name in ("addition_normalized.png", "addition_atlas_coefficients.png", "addition_atlas_lin_coefficients.png"):
        assert (out / name).stat().st_size > 1000
    composer = Composer(standard.base(), standard.vectors(TASKS), "block")
    composer.load_coefficients(out / "addition_atlas_coefficients.safetensors")

    # Seeds reproduce: a fresh run (no resume) in another directory gives the same numbers...
    again = run_addition(small(tmp_path / "again", methods=("ties", "adamerging", "atlas")), **on(banks))
    for row in again["rows"]:
        assert row["test_acc"] == rows[row["key"]]["test_acc"]

    # Test labels steer nothing: with every test split scored against wrong labels, every choice and
    # every learned coefficient is the same (only the reported test accuracies change).
    blind = run_addition(small(tmp_path / "blind", methods=("task_arithmetic", "ties", "adamerging", "atlas")),
                         **suites, evaluator=_scrambling(tests, suites["suite"]))
    for row in blind["rows"]:
        mine = rows[row["key"]]
        for field in ("alpha", "scale", "best_epoch", "selection_acc", "coefficient_range"):
            assert row.get(field) == mine.get(field), (row["key"], field)
        assert row["test_acc"] != mine["test_acc"]
        if row["key"] in ("adamerging", "atlas"):
            name = f"addition_{row['key']}_coefficients.safetensors"
            assert torch.equal(load_file(tmp_path / "blind" / name)["coefficients"],
                               load_file(out / name)["coefficients"])

    # ...and a rerun in the same directory reuses the finished records: it trains and scores nothing.
    def refuse(*args, **kwargs):
        pytest.fail("a finished method was evaluated again")

    resumed = run_addition(config, **on(banks), evaluator=refuse)
    assert [r["test_acc"] for r in resumed["rows"]] == [r["test_acc"] for r in result["rows"]]


def test_addition_rejects_bad_settings(banks, tmp_path):
    standard, _ = banks
    with pytest.raises(ValueError, match="methods"):
        run_addition(small(tmp_path, methods=("nope",)), suite=VisionSuite(standard, tasks=TASKS))
    with pytest.raises(ValueError, match="at least two"):
        run_addition(small(tmp_path), suite=VisionSuite(standard, tasks=("alpha",)))
