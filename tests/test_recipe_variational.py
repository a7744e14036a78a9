"""The variational recipe end to end on a tiny seeded backbone and synthetic tasks: bookkeeping, not accuracy."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import synthetic
import torch

from taskvec.bank import Bank, BankConfig
from taskvec.compose import Composer
from taskvec.recipes.variational import VariationalRecipeConfig, run_variational
from taskvec.suites.vision import VisionSuite
from taskvec.variational import ELBOLoss, MultitaskELBOLoss, VariationalComposer, VariationalConfig
from taskvec.workflow import CoefficientSchedule, MultiTaskSetup

TASKS = ("alpha", "beta", "gamma")
CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=1, lr=3e-3, batch_size=16, pretrained=False)


def small(out, **changes) -> VariationalRecipeConfig:
    settings = dict(
        tasks=TASKS, targets=("gamma",), shots=(2, 4), seeds=(0, 1),
        addition=MultiTaskSetup(select_per_task=8, fit_per_task=12, epochs=2, batch_per_task=4),
        schedule=CoefficientSchedule(epochs=2, batch_size=8, min_steps_per_epoch=2),
        variational=VariationalConfig(hidden=(16,)), timing_batch=8, timing_rounds=1,
        out=out, progress=False, resume=False,
    )
    settings.update(changes)
    return VariationalRecipeConfig(**settings)


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Bank:
    return synthetic.built_bank(CONFIG, tmp_path_factory.mktemp("bank"), TASKS)


def on(bank: Bank) -> VisionSuite:
    return VisionSuite(bank, tasks=TASKS, progress=False)


@pytest.fixture(scope="module")
def result(bank, tmp_path_factory):
    return run_variational(small(tmp_path_factory.mktemp("variational")), suite=on(bank))


def test_both_parts_run_and_write_their_outputs(result):
    addition = result["addition"]
    assert addition["atlas"]["key"] == "atlas" and addition["variational"]["key"] == "variational"
    for row in (addition["atlas"], addition["variational"]):
        assert set(row["test_acc"]) == set(TASKS)
        assert all(0.0 <= a <= 1.0 for a in row["test_acc"].values())
    kept = addition["variational"]["kept_per_block"]
    assert len(kept) == 3 and all(0.0 <= f <= 1.0 for per_vector in kept for f in per_vector)
    assert 0.0 <= addition["variational"]["kept_fraction_avg"] <= 1.0
    methods = [row["method"] for row in addition["cost"]]
    assert methods[0] == "merged aTLAS" and "variational (vmap)" in methods
    assert all(row["ms_per_batch"] is None or row["ms_per_batch"] > 0 for row in addition["cost"])

    records = result["fewshot"]["records"]
    assert {(r["method"], r["k"], r["seed"]) for r in records} == {
        (m, k, s) for m in ("atlas", "variational") for k in (2, 4) for s in (0, 1)}
    # Both methods saw the same shots.
    for k in (2, 4):
        for s in (0, 1):
            pair = [r for r in records if r["k"] == k and r["seed"] == s]
            assert len({(r["train_images"], r["selection_images"]) for r in pair}) == 1
    files = result["files"]
    for key in ("json", "markdown", "kept_plot"):
        with open(files[key], "rb") as handle:
            assert handle.read(8)
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["addition"]["variational"]["test_acc"] == addition["variational"]["test_acc"]
    assert "variational (gated)" in result["table"] and "aTLAS (block)" in result["table"]


def test_seeds_reproduce_and_test_labels_never_steer_anything(bank, result, tmp_path):
    """Same seeds: identical numbers. Test labels permuted: identical selection and epochs (so test labels
    never reached training or selection); only test accuracies move."""

    poisoned = run_variational(small(tmp_path / "poisoned"),
                               suite=on(Bank(CONFIG, root=bank.root, loader=synthetic.relabelled_loader)))
    again = run_variational(small(tmp_path / "again"), suite=on(bank))

    def steering(payload):
        rows = [payload["addition"]["variational"], payload["addition"]["atlas"]]
        return ([(r["selection_acc"], r.get("best_epoch")) for r in rows]
                + [(r["method"], r["k"], r["seed"], r["selection_acc"], r["best_epoch"])
                   for r in payload["fewshot"]["records"]])

    assert steering(poisoned) == steering(result) == steering(again)
    assert again["addition"]["variational"]["test_acc"] == result["addition"]["variational"]["test_acc"]
    assert [r["test_acc"] for r in again["fewshot"]["records"]] == [r["test_acc"] for r in result["fewshot"]["records"]]
    assert poisoned["addition"]["variational"]["test_acc"] != result["addition"]["variational"]["test_acc"]


def test_resume_reuses_the_trained_inference_network(bank, tmp_path, monkeypatch):
    config = small(tmp_path, parts=("addition",), resume=True)
    first = run_variational(config, suite=on(bank))
    import taskvec.recipes.variational as recipe

    def refuse(*args, **kwargs):
        raise AssertionError("a finished part was retrained")

    monkeypatch.setattr(recipe.vx, "train_variational", refuse)
    monkeypatch.setattr(recipe, "train_multitask", refuse)
    second = run_variational(config, suite=on(bank))
    assert second["addition"]["variational"]["test_acc"] == first["addition"]["variational"]["test_acc"]


def test_bad_requests_fail_clearly(bank, tmp_path):
    with pytest.raises(ValueError, match="parts"):
        run_variational(small(tmp_path, parts=("nope",)), suite=on(bank))
    with pytest.raises(ValueError, match="targets"):
        run_variational(small(tmp_path, targets=("delta",)), suite=on(bank))
    with pytest.raises(ValueError, match="targets"):  # not among the suite's tasks, when tasks come from it
        run_variational(small(tmp_path, tasks=(), targets=("delta",)), suite=on(bank))
    with pytest.raises(ValueError, match="kl_warmup_fraction"):
        run_variational(small(tmp_path, kl_warmup_fraction=2.0), suite=on(bank))


def test_multitask_elbo_sums_the_per_task_elbos(base, bank_vectors):
    """Two parts through two heads: the loss is the sum over tasks of each task's mean per-sample ELBO,
    CE_t + beta * KL (issue 14: no 1/N on a per-sample latent's KL by default); the opt-in
    ``kl_normalizer="dataset"`` divides the KL by N."""
    heads = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)]
    x1, x2 = torch.randn(3, 6), torch.randn(5, 6)
    y1, y2 = torch.randint(0, 3, (3,)), torch.randint(0, 2, (5,))
    from taskvec.variational import spike_slab_kl

    for normalizer, divisor in (("sample", 1), ("dataset", 40)):
        torch.manual_seed(0)
        model = VariationalComposer(Composer(base, bank_vectors, "block"), feature_dim=4,
                                    config=VariationalConfig(hidden=(8,)))
        options = {} if normalizer == "sample" else {"kl_normalizer": "dataset"}
        loss = MultitaskELBOLoss(heads, num_train=40, kl_warmup_steps=0, **options)
        model.train()
        torch.manual_seed(1)
        got = loss(model, [(x1, y1), (x2, y2)])
        torch.manual_seed(1)
        x = torch.cat([x1, x2])
        output, posterior = model.forward_with_posterior(x, model.features(x), sample=True)
        ce = (torch.nn.functional.cross_entropy(heads[0](output[:3]), y1)
              + torch.nn.functional.cross_entropy(heads[1](output[3:]), y2))
        per_sample = spike_slab_kl(*posterior, 0.5, 1.0).flatten(1).sum(1)
        kl = per_sample[:3].mean() + per_sample[3:].mean()
        assert torch.allclose(got, ce + kl / divisor, atol=1e-5), normalizer
        assert loss.step == 1
    single = ELBOLoss(heads[0], num_train=40, kl_warmup_steps=0)
    with pytest.raises(ValueError, match="one \\(x, y\\) part per head"):
        loss(model, [(x1, y1)])
    assert single.step == 0


@pytest.fixture
def base():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4)).eval()


@pytest.fixture
def bank_vectors(base):
    from taskvec.vectors import TaskVector

    vectors = []
    for i in range(2):
        generator = torch.Generator().manual_seed(i + 1)
        tuned = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()}
        vectors.append(TaskVector.from_state_dicts(base.state_dict(), tuned, name=f"v{i}"))
    return vectors


def test_cli_builds_the_config(monkeypatch):
    import taskvec.recipes.variational as recipe
    from taskvec.cli import main

    seen = {}

    def fake(config, **kwargs):
        seen["config"] = config
        seen["suite"] = kwargs["suite"]
        return {"table": "t", "files": {"json": "a", "markdown": "b"}}

    monkeypatch.setattr(recipe, "run_variational", fake)
    assert main(["run", "variational", "--parts", "fewshot", "--shots", "4", "--seeds", "0", "--lr", "0.05",
                 "--p-threshold", "0.7", "--method", "vmap", "--no-progress", "--epochs", "3",
                 "--fewshot-epochs", "2"]) == 0
    config = seen["config"]
    assert config.parts == ("fewshot",) and config.shots == (4,) and config.seeds == (0,)
    assert config.lr == 0.05 and config.variational.p_threshold == 0.7 and config.variational.method == "vmap"
    assert replace(config, parts=VariationalRecipeConfig().parts).progress is False
    assert seen["suite"].name == "vision"
    assert config.addition.epochs == 3 and config.schedule.epochs == 2  # nested settings from their options
    assert config.addition.fit_per_task == MultiTaskSetup().fit_per_task
