"""Under torchrun only rank 0 writes results, figures and records (the other ranks hold the same values)."""

from __future__ import annotations

import pytest

from taskvec import distributed
from taskvec.experiment import RecordStore
from taskvec.report import plot_lines, write_results


@pytest.mark.parametrize("writer", [True, False])
def test_results_records_and_figures_written_by_rank0_only(tmp_path, monkeypatch, writer):
    monkeypatch.setattr(distributed, "is_writer", lambda: writer)
    write_results(tmp_path, "table", {"a": 1}, "| a |")
    store = RecordStore(tmp_path / "records.jsonl", "fp")
    store.put("job", {"acc": 0.5})
    assert store.get("job") == {"acc": 0.5}  # every rank still knows what it computed
    plot_lines({"m": ([1, 2], [0.1, 0.2], None)}, tmp_path / "plot.png", xlabel="x", ylabel="y", title="t")
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == (["plot.png", "records.jsonl", "table.json", "table.md"] if writer else [])
