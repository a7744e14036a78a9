"""`taskvec run selection` end to end on the tiny vision bank and the tiny text suite, with a planted best
vector: the bank holds a twin of the held-out target (same data under another name), so the informed rules
must keep the twin at N = 1; the kept bytes are the kept vectors' sizes; the ``all`` row is plain aTLAS."""

from __future__ import annotations

import pytest
import synthetic
from test_suite_text import (
    CLASSES,
    fake_task,
    make_suite,
    tiny,  # noqa: F401  (the tiny BERT fixture, reused)
)

from taskvec.bank import Bank, BankConfig
from taskvec.heldout import HeldOutTarget
from taskvec.recipes.selection import SelectionConfig, run_selection
from taskvec.suites.vision import VisionSuite
from taskvec.workflow import learn_atlas

CONFIG = BankConfig(backbone="tiny_cnn", resolution=16, epochs=2, lr=3e-3, batch_size=16, pretrained=False)
# "agmma" has gamma's letters: synthetic tasks draw templates and samples from the letters' code sum, so it
# is gamma's data under another name, and its vector was fine-tuned on exactly the target's task.
TASKS = ("alpha", "agmma", "beta", "gamma")


def _config(out, **overrides) -> SelectionConfig:
    settings = dict(target="gamma", shots=(4,), seeds=(0,), keep=(1, 2), epochs=2, batch_size=64, min_steps=2,
                    augmentation="none", feature_samples=16, out=out, progress=False)
    settings.update(overrides)
    return SelectionConfig(**settings)


def _records(result: dict) -> dict:
    return {(r["method"], r["n"]): r for r in result["records"]}


def _plain_atlas(suite, config: SelectionConfig) -> float:
    ctx = HeldOutTarget(suite, config.target)
    train, val = ctx.shots(config.shots[0], 0)
    merged, _, _ = learn_atlas(suite.backbone(), ctx.vectors(), ctx.head, train, val, suite, config.schedule(0), 0,
                               progress=False)
    return ctx.test_scores(merged)["acc"]


def test_selection_on_the_vision_bank_keeps_the_planted_twin(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    bank = Bank(CONFIG, root=root, loader=synthetic.loader)
    assert synthetic.make_task("agmma").test.images.equal(synthetic.make_task("gamma").test.images)
    bank.build(TASKS, progress=False)
    suite = VisionSuite(bank, tasks=TASKS, progress=False)
    config = _config(tmp_path_factory.mktemp("out"))
    result = run_selection(config, suite=suite)
    records = _records(result)
    for method in ("features", "gradient"):
        assert records[(method, 1)]["kept"] == ["agmma"], records[(method, 1)]["scores"]
    assert 1 in records[("blockwise", 1)]["sources"][0].values()  # the twin (source 1) lends blocks
    size = sum(t.numel() * t.element_size() for t in bank.vectors(["alpha"])[0].tensors.values())
    for (method, n), record in records.items():
        assert record["kept_bytes"] == n * size and record["bank_bytes"] == 3 * size
        if method != "blockwise":  # blockwise lists every vector that lends a block
            assert len(record["kept"]) == n
    assert len(set(records[("random", 2)]["kept"])) == 2
    assert records[("all", 3)]["test_acc"] == pytest.approx(_plain_atlas(suite, config))
    assert "N=2" in (config.out / "selection.md").read_text() and (config.out / "selection.png").is_file()


def test_selection_on_the_text_suite_keeps_the_planted_twin(tiny, tmp_path, monkeypatch):  # noqa: F811 (the imported fixture)
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(CLASSES, "beta_twin", CLASSES["beta"])
    suite = make_suite(tiny, tmp_path / "bank", tasks=("alpha", "beta_twin", "gamma", "beta"),
                       task_loader=lambda name, seed=0: fake_task(name, seed))
    config = _config(tmp_path / "out", target="beta", shots=(2,), keep=(1,), methods=("features", "random", "all"))
    result = run_selection(config, suite=suite)
    records = _records(result)
    assert records[("features", 1)]["kept"] == ["beta_twin"], records[("features", 1)]["scores"]
    assert records[("all", 3)]["test_acc"] == pytest.approx(_plain_atlas(suite, config))


def test_selection_config_names_the_bad_value():
    with pytest.raises(ValueError, match="keep"):
        SelectionConfig(keep=(0,))
    with pytest.raises(ValueError, match="similarity"):
        SelectionConfig(methods=("similarity",))
