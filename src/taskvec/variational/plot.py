"""Heatmap of the gate's kept fraction per task vector and coefficient column."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from taskvec.io import PathLike


def plot_kept_fraction(
    fraction: Tensor,
    block_labels: Sequence[str],
    vector_names: Sequence[str],
    path: PathLike,
    *,
    title: str = "kept fraction (gated inference)",
) -> Path:
    """Save a PNG heatmap (vectors x columns, values in [0, 1]) and return its path.

    Uses matplotlib's Agg canvas directly, so no global backend is switched and no display is needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if fraction.dim() != 2:
        raise ValueError(f"kept fraction must be 2-D (n_vectors, n_columns), got shape {tuple(fraction.shape)}")
    rows, columns = fraction.shape
    if len(vector_names) != rows:
        raise ValueError(f"{len(vector_names)} vector names for {rows} rows of the kept fraction")
    if len(block_labels) != columns:
        raise ValueError(f"{len(block_labels)} block labels for {columns} columns of the kept fraction")
    width = min(40.0, 2.5 + 0.22 * columns)
    height = 1.6 + 0.35 * rows + 0.06 * max((len(label) for label in block_labels), default=0)
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(fraction.detach().float().cpu().numpy(), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
    axes.set_yticks(range(rows), labels=list(vector_names))
    axes.set_xticks(range(columns), labels=list(block_labels), rotation=90, fontsize=6)
    axes.set_xlabel("coefficient column")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target
