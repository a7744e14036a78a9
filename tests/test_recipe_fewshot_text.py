"""The few-shot recipe on the tiny generated text suite (tests/test_suite_text.py): every method runs,
the pre-trained row equals a hand oracle (Hugging Face BertModel pooling x the zero-shot head), shots come
from the target's training split, the target's vector is never requested, and `--suite text` reaches the
recipe through the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("transformers")

import test_suite_text as text_fixtures
from test_recipe_fewshot import SpySuite
from test_suite_text import TINY, _oracle_embeddings, fake_task, make_suite

from taskvec.cli import main
from taskvec.evaluate import logit_scores
from taskvec.recipes.fewshot import METHODS, FewShotConfig, run_fewshot

tiny = text_fixtures.tiny  # the tiny BERT + tokenizer fixture
SHOTS = (1, 2)


def test_every_method_runs_on_the_text_suite_with_shots_from_the_training_split(tiny, tmp_path):
    spy = SpySuite(make_suite(tiny, tmp_path / "bank"))
    evaluated = []

    def evaluator(logits, split):
        evaluated.append(split)
        return logit_scores(logits, split)

    config = FewShotConfig(targets=("gamma",), shots=SHOTS, seeds=(0,), epochs=1, batch_size=4,
                           min_steps_per_epoch=2, lpp_iterations=5, out=tmp_path / "out", progress=False)
    result = run_fewshot(config, suite=spy, evaluator=evaluator)

    records = result["records"]
    assert {(r["k"], r["method"]) for r in records} == {(k, m) for k in SHOTS for m in METHODS}
    for r in records:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["test_bal"] <= 1.0
        assert r["train_images"] + r["selection_images"] == 3 * r["k"]
    # The pre-trained row: BertModel's masked-mean embeddings (an independent implementation) through the
    # zero-shot head, which is made from class names alone.
    task = fake_task("gamma")
    head = spy.suite.zero_shot_head(task, spy.suite.backbone())
    oracle = (_oracle_embeddings(tiny[0], tiny[1], task.test.texts) @ head.weight.T).argmax(-1)
    expected = float((oracle == task.test.labels).float().mean())
    assert all(r["test_acc"] == pytest.approx(expected, abs=1e-6) for r in records if r["method"] == "pretrained")

    train, test = set(task.train.texts), set(task.test.texts)
    for kind, split in spy.seen:
        assert kind != "scores"
        if set(split.texts) == test:
            assert kind != "train"
            continue
        assert set(split.texts) <= train, f"{kind}: a split not drawn from the training split"
        assert max(split.labels.bincount().tolist()) <= max(SHOTS)
    assert len(evaluated) == len(SHOTS) * len(METHODS)
    assert all("gamma" not in request for request in spy.vector_requests)
    assert "zero-shot head" in result["table"] and "Out-of-distribution check skipped" in result["table"]
    assert "Balanced accuracy" in result["table"]


def test_suite_text_reaches_the_fewshot_recipe_through_the_cli(tiny, tmp_path, monkeypatch, capsys):
    from taskvec import validate
    from taskvec.suites import text as text_suite

    def factory(**kwargs):
        kwargs["root"] = kwargs.get("root") or tmp_path / "bank"  # --bank-root absent: None, never the user's cache
        kwargs["config"] = dataclasses.replace(TINY, seed=kwargs.get("config", TINY).seed)
        kwargs["tasks"] = ("alpha", "beta", "gamma")  # the fake tasks stand in for the registered ones
        return make_suite(tiny, **kwargs)

    monkeypatch.setattr(text_suite, "TextSuite", factory)
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(validate, "_tasks", lambda suite="vision": ["alpha", "beta", "gamma"])
    out = tmp_path / "out"
    assert main(["run", "fewshot", "--suite", "text", "--targets", "gamma", "--shots", "2", "--seeds", "0",
                 "--epochs", "1", "--batch-size", "4", "--min-steps-per-epoch", "2", "--lpp-iterations", "5",
                 "--quiet", "--out", str(out)]) == 0
    assert "aTLAS + LP++" in capsys.readouterr().out
    saved = json.loads((out / "fewshot.json").read_text())
    assert saved["config"]["suite"]["suite"] == "text"
    assert {r["method"] for r in saved["records"]} == set(METHODS)
    assert (out / "fewshot_accuracy.png").is_file()
