"""The few-shot pieces the recipe takes from the library: grid tables with mean +- s.e. cells, paired
summaries, logit scores, heads fitted on shot features with selection on the selection shots, and the
few-shot job (shots from the suite's pool, shared work made once), each against hand-made oracles."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from taskvec.data import ImageSet
from taskvec.evaluate import logit_scores
from taskvec.experiment import grid_report, grid_table, mean_se_cell, paired_summary, runtime_rows
from taskvec.heads import LinearHead
from taskvec.workflow import (
    CoefficientSchedule,
    FewShotJob,
    FewShotTarget,
    ShotFeatures,
    fit_lpp_on_shots,
    fit_probe_on_shots,
    fit_tip_on_shots,
    suite_scoring_head,
)


def test_mean_se_cells_and_the_grid_table():
    assert mean_se_cell(0.815, 0.004) == "81.5 ± 0.4"
    assert mean_se_cell(0.1, float("nan"), signed=True) == "+10.0"
    assert mean_se_cell(-0.031, None, signed=True) == "-3.1"
    assert mean_se_cell(float("nan"), 0.1) == "" and mean_se_cell(None, None) == ""
    rows = [{"method": "a", "k": 1, "mean": 0.5, "se": 0.01}, {"method": "a", "k": 4, "mean": 0.75, "se": float("nan")},
            {"method": "b", "k": 4, "mean": 0.9, "se": 0.02}]
    table = grid_table(rows, row_key="method", column_key="k", row_order=["b", "a"], columns=[1, 4],
                       labels={"a": "Alpha"}, column_label="k={}")
    assert table == ("| method | k=1 | k=4 |\n|---|---|---|\n| b |  | 90.0 ± 2.0 |\n"
                     "| Alpha | 50.0 ± 1.0 | 75.0 |")


def test_paired_summary_is_the_textbook_mean_and_standard_error():
    records = [{"k": 4, "x": x, "y": y} for x, y in [(0.5, 0.25), (0.75, 0.5), (1.0, 0.5)]]
    records.append({"k": 16, "x": 0.5, "y": 0.5})
    rows, table = paired_summary(records, by="k", columns={"x": "X"}, changes={"gain": ("x", "y", "X − Y")})
    diffs = [0.25, 0.25, 0.5]
    assert rows[0]["k"] == 4 and rows[0]["seeds"] == 3
    assert rows[0]["x"] == pytest.approx((0.75, statistics.stdev([0.5, 0.75, 1.0]) / math.sqrt(3)))
    assert rows[0]["gain"] == pytest.approx((statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(3)))
    assert rows[1]["k"] == 16 and math.isnan(rows[1]["gain"][1])
    assert "| 4 | 75.0 ± 14.4 | +33.3 ± 8.3 |" in table and "| 16 | 50.0 | +0.0 |" in table


def test_runtime_rows_and_grid_report_sections():
    records = [{"target": t, "method": m, "k": 2, "seed": s, "seconds": sec, "acc": acc}
               for t, m, s, sec, acc in [("t1", "a", 0, 1.0, 0.5), ("t1", "a", 1, 3.0, 0.7), ("t2", "a", 0, 2.0, 0.9),
                                         ("t2", "a", 1, 2.0, 0.9)]]
    assert runtime_rows(records, {"a": "A", "b": "B"}) == [
        {"method": "A", "runs": 4, "mean_seconds": 2.0, "total_seconds": 8.0}]
    summaries, sections = grid_report(records, {"a": "A"}, [2], metrics={"acc": ""}, runtime="Runtime:")
    average = summaries["acc"]["average"][0]  # per seed mean over targets: 0.7 and 0.8
    assert average["mean"] == pytest.approx(0.75) and average["se"] == pytest.approx(0.05)
    text = "\n".join(sections)
    assert "| A | 75.0 ± 5.0 |" in text and "**t1**" in text and "**t2**" in text and "Runtime:" in text


def test_logit_scores_accuracy_and_balanced_accuracy():
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    split = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 1, 1]))
    scores = logit_scores(logits, split)
    assert scores["acc"] == pytest.approx(0.75)
    assert scores["balanced_acc"] == pytest.approx((1.0 + 2 / 3) / 2)  # class 0: 1/1, class 1: 2/3


def _clusters(per_class: int, seed: int, classes: int = 3, dim: int = 8) -> tuple[torch.Tensor, ImageSet]:
    """Features in tight clusters around one axis per class, and a split carrying their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = torch.eye(dim)[labels] * 3 + 0.05 * torch.randn(len(labels), dim, generator=g)
    return feats, ImageSet(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels)


def test_probe_weight_decay_is_chosen_on_the_selection_shots():
    train_f, train = _clusters(3, 0)
    val_f, val = _clusters(2, 1)
    feats = ShotFeatures(train_f, val_f)
    for decays in [(1e-4, 1e3), (1e3, 1e-4)]:  # a huge decay flattens the logits: 1/3 right on val
        _, selection, detail = fit_probe_on_shots(feats, train, val, 3, decays, default_decay=0.5)
        assert detail["weight_decay"] == 1e-4 and selection == 1.0
    _, selection, detail = fit_probe_on_shots(ShotFeatures(train_f, None), train, None, 3, (1e-4,), 0.5)
    assert selection is None and detail["weight_decay"] == 0.5  # k = 1: nothing to select on


def test_tip_adapter_is_switched_on_where_the_selection_shots_say_the_head_is_wrong():
    train_f, train = _clusters(3, 0)
    val_f, val = _clusters(2, 1)
    wrong = LinearHead.from_weights(torch.eye(8)[[1, 2, 0]], torch.zeros(3)).freeze()  # every class shifted by one
    assert (wrong(val_f).argmax(-1) == val.labels).float().mean() == 0
    _, selection, detail = fit_tip_on_shots(ShotFeatures(train_f, val_f), train, val, wrong)
    assert detail["alpha"] > 0 and selection == 1.0
    _, selection, detail = fit_tip_on_shots(ShotFeatures(train_f, None), train, None, wrong)
    assert selection is None and (detail["alpha"], detail["beta"]) == (1.0, 5.5)  # TipAdapter's defaults


def test_lpp_on_shots_lowers_its_loss_and_reports_the_selection_accuracy():
    train_f, train = _clusters(3, 0)
    val_f, val = _clusters(2, 1)
    head = LinearHead.from_weights(torch.eye(8)[[0, 1, 2]] * 0.1, torch.zeros(3)).freeze()
    model, selection, detail = fit_lpp_on_shots(ShotFeatures(train_f, val_f), train, val, head, iterations=20)
    assert detail["final_loss"] == model.train_losses[-1] < model.train_losses[0]
    assert selection == pytest.approx(float((model(val_f).argmax(-1) == val.labels).float().mean()))


class _Suite:
    """A suite over feature vectors (the 'backbone' is the identity on flattened inputs)."""

    def __init__(self) -> None:
        self.tasks = ("t", "u", "v")
        self.calls: list[str] = []
        self.classes = {"t": ["a", "b", "c"], "u": ["a", "b", "c"], "v": ["x", "y", "z"]}

    def splits(self, name):
        def part(per_class, seed):
            feats, split = _clusters(per_class, seed)
            return ImageSet((feats * 10).round().clamp(0, 255).to(torch.uint8).view(len(feats), 1, 1, 8),
                            split.labels)
        return SimpleNamespace(train=part(5, 0), val=part(8, 1), test=part(4, 2), classes=self.classes[name])

    def head(self, name):
        return LinearHead.from_weights(torch.eye(8)[:3], torch.zeros(3)).freeze()

    def vectors(self, tasks):
        self.calls.append("vectors:" + ",".join(tasks))
        return []

    def features(self, model, split):
        self.calls.append("features")
        return model(split.images.float().flatten(1))

    def few_shot_pool(self, task):
        return task.val


def test_few_shot_job_draws_from_the_pool_and_makes_shared_work_once():
    suite = _Suite()
    target = FewShotTarget(suite, nn.Identity(), "t", suite.tasks)
    job = FewShotJob(target, 4, 0, CoefficientSchedule())
    pool_rows = {bytes(x.numpy()) for x in target.splits.val.images}
    assert {bytes(x.numpy()) for x in job.train.images} | {bytes(x.numpy()) for x in job.val.images} <= pool_rows
    assert len(job.train) == 9 and len(job.val) == 3  # k = 4 per class, one per class held out
    first = job.features("pre", lambda: job.base)
    assert job.features("pre", lambda: job.base) is first and suite.calls.count("features") == 2  # train + val
    assert set(job.costs) == {"pre"} and job.costs["pre"] >= 0
    assert target.vectors == [] and suite.calls[-1] == "vectors:u,v"  # leave-one-out


def test_a_borrowed_head_must_share_the_targets_classes():
    suite = _Suite()
    assert suite_scoring_head(suite, "t", "u")[0] == "u"
    assert suite_scoring_head(suite, "t", "own")[0] == "t"
    with pytest.raises(ValueError, match="head_from='v' has classes"):
        suite_scoring_head(suite, "t", "v")
