"""Reports: markdown tables, JSON results and plots, written atomically to a results directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from taskvec.io import write_json


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, *, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table; floats are printed with ``digits`` decimals.

    Columns default to every key of every row, in order of first appearance: a key that only a later
    row has (e.g. a whole-bank column) must not vanish from the table.
    """
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if value != value else f"{value:.{digits}f}"  # NaN prints empty
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def _save_figure(figure, path: Path) -> Path:
    from taskvec.distributed import is_writer

    if not is_writer():  # under torchrun every rank holds the same figure; rank 0 writes it
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def plot_coefficients(
    matrix: torch.Tensor,
    block_labels: Sequence[str],
    vector_names: Sequence[str],
    path: Path | str,
    *,
    title: str = "learned coefficients",
) -> Path:
    """Heatmap of coefficients: one row per block, one column per task vector, diverging around 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = matrix.detach().float().cpu().T.numpy()  # (blocks, vectors)
    blocks = len(block_labels)
    height = min(40.0, max(4.0, 0.12 * blocks))
    figure, axis = plt.subplots(figsize=(2.5 + 1.1 * len(vector_names), height))
    bound = float(abs(values).max()) or 1.0
    image = axis.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    axis.set_xticks(range(len(vector_names)), vector_names, rotation=45, ha="right")
    step = max(1, blocks // 60)
    axis.set_yticks(range(0, blocks, step), [block_labels[i] for i in range(0, blocks, step)], fontsize=6)
    axis.set_xlabel("task vector")
    axis.set_ylabel("parameter block (input → output)")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.04, label="coefficient")
    try:
        return _save_figure(figure, Path(path))
    finally:
        plt.close(figure)


def plot_lines(
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    path: Path | str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path:
    """Line plot with optional error bars: ``series[name] = (x, y, yerr or None)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, (x, y, err) in series.items():
        axis.errorbar(list(x), list(y), yerr=None if err is None else list(err), marker="o", capsize=3, label=name)
    if logx:
        axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    try:
        return _save_figure(figure, Path(path))
    finally:
        plt.close(figure)


def write_results(directory: Path | str, name: str, payload: dict, table: str) -> tuple[Path, Path]:
    """``<name>.json`` with everything measured and ``<name>.md`` with the table people read."""
    from taskvec.distributed import is_writer
    from taskvec.io import atomic_write_text

    directory = Path(directory)
    if not is_writer():  # under torchrun every rank holds the same results; rank 0 writes them
        return directory / f"{name}.json", directory / f"{name}.md"
    json_path = write_json(directory / f"{name}.json", payload)
    md_path = atomic_write_text(directory / f"{name}.md", table + "\n")
    return json_path, md_path


def plot_composer(composer, path: Path | str, *, title: str) -> Path:
    """:func:`plot_coefficients` of a composer's block coefficients (one row per block, one column per vector)."""
    return plot_coefficients(composer.block_coefficients(), composer.block_names, composer.vector_names, path,
                             title=title)


def publish(directory: Path | str, name: str, payload: dict, table: str, files: dict[str, str] | None = None) -> dict:
    """:func:`write_results` with ``payload["files"]``: ``files`` (plots, coefficients) plus the JSON and
    markdown paths themselves. Returns the payload with ``files`` and ``table`` (what a command prints)."""
    directory = Path(directory)
    payload["files"] = {**(files or {}), "json": str(directory / f"{name}.json"),
                        "markdown": str(directory / f"{name}.md")}
    write_results(directory, name, payload, table)
    return {**payload, "table": table}
