"""The variational recipe on the tiny generated text suite (tests/test_suite_text.py): both parts run,
the gated accuracy equals an oracle that composes one model per text (the composer's own forward, no
runner), the few-shot pool is the suite's choice, and `--suite text` reaches the recipe via the CLI."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import test_suite_text as text_fixtures
from test_suite_text import TINY, fake_task, make_suite

from taskvec.cli import main
from taskvec.compose import Composer
from taskvec.recipes.variational import VariationalRecipeConfig, run_variational
from taskvec.suites.text import pack
from taskvec.variational import VariationalComposer, VariationalConfig
from taskvec.workflow import CoefficientSchedule, MultiTaskSetup

tiny = text_fixtures.tiny  # the tiny BERT + tokenizer fixture
TASKS = ("alpha", "beta", "gamma")


def _config(out, **changes) -> VariationalRecipeConfig:
    settings = dict(
        targets=("gamma",), shots=(2,), seeds=(0,),
        addition=MultiTaskSetup(select_per_task=2, fit_per_task=3, epochs=1, batch_per_task=2),
        schedule=CoefficientSchedule(epochs=1, batch_size=4, min_steps_per_epoch=2),
        variational=VariationalConfig(hidden=(8,), method="linear", p_threshold=0.3), timing_batch=4,
        timing_rounds=1, out=out, progress=False, resume=False,
    )
    settings.update(changes)
    return VariationalRecipeConfig(**settings)


def test_both_parts_run_on_the_text_suite_and_the_gate_matches_per_text_models(tiny, tmp_path):
    suite = make_suite(tiny, tmp_path / "bank")
    result = run_variational(_config(tmp_path / "out"), suite=suite)

    addition = result["addition"]
    assert addition["tasks"] == list(TASKS)
    assert {r["method"] for r in addition["cost"]} >= {"merged aTLAS", "variational (linear)"}
    records = result["fewshot"]["records"]
    assert [(r["method"], r["k"]) for r in records] == [("atlas", 2), ("variational", 2)]
    assert all(r["train_images"] + r["selection_images"] == 3 * 2 for r in records)

    # Oracle: reload the trained inference network, then for every test text compose ONE model with that
    # text's gated coefficients through the composer's plain forward and score it with the zero-shot head.
    model = VariationalComposer(Composer(suite.backbone(), suite.vectors(list(TASKS)), "block"), feature_dim=32,
                                config=VariationalConfig(hidden=(8,), p_threshold=0.3))
    model.load_inference(tmp_path / "out" / "variational_addition_inference.safetensors")
    model.eval()
    _, tok = tiny
    for task in TASKS:
        split, head = fake_task(task).test, suite.head(task)
        correct = 0
        with torch.no_grad():
            for text, label in zip(split.texts, split.labels.tolist(), strict=True):
                enc = tok([text], return_tensors="pt")
                x = pack(enc["input_ids"], enc["attention_mask"])
                coefficients = model.gated(model.posterior(x))[0]
                correct += int(head(model.composer(x, coefficients=coefficients)).argmax(-1).item() == label)
        assert addition["variational"]["test_acc"][task] == pytest.approx(correct / len(split))
    assert 0.0 <= addition["variational"]["kept_fraction_avg"] <= 1.0


def test_each_suite_draws_shots_from_the_split_its_head_never_saw(tiny, tmp_path):
    """Text heads are zero-shot (never saw a label): shots come from training; vision heads are probes
    fitted on the training split: shots come from validation."""
    from taskvec.suites.vision import VisionSuite

    task = fake_task("gamma")
    assert make_suite(tiny, tmp_path).few_shot_pool(task) is task.train
    assert VisionSuite.for_images(16, {"mean": (0.5,) * 3, "std": (0.5,) * 3}).few_shot_pool(task) is task.val


def test_suite_flag_reaches_the_variational_recipe_through_the_cli(tiny, tmp_path, monkeypatch, capsys):
    from taskvec.suites import text as text_suite

    def factory(**kwargs):
        kwargs.update(root=tmp_path / "cli-bank", tasks=TASKS, config=TINY)
        return make_suite(tiny, **kwargs)

    monkeypatch.setattr(text_suite, "TextSuite", factory)
    from taskvec import validate  # the CLI checks task names against the registered ones: these stand in

    monkeypatch.setattr(validate, "_tasks", lambda suite="vision": list(TASKS))
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cli"
    assert main(["run", "variational", "--suite", "text", "--targets", "gamma", "--shots", "2", "--seeds", "0",
                 "--epochs", "1", "--select-per-task", "2", "--fit-per-task", "3", "--batch-per-task", "2",
                 "--fewshot-epochs", "1", "--batch-size", "4", "--min-steps-per-epoch", "2", "--method", "linear",
                 "--timing-batch", "4", "--timing-rounds", "1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "variational (gated)" in printed and "aTLAS (block)" in printed
    saved = json.loads((out / "variational.json").read_text())
    assert saved["suite"]["suite"] == "text" and saved["config"]["tasks"] == list(TASKS)
    assert {r["method"] for r in saved["fewshot"]["records"]} == {"atlas", "variational"}
