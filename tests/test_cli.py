"""The command line as a user drives it: exit codes, files written, errors that name the culprit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_base, perturbed
from safetensors.torch import save_file

from taskvec.bench import StepCase, format_step_table, run_case
from taskvec.cli import build_parser, main
from taskvec.vectors import TaskVector


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "bank", "vector", "run", "bench"):
        assert command in out


def test_vector_make_and_info(tmp_path, capsys):
    base = make_base()
    base_path = _save(base, tmp_path / "base.safetensors")
    torch.save(perturbed(base, 1).state_dict(), tmp_path / "ft.pt")
    out = tmp_path / "tau.safetensors"
    assert main(["vector", "make", str(base_path), str(tmp_path / "ft.pt"), "-o", str(out), "--dtype", "bf16"]) == 0
    vector = TaskVector.load(out)
    assert vector.dtype == torch.bfloat16 and vector.name == "ft"
    assert main(["vector", "info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "base_fingerprint" in printed and "norm:" in printed


def test_vector_info_reads_a_quantised_vector(tmp_path, capsys):
    from taskvec.quantize import QuantizedTaskVector
    from taskvec.vectors import load_task_vector

    base = make_base()
    base_path = _save(base, tmp_path / "base.safetensors")
    _save(perturbed(base, 1), tmp_path / "ft.safetensors")
    dense_path = tmp_path / "tau.safetensors"
    assert main(["vector", "make", str(base_path), str(tmp_path / "ft.safetensors"), "-o", str(dense_path)]) == 0
    dense = TaskVector.load(dense_path)
    path = QuantizedTaskVector.from_vector(dense, "fp16").save(tmp_path / "tau-fp16.safetensors")
    loaded = load_task_vector(path)
    assert isinstance(loaded, QuantizedTaskVector) and str(loaded.scheme) == "fp16"
    # Oracle: fp16 storage is the dense blocks rounded to float16, two bytes per entry.
    rounded = {k: dense[k].to(torch.float16) for k in dense.names}
    for key, block in rounded.items():
        assert torch.equal(loaded.dense_block(key), block.float())
    capsys.readouterr()
    assert main(["vector", "info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}: QuantizedTaskVector(")
    assert "  scheme: fp16" in lines and "  kind: quantized" in lines
    assert f"  bytes: {2 * sum(b.numel() for b in rounded.values())}" in lines
    norm = torch.sqrt(sum((b.double() ** 2).sum() for b in rounded.values()))
    printed = float(next(line for line in lines if line.startswith("  norm: ")).split(": ")[1])
    assert printed == pytest.approx(float(norm), rel=1e-5)


def test_vector_make_reports_bad_input(tmp_path, capsys):
    base = make_base()
    base_path = _save(base, tmp_path / "base.safetensors")
    state = perturbed(base, 1).state_dict()
    state["fc.weight"] = torch.zeros(9, 8)
    _save_dict = {k: v.contiguous() for k, v in state.items()}
    save_file(_save_dict, str(tmp_path / "bad.safetensors"))
    code = main(["vector", "make", str(base_path), str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "o.st")])
    assert code == 2
    err = capsys.readouterr().err
    assert "fc.weight" in err and "bad.safetensors" in err
    assert not (tmp_path / "o.st").exists()  # nothing half-written


def test_bank_list_on_empty_root(tmp_path, capsys):
    assert main(["bank", "list", "--root", str(tmp_path)]) == 0
    assert "(empty)" in capsys.readouterr().out


def test_every_recipe_has_help():
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices["run"]._actions if a.dest == "recipe")
    for name, sub in run.choices.items():
        assert sub.format_help(), name


@pytest.mark.parametrize("mode", ["finetune", "compose"])
def test_bench_case_runs(mode):
    row = run_case(StepCase("tiny_cnn", mode, vectors=2, batch=4, resolution=16, steps=2, warmup=1, threads=1))
    assert row["step_ms"] > 0 and row["base_mib"] > 0
    assert (row["vectors_mib"] > 0) == (mode == "compose")
    row.update(ratio=1.0, budget_mib=1.0, peak_above_start_mib=0.0)
    assert "tiny_cnn" in format_step_table([row])


def test_bench_rounds_keep_each_case_fastest_round(monkeypatch):
    from taskvec import bench

    times = iter([100.0, 130.0, 90.0, 120.0, 80.0, 125.0])  # round 1: ft, n=2; round 2; round 3
    peaks = iter([50.0, 70.0, 55.0, 60.0, 52.0, 65.0])

    def fake(case):
        return {"model": case.model, "mode": case.mode, "vectors": case.vectors, "storage": case.storage,
                "step_ms": next(times), "base_mib": 1.0, "vectors_mib": 2.0 * case.vectors,
                "rss_start_mib": 10.0, "rss_built_mib": 20.0, "rss_peak_mib": next(peaks)}

    monkeypatch.setattr(bench, "run_isolated", fake)
    finetune, compose = bench.step_table(["tiny_cnn"], [2], rounds=3, progress=False)
    assert (finetune["step_ms"], compose["step_ms"]) == (80.0, 120.0)
    assert compose["ratio"] == pytest.approx(1.5)
    assert (finetune["rss_peak_mib"], compose["rss_peak_mib"]) == (55.0, 70.0)
    assert compose["rounds"] == 3
    with pytest.raises(ValueError, match="rounds"):
        bench.step_table(["tiny_cnn"], [2], rounds=0, progress=False)
