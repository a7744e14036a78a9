"""What the addition and negation recipes take from the library, each against an independent oracle:
the TIES scale search, normalised accuracy, per-vector means, the standard + linearised suite pair,
AdaMerging over a multi-task context (blind to labels), the negation job and its two methods, the
per-suite controls, report publishing and bank labels."""

from __future__ import annotations

import json

import pytest
import synthetic
import torch
from conftest import make_bank, make_base
from test_recipe_addition import CONFIG, TASKS, recipe_banks

from taskvec.adamerging import AdaMergingConfig
from taskvec.bank import Bank, BankConfig
from taskvec.batching import split_validation
from taskvec.compose import Composer
from taskvec.control import (
    SUITE_CONTROLS,
    NegationJob,
    control_kept,
    default_control,
    learn_negation,
    negated_task_arithmetic,
    negation_score,
    suite_controls,
)
from taskvec.data import ImageSet
from taskvec.report import publish
from taskvec.suites.multitask import SuiteMultiTaskData
from taskvec.suites.text import TextBankConfig
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import (
    MultiTaskSetup,
    adamerge_tasks,
    banks_table,
    normalized_accuracy,
    per_vector_means,
    standard_and_linearized,
    ties_search,
)


@pytest.fixture(scope="module")
def banks(tmp_path_factory) -> tuple[Bank, Bank]:
    return recipe_banks(tmp_path_factory)


def test_normalized_accuracy_by_hand():
    row = normalized_accuracy({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.6, "c": 0.7})
    assert row["normalized"] == pytest.approx({"a": 0.5, "b": 1.5})
    assert row["avg_acc"] == pytest.approx(0.7) and row["avg_normalized"] == pytest.approx(1.0)
    assert row["test_acc"] == {"a": 0.5, "b": 0.9}
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        normalized_accuracy({"a": 0.5, "b": 0.9}, {"a": 1.0})


def test_ties_search_builds_ties_by_hand_and_keeps_the_best_scale():
    base = make_base()
    vectors = make_bank(base, 3)
    # Oracle for density 1 (nothing trimmed): per entry, the sign of the sum wins and the entries
    # that agree with it are averaged.
    hand = {}
    for name in vectors[0].names:
        stack = torch.stack([v.dense_block(name).float() for v in vectors])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        hand[name] = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    target = 0.6
    goal = {n: p.detach() + target * hand[n] for n, p in base.named_parameters() if n in hand}

    def score(model) -> float:  # highest where the model is base + 0.6 x the hand-made TIES vector
        return -sum(float((p.detach() - goal[n]).abs().sum()) for n, p in model.named_parameters() if n in goal)

    grid = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    scale, merged, table = ties_search(base, vectors, score, grid, density=1.0)
    assert scale == target and [a for a, _ in table] == list(grid)
    assert max(s for _, s in table) == dict(table)[target]
    for n, p in merged.named_parameters():
        if n in goal:
            torch.testing.assert_close(p.detach(), goal[n], atol=1e-5, rtol=1e-5)


def test_per_vector_means_by_hand():
    base = make_base()
    composer = Composer(base, make_bank(base, 2), "block")
    with torch.no_grad():
        composer.coefficients[0].copy_(torch.arange(composer.coefficients.shape[1], dtype=torch.float32))
        composer.coefficients[1].fill_(-0.5)
    n = composer.coefficients.shape[1]
    assert per_vector_means(composer) == pytest.approx({"task0": (n - 1) / 2, "task1": -0.5})


def test_vision_suite_linearized_and_the_suite_pair(banks, tmp_path):
    standard, linear = banks
    suite = VisionSuite(standard, tasks=TASKS)
    twin = suite.linearized()
    assert twin.bank.config == BankConfig(**{**CONFIG.__dict__, "linearized": True})
    assert twin.bank.root == standard.root.parent / twin.bank.config.key()  # beside the bank, as text's twin
    assert twin.tasks == TASKS and twin.bank.loader is standard.loader
    assert standard_and_linearized(suite, None, False, TASKS, progress=False) == [suite]
    pair = standard_and_linearized(suite, VisionSuite(linear, tasks=TASKS), True, TASKS, progress=False)
    assert [s.bank.config.linearized for s in pair] == [False, True]
    with pytest.raises(ValueError, match="not built with linearized=True"):
        standard_and_linearized(suite, suite, True, TASKS, progress=False)
    table = banks_table([standard, linear])
    assert set(table) == {"standard", "linearised"} and table["standard"]["root"] == str(standard.root)


def test_adamerge_tasks_never_reads_a_test_label(banks, tmp_path):
    standard, _ = banks
    suite = VisionSuite(standard, tasks=TASKS)
    setup = MultiTaskSetup(select_per_task=8, fit_per_task=8)
    settings = AdaMergingConfig(granularity="layer", steps=3, lr=1e-2, seed=0, progress=False)
    plain = SuiteMultiTaskData(suite, TASKS, setup)
    scrambled = SuiteMultiTaskData(suite, TASKS, setup)
    for t in TASKS:  # every test label replaced: AdaMerging sees inputs only, so nothing may change
        split = scrambled.test[t]
        scrambled.test[t] = ImageSet(split.images, torch.randint(0, 3, (len(split),),
                                                                 generator=torch.Generator().manual_seed(1)))
    one = adamerge_tasks(plain, settings, 4, tmp_path / "one.ckpt")
    two = adamerge_tasks(scrambled, settings, 4, tmp_path / "two.ckpt")
    assert not torch.equal(one.coefficients, torch.full_like(one.coefficients, settings.init))  # it moved
    assert torch.equal(one.coefficients, two.coefficients)
    assert one.coefficients.min() >= 0 and one.coefficients.max() <= 1  # clamped as AdaMerging's authors do
    assert not (tmp_path / "one.ckpt").exists()  # the checkpoint of a finished run is removed


def test_suite_controls_and_default_control():
    assert suite_controls("vision") == ("fashion_mnist", "mnist") == SUITE_CONTROLS["vision"]
    assert suite_controls("text") == ("bbc_news", "wordnet_noun")
    with pytest.raises(ValueError, match="'audio'"):
        suite_controls("audio")
    assert default_control("digits") == "fashion_mnist" and default_control("fashion_mnist") == "mnist"


def _job(standard: Bank, evaluator=None) -> tuple[NegationJob, VisionSuite]:
    suite = VisionSuite(standard, tasks=TASKS)
    return NegationJob(suite, "gamma", "beta", select_per_task=10, fit_per_task=14, seed=0,
                       evaluator=evaluator), suite


def test_negation_job_parts_reference_and_rule(banks):
    standard, _ = banks
    calls: list = []

    def spy(model, head, split):
        calls.append(split)
        return suite.accuracy(model, head, split)

    suite = VisionSuite(standard, tasks=TASKS)
    job = NegationJob(suite, "gamma", "beta", select_per_task=10, fit_per_task=14, seed=0, evaluator=spy)
    data = {t: synthetic.loader(t, seed=CONFIG.seed) for t in ("gamma", "beta")}
    for side, task in ((job.target, "gamma"), (job.control, "beta")):
        select, fit = split_validation(data[task].val, 10, 14, 0, task)
        assert torch.equal(side.select.images, select.images) and torch.equal(side.fit.images, fit.images)
        assert torch.equal(side.test.images, data[task].test.images)
    base = standard.base().eval()
    reference = suite.accuracy(base, standard.head("beta"), job.control.select)
    assert job.reference == reference and calls == [job.control.select]  # one call: the control's val part
    negated = standard.vector("gamma").apply_to(base, -2.0)
    target, control = (suite.accuracy(negated, standard.head(t), s.select)
                       for t, s in (("gamma", job.target), ("beta", job.control)))
    assert job.selection(negated) == negation_score(target, control, reference)
    assert job.trace == [{"target_val": target, "control_val": control}]
    assert job.test(negated) == (suite.accuracy(negated, standard.head("gamma"), data["gamma"].test),
                                 suite.accuracy(negated, standard.head("beta"), data["beta"].test))
    with pytest.raises(ValueError, match="fraction"):
        NegationJob(suite, "gamma", "beta", select_per_task=10, fit_per_task=14, seed=0, fraction=0.0)


def test_negated_task_arithmetic_picks_the_rule_s_best_alpha(banks):
    standard, _ = banks
    job, suite = _job(standard)
    grid = (0.0, -1.0, -3.0)
    model, detail = negated_task_arithmetic(job, grid)
    base = standard.base().eval()
    scores = []
    for alpha in grid:  # the rule recomputed here, alpha by alpha
        m = standard.vector("gamma").apply_to(base, alpha)
        target = suite.accuracy(m, standard.head("gamma"), job.target.select)
        control = suite.accuracy(m, standard.head("beta"), job.control.select)
        scores.append(negation_score(target, control, job.reference))
    assert detail["alpha"] == grid[scores.index(max(scores))]
    assert [row["score"] for row in detail["alpha_table"]] == scores
    assert control_kept(detail["control_val"], job.reference)  # alpha = 0 keeps it, so the choice does
    expected = standard.vector("gamma").apply_to(base, detail["alpha"])
    for (n, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_learn_negation_keeps_the_control_on_validation(banks, tmp_path):
    standard, _ = banks

    class Settings:
        epochs, lr, weight_decay, batch_size, bound, augmentation = 2, 0.2, 0.0, 7, "clamp", None
        seed, progress, resume = 0, False, True

    job, _ = _job(standard)
    composer, detail = learn_negation(job, Settings(), checkpoint=tmp_path / "n.ckpt")
    assert [h["epoch"] for h in detail["history"]] == [0, 1, 2] and 0 <= detail["best_epoch"] <= 2
    chosen = detail["val_trace"][detail["best_epoch"]]
    assert (detail["target_val"], detail["control_val"]) == (chosen["target_val"], chosen["control_val"])
    assert control_kept(detail["control_val"], job.reference)  # the untrained state competes
    assert detail["learned"] == composer.coefficients.numel() == sum(1 for _ in standard.base().parameters())
    assert not (tmp_path / "n.ckpt").exists()


def test_publish_writes_json_and_markdown_with_every_file(tmp_path):
    payload = {"rows": [{"a": 1.0}]}
    result = publish(tmp_path / "out", "thing", payload, "| a |", {"bars": "b.png"})
    saved = json.loads((tmp_path / "out" / "thing.json").read_text())
    assert saved["files"] == {"bars": "b.png", "json": str(tmp_path / "out" / "thing.json"),
                              "markdown": str(tmp_path / "out" / "thing.md")}
    assert saved["rows"] == [{"a": 1.0}] and "table" not in saved
    assert (tmp_path / "out" / "thing.md").read_text() == "| a |\n"
    assert result["table"] == "| a |" and result["files"] == saved["files"]


def test_bank_labels_name_backbone_and_input_size():
    assert BankConfig().label() == "mobilenet_v2 @ 48px"
    assert TextBankConfig().label() == f"hf-encoder @ {TextBankConfig().resolution} tokens"
