"""`--suite text` reaches the addition and negation recipes through the command line, on the tiny
generated text suite of tests/test_suite_text.py (a 2-layer BERT, word tokenizer, zero-shot heads)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from test_suite_text import TINY, fake_task, make_suite, tiny  # noqa: F401 (tiny is a fixture)

from taskvec.cli import main
from taskvec.suites import text as text_suite


@pytest.fixture()
def text_cli(tiny, tmp_path, monkeypatch):  # noqa: F811
    """``--suite text`` builds the tiny suite over tasks alpha and beta; returns the suites it made."""
    made = []

    def factory(**kwargs):
        kwargs["root"] = kwargs.get("root") or tmp_path / "bank"
        kwargs["tasks"] = ("alpha", "beta")
        suite = make_suite(tiny, **kwargs)
        made.append(suite)
        return suite

    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text_suite, "TextSuite", factory)
    from taskvec import validate

    monkeypatch.setattr(validate, "_tasks", lambda suite="vision": ["alpha", "beta", "gamma"])
    return made


def test_suite_text_reaches_addition(text_cli, tmp_path, capsys):
    out = tmp_path / "addition"
    assert main(["run", "addition", "--suite", "text", "--bank-root", str(tmp_path / "bank"), "--tasks", "alpha",
                 "beta", "--methods", "pretrained", "task_arithmetic", "--select-per-task", "2", "--fit-per-task", "3",
                 "--alpha-grid", "0", "0.5", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Task addition over 2 tasks (alpha, beta) on hf-encoder @ 128 tokens" in printed
    suite = text_cli[-1]
    assert suite.bank.root == tmp_path / "bank" and suite.bank.has("alpha") and suite.bank.has("beta")
    result = json.loads((out / "addition.json").read_text())
    assert result["config"]["bank"]["backbone"] == TINY.backbone and result["config"]["tasks"] == ["alpha", "beta"]
    rows = {r["key"]: r for r in result["rows"]}
    for task in ("alpha", "beta"):  # the pre-trained row is the text bank's zero-shot accuracy
        assert rows["pretrained"]["test_acc"][task] == pytest.approx(suite.bank.meta(task)["head_test_acc"])
    assert rows["task_arithmetic"]["alpha"] in (0.0, 0.5)
    assert result["config"]["sizes"]["alpha"]["test"] == len(fake_task("alpha").test)


def test_suite_text_reaches_negation_with_the_text_controls(text_cli, tmp_path, capsys):
    out = tmp_path / "negation"
    common = ["run", "negation", "--suite", "text", "--bank-root", str(tmp_path / "bank"), "--targets", "alpha",
              "--methods", "pretrained", "task_arithmetic", "--select-per-task", "2", "--fit-per-task", "3",
              "--alpha-grid", "0", "-1", "--quiet", "--out", str(out)]
    # Without --control the text suite's own control is asked for (this tiny suite does not have it).
    assert main(common) == 2
    assert "bbc_news" in capsys.readouterr().err
    assert main([*common, "--control", "beta", "--fallback-control", "alpha"]) == 0
    assert capsys.readouterr().out.startswith("Task negation on hf-encoder @ 128 tokens")
    result = json.loads((out / "negation.json").read_text())
    assert (result["config"]["control"], result["config"]["targets"]) == ("beta", ["alpha"])
    rows = {r["key"]: r for r in result["rows"]}
    suite = text_cli[-1]
    assert rows["pretrained"]["target_test"] == pytest.approx(suite.bank.meta("alpha")["head_test_acc"])
    assert rows["pretrained"]["control"] == "beta" and rows["task_arithmetic"]["alpha"] in (0.0, -1.0)
