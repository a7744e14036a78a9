"""The bank and the demo end to end, on a tiny seeded backbone and small synthetic tasks."""

from __future__ import annotations

import json

import pytest
import synthetic
import torch

from taskvec.bank import Bank, BankConfig
from taskvec.compose import Composer
from taskvec.evaluate import accuracy
from taskvec.heads import LinearHead
from taskvec.recipes.demo import DemoConfig, resolve_head, run_demo
from taskvec.vectors import TaskVector
from taskvec.workflow import CoefficientSchedule, few_shot_split

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(
    backbone="tiny_cnn", resolution=16, epochs=2, min_steps=0, lr=3e-3, batch_size=16, pretrained=False
)


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Bank:
    return synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)


def test_bank_round_trip(bank):
    assert bank.tasks() == sorted(TASKS)
    base = bank.base()
    for task in TASKS:
        meta = bank.meta(task)
        vector = bank.vector(task)
        head = bank.head(task)
        assert isinstance(vector, TaskVector) and isinstance(head, LinearHead)
        vector.check_base(base)  # made on exactly this base
        assert vector.name == task and vector.norm() > 0
        assert meta["sizes"] == {"train": 48, "val": 24, "test": 40}
        # The stored accuracies are reproducible from the stored files.
        data = synthetic.loader(task, seed=CONFIG.seed)
        finetuned = vector.apply_to(base)
        norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
        assert accuracy(finetuned, head, data.test, 16, **norm) == pytest.approx(meta["finetuned_test_acc"], abs=1e-6)
        assert accuracy(base, head, data.test, 16, **norm) == pytest.approx(meta["head_test_acc"], abs=1e-6)
        assert not (bank.entry(task) / "train_state.pt").exists()


def test_bank_skips_finished_entries(bank, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a finished entry was rebuilt")

    monkeypatch.setattr(Bank, "build_entry", fail)
    bank.build(TASKS, progress=False)


def test_bank_resumes_an_interrupted_entry(tmp_path):
    """A build killed mid-task leaves no meta.json; the rerun finishes it to the same vector."""
    reference = Bank(CONFIG, root=tmp_path / "ref", loader=synthetic.loader)
    reference.build(["alpha"], progress=False)

    interrupted = Bank(CONFIG, root=tmp_path / "cut", loader=synthetic.loader)
    import taskvec.bank as bank_module

    real_loss = bank_module._head_loss
    steps_per_epoch = -(-48 // CONFIG.batch_size)
    calls = {"n": 0}

    def dies_in_second_epoch(head):
        inner = real_loss(head)

        def loss(model, batch):
            calls["n"] += 1
            if calls["n"] == steps_per_epoch + 2:
                raise KeyboardInterrupt
            return inner(model, batch)

        return loss

    bank_module._head_loss = dies_in_second_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupted.build(["alpha"], progress=False)
    finally:
        bank_module._head_loss = real_loss
    assert not interrupted.has("alpha")
    assert (interrupted.entry("alpha") / "train_state.pt").is_file()
    interrupted.build(["alpha"], progress=False)
    a, b = reference.vector("alpha"), interrupted.vector("alpha")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a.names)


def test_missing_entry_error_names_task(bank):
    with pytest.raises(FileNotFoundError, match="no finished entry for task 'delta'"):
        bank.vector("delta")


def test_few_shot_split_holds_out_selection_shots():
    task = synthetic.make_task("alpha", train=80)
    train, val = few_shot_split(task.train, 8, seed=1)
    assert torch.equal(train.class_counts(), torch.full((4,), 6))
    assert torch.equal(val.class_counts(), torch.full((4,), 2))
    again_train, _ = few_shot_split(task.train, 8, seed=1)
    assert torch.equal(train.labels, again_train.labels) and torch.equal(train.images, again_train.images)
    one, none = few_shot_split(task.train, 1, seed=1)
    assert none is None and len(one) == 4


def test_demo_end_to_end(bank, tmp_path, monkeypatch):
    # Record every split that model selection evaluates: it must never be the test split.
    import taskvec.workflow as common

    target = synthetic.loader("gamma", seed=CONFIG.seed)
    seen = []
    real_accuracy = common.accuracy

    def spy(model, head, split, *args, **kwargs):
        seen.append(split)
        return real_accuracy(model, head, split, *args, **kwargs)

    import taskvec.suites.vision as vision_suite

    monkeypatch.setattr(common, "accuracy", spy)
    monkeypatch.setattr(vision_suite, "accuracy", spy)  # the suite scores the selection shots
    config = DemoConfig(
        target="gamma", shots=4, schedule=CoefficientSchedule(epochs=2, batch_size=8), out=tmp_path, progress=False
    )
    result = run_demo(config, bank=bank, tasks=TASKS)
    methods = [row["method"] for row in result["rows"]]
    assert methods[0] == "pre-trained + head"
    assert methods[1].startswith("task arithmetic")
    assert methods[2:] == ["learned isotropic", "aTLAS (block)"]
    assert seen and all(len(split) != len(target.test) for split in seen)
    assert result["bank"]["sources"] == ["alpha", "beta"]
    learned = {row["method"]: row["learned"] for row in result["rows"]}
    assert learned["learned isotropic"] == 2
    base = bank.base()
    assert learned["aTLAS (block)"] == 2 * sum(1 for p in base.parameters() if p.is_floating_point())
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert [r["test_acc"] for r in saved["rows"]] == [r["test_acc"] for r in result["rows"]]
    assert (tmp_path / "demo.md").read_text().startswith("Few-shot adaptation to **gamma**")
    assert (tmp_path / "demo_coefficients.png").stat().st_size > 1000
    # The saved coefficients reload into a composer over the same sources.
    composer = Composer(base, bank.vectors(["alpha", "beta"]), "block")
    composer.load_coefficients(tmp_path / "demo_coefficients.safetensors")
    atlas_row = next(r for r in result["rows"] if r["method"] == "aTLAS (block)")
    assert (composer.coefficients.abs().sum() == 0) == (atlas_row["best_epoch"] == 0)
    # Seeds reproduce: a second run gives the same table.
    again = run_demo(config, bank=bank, tasks=TASKS)
    assert [r["test_acc"] for r in again["rows"]] == [r["test_acc"] for r in result["rows"]]


def test_demo_with_another_tasks_head(bank, tmp_path, monkeypatch):
    """head_from: the target is scored through a donor head over the same classes; other classes refused."""
    config = DemoConfig(target="gamma", shots=4, head_from="alpha", out=tmp_path, progress=False,
                        schedule=CoefficientSchedule(epochs=1, batch_size=8))
    result = run_demo(config, bank=bank, tasks=TASKS)
    first = result["rows"][0]
    assert first["method"] == "pre-trained + head of alpha"
    target = synthetic.loader("gamma", seed=CONFIG.seed)
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    expected = accuracy(bank.base(), bank.head("alpha"), target.test, CONFIG.resolution, **norm)
    assert first["test_acc"] == pytest.approx(expected, abs=1e-6)
    assert result["bank"]["sources"] == ["alpha", "beta"]  # the donor's vector stays; the target's does not

    real_meta = bank.meta
    monkeypatch.setattr(bank, "meta", lambda t: {**real_meta(t), "classes": ["x"] * 4} if t == "alpha" else
                        real_meta(t))
    with pytest.raises(ValueError, match="head_from='alpha' has classes"):
        run_demo(config, bank=bank, tasks=TASKS)


def test_head_choice_for_the_demo():
    assert resolve_head("emoji_twitter", "auto") == "emoji_google"  # the same nine classes, another style
    assert resolve_head("digits", "auto") == "digits"  # no partner: the target's own head
    assert resolve_head("emoji_twitter", "own") == "emoji_twitter"
    assert resolve_head("gamma", "alpha") == "alpha"
