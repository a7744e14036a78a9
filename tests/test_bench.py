"""The step benchmark's traffic floor and bank preparation (issue 13)."""

from __future__ import annotations

import pytest
import torch

from taskvec import bench
from taskvec.bench import StepCase, bank_paths, format_step_table, memory_bandwidth, prepare_bank


def test_floor_is_reference_plus_two_bank_reads(monkeypatch):
    def fake(case):
        return {"model": case.model, "mode": case.mode, "vectors": case.vectors, "storage": case.storage,
                "step_ms": 100.0 if case.mode == "finetune" else 130.0, "base_mib": 1.0,
                "vectors_mib": 1000.0 * case.vectors / 2**20 * (2 if case.storage == "bf16" else 4),
                "bandwidth_gbs": 0.001 if case.mode == "finetune" else float("nan"),  # 1e6 B/s: 1 ms per kB
                "rss_start_mib": 1.0, "rss_built_mib": 1.0, "rss_peak_mib": 2.0, "gpu_peak_mib": float("nan")}

    monkeypatch.setattr(bench, "run_isolated", fake)
    monkeypatch.setattr(bench, "_subprocess", lambda function, case: "")
    rows = bench.step_table(["m"], [4], storage=["fp32", "bf16"], rounds=1, progress=False)
    _finetune, fp32, bf16 = rows
    # 2 reads x 4 vectors x 1000 elements x 4 bytes = 32 kB at 1e6 B/s = 32 ms over the 100 ms step.
    assert fp32["floor_ms"] == pytest.approx(132.0)
    assert bf16["floor_ms"] == pytest.approx(116.0)
    assert fp32["vs_floor"] == pytest.approx(130.0 / 132.0)
    table = format_step_table(rows)
    assert "1.320" in table and "0.0 GB/s" in table


def test_prepare_bank_writes_storage_dtype_once(tmp_path):
    from taskvec.vectors import TaskVector

    case = StepCase("tiny_cnn", "compose", vectors=2, storage="bf16", threads=1, bank_dir=str(tmp_path))
    prepare_bank(case)
    paths = bank_paths(case)
    assert all(p.is_file() for p in paths)
    stamp = [p.stat().st_mtime_ns for p in paths]
    prepare_bank(case)  # already there: not rewritten
    assert [p.stat().st_mtime_ns for p in paths] == stamp
    vector = TaskVector.load(paths[1])
    assert vector.dtype == torch.bfloat16 and vector.name == "t1"


def test_memory_bandwidth_is_positive_and_finite():
    value = memory_bandwidth("cpu", mib=8, repeats=2)
    assert 1e8 < value < 1e13


def test_cli_accepts_the_vit_b32_shape_and_names_unknown_models(monkeypatch, capsys):
    from taskvec import cli

    seen = {}

    def fake_table(models, vectors, **kwargs):
        seen["models"] = models
        return []

    monkeypatch.setattr(bench, "step_table", fake_table)
    monkeypatch.setattr(bench, "format_step_table", lambda rows: "table")
    assert cli.main(["bench", "step", "--models", "vit-b32", "tiny_cnn", "--vectors", "2"]) == 0
    assert seen["models"] == ["vit-b32", "tiny_cnn"]
    assert cli.main(["bench", "step", "--models", "vit-b99"]) != 0
    assert "vit-b99" in capsys.readouterr().err


def test_paired_ratio_is_the_median_of_same_round_ratios(monkeypatch):
    """Round speeds drift: the fine-tune step is 100, 200, 100 ms and the compose step 110, 220, 300 ms.
    Fastest-round ratio: 110 / 100 = 1.10; paired: median(1.10, 1.10, 3.00) = 1.10, range 1.10-3.00."""
    rounds = {"finetune": iter([100.0, 200.0, 100.0]), "compose": iter([110.0, 220.0, 300.0])}

    def fake(case):
        return {"model": case.model, "mode": case.mode, "vectors": case.vectors, "storage": case.storage,
                "step_ms": next(rounds[case.mode]), "base_mib": 1.0, "vectors_mib": 1.0,
                "bandwidth_gbs": 1.0 if case.mode == "finetune" else float("nan"),
                "rss_start_mib": 1.0, "rss_built_mib": 1.0, "rss_peak_mib": 2.0, "gpu_peak_mib": float("nan")}

    monkeypatch.setattr(bench, "run_isolated", fake)
    monkeypatch.setattr(bench, "_subprocess", lambda function, case: "")
    _finetune, compose = bench.step_table(["m"], [4], storage="fp32", rounds=3, progress=False)
    assert compose["ratio"] == pytest.approx(1.10)
    assert compose["paired_ratio"] == pytest.approx(1.10)
    assert (compose["paired_min"], compose["paired_max"]) == (pytest.approx(1.10), pytest.approx(3.00))
    assert "1.100 (1.10-3.00)" in format_step_table([_finetune, compose])


def test_cuda_graphs_both_gives_a_row_with_and_one_without(monkeypatch):
    seen = []

    def fake(case):
        seen.append(case.cuda_graphs)
        return {"model": case.model, "mode": case.mode, "vectors": case.vectors, "storage": case.storage,
                "cuda_graphs": case.cuda_graphs, "step_ms": 100.0 if case.mode == "finetune" else 120.0,
                "base_mib": 1.0, "vectors_mib": 1.0, "bandwidth_gbs": 1.0, "rss_start_mib": 1.0,
                "rss_built_mib": 1.0, "rss_peak_mib": 2.0, "gpu_peak_mib": float("nan")}

    monkeypatch.setattr(bench, "run_isolated", fake)
    monkeypatch.setattr(bench, "_subprocess", lambda function, case: "")
    rows = bench.step_table(["m"], [4], storage="fp32", rounds=1, cuda_graphs=(False, True), progress=False)
    assert [r["mode"] for r in rows] == ["finetune", "compose", "compose"] and seen == [False, False, True]
    table = format_step_table(rows)
    assert "| fp32 |" in table and "| fp32, cuda graphs |" in table


def test_run_case_with_cuda_graphs_on_cpu_composes_eagerly():
    case = StepCase("tiny_cnn", "compose", vectors=2, batch=4, resolution=8, steps=1, warmup=1, threads=1,
                    cuda_graphs=True)
    row = bench.run_case(case)
    assert row["cuda_graphs"] is True and row["step_ms"] > 0
