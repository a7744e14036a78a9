"""The test-time adaptation recipe end to end on a tiny seeded backbone and synthetic tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import synthetic
import torch

import taskvec.recipes.tta as tta
from taskvec.bank import Bank, BankConfig
from taskvec.batching import unlabelled_loader
from taskvec.data import ImageSet, Task
from taskvec.evaluate import accuracy
from taskvec.experiment import mean_se
from taskvec.norm_tuning import norm_affine_model
from taskvec.objectives import TrustedTargets
from taskvec.recipes.tta import OBJECTIVES, TUNED, TTAConfig, run_tta
from taskvec.suites.vision import VisionSuite

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=2, lr=3e-3, batch_size=16, pretrained=False)
NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
TARGETS, SEEDS = ("gamma", "beta"), (0, 1)


def small_config(out, **overrides) -> TTAConfig:
    settings = dict(targets=TARGETS, seeds=SEEDS, epochs=2, batch_size=16, out=out, progress=False, resume=False)
    settings.update(overrides)
    return TTAConfig(**settings)


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Bank:
    return synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)


def suite_of(bank: Bank) -> VisionSuite:
    return VisionSuite(bank, tasks=TASKS, progress=False)


@pytest.fixture(scope="module")
def result(bank, tmp_path_factory):
    return run_tta(small_config(tmp_path_factory.mktemp("tta")), suite=suite_of(bank))


def _steering(records) -> list:
    """Everything adaptation produced before the final evaluation."""
    return [(r["target"], r["method"], r["seed"], json.dumps(r["detail"], sort_keys=True)) for r in records]


class GuardedLabels(ImageSet):
    """An ImageSet whose labels may be read only by ``logit_scores`` (the final evaluation)."""

    reads: ClassVar[list[str]] = []

    @property
    def labels(self) -> torch.Tensor:
        caller = sys._getframe(1).f_code.co_name
        if caller not in ("__post_init__", "__init__"):
            GuardedLabels.reads.append(caller)
        return self._labels

    @labels.setter
    def labels(self, value: torch.Tensor) -> None:
        self._labels = value


def guarded_loader(name: str, *, seed: int = 0) -> Task:
    task = synthetic.loader(name, seed=seed)
    task.test = GuardedLabels(task.test.images, task.test.labels)
    return task


def test_every_run_is_recorded_and_written(result, bank):
    records = result["records"]
    assert len(records) == len(TARGETS) * len(SEEDS) * len(TUNED) * len(OBJECTIVES)
    base = bank.base()
    for target in TARGETS:
        task = synthetic.loader(target, seed=CONFIG.seed)
        expected = accuracy(base, bank.head(target), task.test, 16, **NORM)
        assert result["pretrained"][target] == pytest.approx(expected)
        for r in (r for r in records if r["target"] == target):
            assert r["change"] == pytest.approx(r["test_acc"] - expected)
            assert r["adaptation_inputs"] == len(task.test)
            assert r["detail"]["best_epoch"] == 2  # fixed epochs: the last one is kept
            assert len(r["detail"]["losses"]) == 2
    optimizers = {r["tuned"]: r["detail"]["optimizer"] for r in records}
    assert optimizers == {"atlas": "AdamW(lr=0.01)", "norm": "SGD(lr=0.00025, momentum=0.9)"}
    for r in records:
        assert 1 <= r["spread"]["classes_predicted"] <= r["classes"] == 4
    trainable = {r["tuned"]: r["detail"]["trainable"] for r in records}
    bn = sum(m.weight.numel() + m.bias.numel() for m in base.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert trainable["norm"] == bn
    assert trainable["atlas"] == 2 * sum(1 for _ in base.parameters())  # two vectors x every block
    # Averages: per seed the mean over targets, then mean +- s.e. over seeds.
    assert set(result["summary"]["change"]) == {r["method"] for r in records}
    for method, row in result["summary"]["change"].items():
        per_seed = [sum(r["change"] for r in records if r["method"] == method and r["seed"] == s) / 2
                    for s in SEEDS]
        assert (row["average"]["mean"], row["average"]["se"]) == pytest.approx(mean_se(per_seed))
    files = result["files"]
    saved = json.loads(Path(files["json"]).read_text())
    assert [r["test_acc"] for r in saved["records"]] == [r["test_acc"] for r in records]
    table = Path(files["markdown"]).read_text()
    assert table.startswith("Test-time adaptation") and "Subset of targets" in table
    assert "| aTLAS (block) + UFM |" in table and "| BN affine + Tent |" in table and "| pre-trained |" in table
    assert "collapse check" in table
    assert Path(files["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_seeds_reproduce(bank, result, tmp_path):
    again = run_tta(small_config(tmp_path), suite=suite_of(bank))
    assert [(r["method"], r["test_acc"]) for r in again["records"]] == [
        (r["method"], r["test_acc"]) for r in result["records"]]
    assert _steering(again["records"]) == _steering(result["records"])


@pytest.mark.parametrize("selection", ["fixed", "objective"])
def test_labels_are_read_only_by_the_final_evaluation(bank, tmp_path, selection):
    """Two proofs: (1) a spy on the test split's labels sees reads only from the final scoring, once per
    target for the pre-trained model and once per run; (2) with the test labels permuted, every loss,
    coefficient and selected epoch is identical, only the accuracies move."""
    GuardedLabels.reads = []
    guarded = Bank(CONFIG, root=bank.root, loader=guarded_loader)
    config = small_config(tmp_path / "guarded", targets=("gamma",), seeds=(0,), selection=selection)
    clean = run_tta(config, suite=suite_of(guarded))
    runs = len(TUNED) * len(OBJECTIVES)
    assert GuardedLabels.reads == ["logit_scores"] * (1 + runs)

    config = small_config(tmp_path / "poisoned", targets=("gamma",), seeds=(0,), selection=selection)
    poisoned = run_tta(config, suite=suite_of(Bank(CONFIG, root=bank.root, loader=synthetic.relabelled_loader)))
    assert _steering(poisoned["records"]) == _steering(clean["records"])
    assert poisoned["pretrained"]["gamma"] != clean["pretrained"]["gamma"]


def test_adaptation_keeps_normalisation_statistics_frozen(bank):
    base = bank.base()
    task = synthetic.loader("gamma")
    head = bank.head("gamma").freeze()
    vectors = bank.vectors(["alpha", "beta"])
    config = TTAConfig(epochs=1, batch_size=16, progress=False)
    suite = suite_of(bank)
    for tuned in TUNED:
        model, _ = tta.adapt(tuned, "tent", base, vectors, head, suite.unlabelled(task.test), suite, config, 0, None)
        for (name, mine), (_, theirs) in zip(model.named_buffers(), base.named_buffers(), strict=True):
            assert torch.equal(mine, theirs), f"{tuned}: buffer {name} changed"
    model = norm_affine_model(base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".weight", ".bias")) for n in trainable)
    assert all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.BatchNorm2d) for n in trainable)


def test_ufm_batches_mix_the_two_streams():
    images = torch.randint(0, 255, (40, 3, 12, 12), dtype=torch.uint8)
    trusted = (torch.tensor([3, 7, 11, 20]), torch.tensor([0, 1, 2, 3]))
    loader = unlabelled_loader(images, 16, NORM, 8, trusted)
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == len(loader) == 9  # 36 untrusted / 4 per batch
    pseudo = dict(zip(trusted[0].tolist(), trusted[1].tolist(), strict=True))
    for x, trusted_targets in batches:
        assert isinstance(trusted_targets, TrustedTargets)  # never a plain tensor that could be labels
        targets = trusted_targets.targets
        assert x.shape == (8, 3, 16, 16)
        assert (targets[:4] == -1).all() and (targets[4:] >= 0).all()
        assert set(targets[4:].tolist()) <= set(pseudo.values())
    plain = unlabelled_loader(images[:33], 16, NORM, 8)
    sizes = [len(x) for x in plain.epoch(torch.Generator().manual_seed(0))]
    assert sizes == [8, 8, 8, 9] and len(plain) == 4  # a trailing single input joins the last batch


def test_prediction_spread_sees_collapse_without_labels():
    collapsed = torch.tensor([[4.0, 0.0, 0.0]] * 6)
    balanced = torch.eye(3).repeat(2, 1) * 4.0
    assert tta.prediction_spread(collapsed)["classes_predicted"] == 1
    assert tta.prediction_spread(collapsed)["marginal_entropy"] < 0.3
    assert tta.prediction_spread(balanced) == {"classes_predicted": 3, "marginal_entropy": pytest.approx(1.0)}


def test_bad_requests_fail_clearly(bank, tmp_path):
    with pytest.raises(ValueError, match="objectives"):
        run_tta(small_config(tmp_path, objectives=("tent", "magic")), suite=suite_of(bank))
    with pytest.raises(ValueError, match="bank tasks"):
        run_tta(small_config(tmp_path, targets=("delta",)), suite=suite_of(bank))


def test_cli_options(monkeypatch):
    from taskvec.cli import build_parser

    captured = {}

    def fake(config, *, suite=None):
        captured["config"], captured["suite"] = config, suite
        return {"table": "t", "files": {"json": "j", "markdown": "m", "plot": "p"}, "seconds": 0.0}

    monkeypatch.setattr(tta, "run_tta", fake)
    args = build_parser().parse_args(["run", "tta", "--targets", "digits", "--objectives", "tent", "ufm",
                                      "--tuned", "atlas", "--epochs", "3", "--selection", "objective", "--quiet",
                                      "--ufm-threshold", "0.9", "--trusted-k", "7"])
    assert args.run(args) == 0
    config = captured["config"]
    assert (config.targets, config.objectives, config.tuned) == (("digits",), ("tent", "ufm"), ("atlas",))
    assert config.epochs == 3 and config.selection == "objective" and not config.progress
    assert (config.ufm_threshold, config.trusted_k) == (0.9, 7)
    assert captured["suite"].name == "vision"


transformers = pytest.importorskip("transformers")
import test_suite_text  # noqa: E402
from test_suite_text import TINY, make_suite  # noqa: E402

tiny = test_suite_text.tiny  # the tiny generated BERT + word tokenizer (a fixture)


def test_suite_text_reaches_tta_with_every_objective_and_the_layernorm_baseline(tiny, tmp_path, monkeypatch):
    """`--suite text` on the tiny generated encoder: aTLAS and the LN-affine row with all four objectives."""
    import dataclasses

    from taskvec import validate
    from taskvec.cli import main
    from taskvec.suites import text as text_suite

    made = []

    def factory(**kwargs):
        kwargs.setdefault("root", tmp_path / "bank")
        kwargs["config"] = dataclasses.replace(TINY, seed=kwargs.get("config", TINY).seed)
        kwargs["tasks"] = ("alpha", "beta", "gamma")  # the fake tasks stand in for the suite's own
        made.append(make_suite(tiny, **kwargs))
        return made[-1]

    monkeypatch.setattr(text_suite, "TextSuite", factory)
    monkeypatch.setattr(validate, "_tasks", lambda suite="vision": ["alpha", "beta", "gamma"])  # the fake tasks
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tta"
    assert main(["run", "tta", "--suite", "text", "--targets", "gamma", "--epochs", "1", "--batch-size", "4",
                 "--trusted-k", "1", "--quiet", "--out", str(out)]) == 0
    suite = made[-1]
    result = json.loads((out / "tta.json").read_text())
    records = result["records"]
    labels = {f"{t} + {o}" for t in ("aTLAS (block)", "LN affine") for o in ("Tent", "SAR", "SimCLR", "UFM")}
    assert {r["method"] for r in records} == labels and len(records) == 8
    assert result["suite"]["suite"] == "text"
    base = suite.backbone()
    head, test = suite.head("gamma"), suite.splits("gamma").test
    expected = suite.scores(base, head, test)  # the zero-shot head on the pre-trained encoder
    layer_norms = sum(p.numel() for m in base.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters())
    blocks = sum(1 for _ in base.parameters())
    for r in records:
        assert r["pretrained_acc"] == pytest.approx(expected["acc"])
        assert r["pretrained_balanced_acc"] == pytest.approx(expected["balanced_acc"])
        assert r["change"] == pytest.approx(r["test_acc"] - expected["acc"])
        assert r["adaptation_inputs"] == len(test) and r["classes"] == 3
        assert r["detail"]["trainable"] == (layer_norms if r["tuned"] == "norm" else 2 * blocks)
        assert all(loss == loss for loss in r["detail"]["losses"])  # finite: every objective ran on tokens
    assert r["trusted_per_class"] == 1
    moved = [r for r in records if r["tuned"] == "atlas" and r["detail"]["max_abs_coefficient"] > 0]
    assert moved, "no objective moved a coefficient"
    for r in records:  # leave-one-out: the target's own vector is not composed
        assert set(r["detail"].get("mean_coefficient_per_vector", {"alpha": 0, "beta": 0})) == {"alpha", "beta"}
    table = (out / "tta.md").read_text()
    assert "| LN affine + UFM |" in table and "| pre-trained |" in table
