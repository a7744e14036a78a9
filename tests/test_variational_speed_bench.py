"""benchmarks/variational_speed.py runs on a tiny model and reports paired ratios and the whole prediction."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "variational_speed.py"


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("variational_speed_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_rows_carry_paired_ratios_and_the_whole_prediction(bench, capsys):
    rows = bench.run(["tiny_cnn"], [4], [2], [2], rounds=3, seconds=0.0, kept=0.2)
    labels = {(r["method"], r["mode"]) for r in rows}
    assert {("merged", "infer"), ("features", "infer"), ("auto", "infer")} <= labels
    merged = next(r for r in rows if r["method"] == "merged")
    assert merged["paired"] == pytest.approx(1.0) and merged["ratio"] == pytest.approx(1.0)
    assert all(r["paired"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "whole gated prediction (auto infer + features) / merged, median of 3 same-round ratios" in out


def test_paired_ratio_is_the_median_of_same_round_ratios(bench, monkeypatch):
    """Rounds: merged 10, 20, 10 ms; auto 15, 20, 40 ms -> same-round ratios 1.5, 1.0, 4.0, median 1.5."""
    cpu = {"merged": iter([10.0, 20.0, 10.0])}

    def fake_measure(cases, rounds, seconds):
        runs = []
        for label, _mode, _fn in cases:
            if label == "merged":
                runs.append([(c, c) for c in cpu["merged"]])
            else:
                runs.append([(15.0, 15.0), (20.0, 20.0), (40.0, 40.0)])
        return runs

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "gflops", lambda fn: 0.0)
    rows = bench.run(["tiny_cnn"], [2], [2], [2], rounds=3, seconds=0.0, kept=0.2)
    auto = next(r for r in rows if (r["method"], r["mode"]) == ("auto", "infer"))
    assert auto["paired"] == pytest.approx(1.5)
    assert auto["ratio"] == pytest.approx(1.5)  # fastest round 15 ms against merged's fastest 10 ms
