"""The experiment layer: record store, fingerprint, job grid, statistics, CLI from a config dataclass."""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from taskvec.experiment import (
    RecordStore,
    add_config_arguments,
    config_from_args,
    fingerprint,
    grid,
    json_safe,
    mean_se,
    run_grid,
    summarize,
)


def test_record_store_resumes_only_under_the_same_fingerprint(tmp_path):
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, fingerprint({"lr": 0.1}))
    store.put("a", [{"method": "x", "acc": 0.5}, {"method": "y", "acc": float("nan")}])
    with path.open("a") as handle:
        handle.write('{"fingerprint": "cut')  # a line cut by a killed process
    again = RecordStore(path, fingerprint({"lr": 0.1}))
    assert again.get("a")[0] == {"method": "x", "acc": 0.5} and again.get("a")[1]["acc"] is None
    assert again.get_methods("a", ["x"]) == [{"method": "x", "acc": 0.5}]
    assert again.get_methods("a", ["x", "z"]) is None
    assert RecordStore(path, fingerprint({"lr": 0.2})).get("a") is None
    assert RecordStore(path, fingerprint({"lr": 0.1}), resume=False).get("a") is None
    assert fingerprint({"a": 1, "b": Path("x")}) == fingerprint({"b": "x", "a": 1})


def test_run_grid_runs_each_job_once(tmp_path):
    jobs = grid(target=["t1", "t2"], k=[1, 4], seed=[0])
    assert jobs[1] == {"target": "t1", "k": 4, "seed": 0} and len(jobs) == 4
    calls = []

    def job(spec):
        calls.append(spec)
        return {"value": spec["k"] * 10}

    store = RecordStore(tmp_path / "r.jsonl", "f")
    first = run_grid(jobs, job, store)
    second = run_grid(jobs, job, RecordStore(tmp_path / "r.jsonl", "f"))
    assert first == second == [{"value": 10}, {"value": 40}] * 2 and len(calls) == 4
    with pytest.raises(ValueError, match="empty"):
        grid(target=[], k=[1])


def test_mean_se_and_summarize_against_statistics():
    values = [0.5, 0.7, 0.8, 0.65]
    mean, se = mean_se(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert se == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert math.isnan(mean_se([0.3])[1]) and math.isnan(mean_se([])[0])
    records = [{"target": t, "method": "m", "k": 4, "seed": s, "test_acc": v}
               for (t, s, v) in [("a", 0, 0.5), ("a", 1, 0.7), ("b", 0, 0.9), ("b", 1, 0.6), ("b", 2, 0.1)]]
    summary = summarize(records)
    per = {r["target"]: r for r in summary["per_target"]}
    assert per["b"]["n"] == 3 and per["b"]["mean"] == pytest.approx(statistics.mean([0.9, 0.6, 0.1]))
    (average,) = summary["average"]
    assert average["n"] == 2  # seed 2 lacks target a
    assert average["mean"] == pytest.approx(statistics.mean([(0.5 + 0.9) / 2, (0.7 + 0.6) / 2]))
    assert json_safe({"x": [float("nan"), Path("p")]}) == {"x": [None, "p"]}


@dataclass
class _Config:
    targets: tuple[str, ...] = field(default=("a", "b"), metadata={"help": "target tasks"})
    shots: int = field(default=4, metadata={"help": "k per class"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "seeds (default: one)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate"})
    out: Path = field(default=Path("runs/x"), metadata={"help": "results directory"})
    resume: bool = field(default=True, metadata={"help": "reuse finished jobs"})
    hidden: int = 3

    def __post_init__(self) -> None:
        if self.shots < 1:
            raise ValueError(f"shots={self.shots}; must be >= 1")


def test_cli_is_generated_from_the_config_dataclass():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Config)
    text = " ".join(parser.format_help().split())
    assert "k per class (default: 4)" in text and "--hidden" not in text
    assert "seeds (default: one)" in text and "(default: one) (default" not in text  # said once
    args = parser.parse_args(["--targets", "c", "--shots", "2", "--lr", "0.5", "--out", "o", "--no-resume"])
    config = config_from_args(_Config, args)
    assert config == _Config(targets=("c",), shots=2, lr=0.5, out=Path("o"), resume=False)
    assert config_from_args(_Config, parser.parse_args([])) == _Config()
    with pytest.raises(ValueError, match="shots=0"):  # validated before any work
        config_from_args(_Config, parser.parse_args(["--shots", "0"]))


def test_markdown_table_keeps_a_column_only_later_rows_have():
    from taskvec.report import markdown_table

    table = markdown_table([{"method": "gradient", "N=1": "66.9"}, {"method": "whole bank", "all": "69.6"}])
    header, _, first, second = table.splitlines()
    assert header == "| method | N=1 | all |"
    assert first == "| gradient | 66.9 |  |" and second == "| whole bank |  | 69.6 |"
