"""The experiment layer the recipes share: a job grid, one resumable record store keyed by one settings
fingerprint, statistics (mean +- s.e.), tables, plots, JSON, and a command line generated from a
recipe's config dataclass.

A recipe is then a config class (fields documented with ``field(metadata={"help": ...})``, checked in
``__post_init__``) and a function of one job; this module runs the grid, skips jobs already recorded
under the same settings, and writes the report.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import types
import typing
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

from taskvec.report import _save_figure, markdown_table, write_results
from taskvec.train import TrainResult

__all__ = [
    "RecordStore",
    "add_config_arguments",
    "check_fields",
    "config_from_args",
    "fingerprint",
    "format_mean_se",
    "grid",
    "grid_report",
    "grid_table",
    "history",
    "json_safe",
    "markdown_table",
    "mean_se",
    "mean_se_cell",
    "paired_summary",
    "plot_bars",
    "plot_summary",
    "run_grid",
    "runtime_rows",
    "summarize",
    "summarize_by_method",
    "write_results",
]

# ----------------------------------------------------------------------------------------------
# Jobs and records
# ----------------------------------------------------------------------------------------------


def fingerprint(settings: Mapping[str, Any]) -> str:
    """12 hex digits that change whenever a setting that determines the numbers changes.

    Pass only such settings (not the output directory, progress bars, or the list of jobs to run),
    plus the identity of the data they read (a bank's root and its entries' vector norms)."""
    blob = json.dumps(dict(settings), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class RecordStore:
    """Finished jobs appended as JSON lines ``{"fingerprint", "job", "value"}`` to one file.

    Only lines written under the same fingerprint are read back, so an interrupted run resumes where it
    stopped and a run with other settings starts afresh (old lines stay, never overwritten). A line cut
    by a killed process is skipped. ``resume=False`` ignores what the file holds but still appends.
    """

    def __init__(self, path: Path | str, fingerprint: str, resume: bool = True) -> None:
        self.path, self.fingerprint, self.resume = Path(path), fingerprint, resume
        self.done: dict[str, Any] = {}
        if resume and self.path.is_file():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:  # e.g. the last line of a run killed mid-write
                    warnings.warn(f"{self.path}: line {number} is unreadable; its job (if any) is run again",
                                  stacklevel=2)
                    continue
                if isinstance(item, dict) and item.get("fingerprint") == fingerprint and "job" in item:
                    self.done[item["job"]] = item.get("value", item.get("records"))

    def get(self, job: str) -> Any | None:
        return self.done.get(job)

    def get_methods(self, job: str, methods: Sequence[str]) -> list[dict] | None:
        """A job's records (``[{"method": ...}, ...]``) if every method asked for is among them."""
        records = self.done.get(job)
        if not isinstance(records, list) or not set(methods) <= {r.get("method") for r in records}:
            return None
        return [r for r in records if r["method"] in methods]

    def put(self, job: str, value: Any) -> None:
        from taskvec.distributed import is_writer

        self.done[job] = value
        if not is_writer():  # under torchrun every rank computes the same record; rank 0 appends it
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"fingerprint": self.fingerprint, "job": job, "value": json_safe(value)}) + "\n")


def grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes, in order (last axis fastest): ``grid(target=..., k=..., seed=...)``."""
    names = list(axes)
    values = [list(v) for v in axes.values()]
    for name, options in zip(names, values, strict=True):
        if not options:
            raise ValueError(f"grid axis {name!r} is empty")
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def job_key(job: Mapping[str, Any]) -> str:
    return "|".join(f"{k}={v}" for k, v in job.items())


def run_grid(
    jobs: Sequence[Mapping[str, Any]], run_job: Callable[[Mapping[str, Any]], Any], store: RecordStore,
    *, key: Callable[[Mapping[str, Any]], str] = job_key,
) -> list[Any]:
    """Run every job not already in ``store`` and record it; returns the values in job order."""
    values = []
    for job in jobs:
        name = key(job)
        value = store.get(name)
        if value is None:
            value = run_job(job)
            store.put(name, value)
        values.append(value)
    return values


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with n - 1, over sqrt(n)); NaN s.e. for n < 2."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def summarize(records: Sequence[dict], key: str = "test_acc") -> dict[str, list[dict]]:
    """Per-target mean +- s.e. over seeds, and the over-target average: mean +- s.e. over seeds of the
    per-seed mean across targets (only seeds where every target has the number).

    Records hold ``target``, ``method``, ``k``, ``seed`` and the number under ``key``."""
    by_target: dict[tuple, list[float]] = defaultdict(list)
    by_seed: dict[tuple, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    targets = sorted({r["target"] for r in records})
    for r in records:
        by_target[(r["target"], r["method"], r["k"])].append(r[key])
        by_seed[(r["method"], r["k"])][r["seed"]][r["target"]] = r[key]
    per_target = []
    for (target, method, k), values in sorted(by_target.items()):
        mean, se = mean_se(values)
        per_target.append({"target": target, "method": method, "k": k, "mean": mean, "se": se, "n": len(values)})
    average = []
    for (method, k), seeds in sorted(by_seed.items()):
        complete = [sum(v.values()) / len(v) for _, v in sorted(seeds.items()) if len(v) == len(targets)]
        mean, se = mean_se(complete)
        average.append({"method": method, "k": k, "mean": mean, "se": se, "n": len(complete)})
    return {"per_target": per_target, "average": average}


def summarize_by_method(records: Sequence[dict], keys: Sequence[str]) -> dict[str, dict[str, dict[str, dict]]]:
    """``out[key][method][target or "average"]`` = ``{"mean", "se", "n"}`` (:func:`summarize`) for every
    number in ``keys``, methods in order of first appearance; for records of one ``k`` (default 0)."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    rows = [{"k": 0, **r} for r in records]
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for key in keys:
        stats = summarize(rows, key)
        out[key] = {m: {s["target"]: s for s in stats["per_target"] if s["method"] == m} for m in methods}
        for s in stats["average"]:
            out[key][s["method"]]["average"] = s
    return out


def format_mean_se(stat: Mapping[str, Any] | None, *, scale: float = 100.0, sign: str = "") -> str:
    """``"81.5 ± 0.4"`` from ``{"mean", "se"}`` times ``scale``; no ``±`` for an undefined s.e., empty when
    missing; ``sign="+"`` prints changes signed."""
    if stat is None:
        return ""
    return mean_se_cell(stat["mean"], stat.get("se"), scale=scale, signed=sign == "+")


def values_cell(values: Sequence[float], *, scale: float = 100.0, digits: int = 1) -> str:
    """:func:`mean_se_cell` of raw values (one value: no ``±``)."""
    mean, se = mean_se(values)
    return mean_se_cell(mean, se, scale=scale, digits=digits)


def json_safe(value: object) -> object:
    """NaN (an undefined s.e.) becomes null, so the JSON is standard; paths become strings."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def history(result: TrainResult) -> list[dict]:
    """A training run's per-epoch loss and selection metric, JSON-ready (NaN loss of epoch 0 -> null)."""
    return [{"epoch": r.epoch, "loss": None if r.loss != r.loss else r.loss, "selection": r.metric}
            for r in result.history]


# ----------------------------------------------------------------------------------------------
# Grid tables (mean +- s.e. cells)
# ----------------------------------------------------------------------------------------------


def mean_se_cell(mean: float | None, se: float | None, *, scale: float = 100.0, signed: bool = False,
                 digits: int = 1) -> str:
    """``"81.5 ± 0.4"`` (``scale`` 100: a fraction shown in %); no ``± ...`` when the s.e. is undefined
    (one seed), empty when the mean is."""
    if mean is None or mean != mean:
        return ""
    text = f"{scale * mean:{'+' if signed else ''}.{digits}f}"
    return text if se is None or se != se else f"{text} ± {scale * se:.{digits}f}"


def grid_table(
    rows: Sequence[Mapping[str, Any]], *, row_key: str, column_key: str, row_order: Sequence[Any],
    columns: Sequence[Any], labels: Mapping[Any, str] | None = None, column_label: str = "{}", first: str = "method",
) -> str:
    """A markdown table of :func:`summarize` rows: one line per ``row_key`` value (in ``row_order``, shown
    as ``labels[value]``), one column per ``column_key`` value, cells :func:`mean_se_cell` of their
    ``mean`` and ``se``; a missing combination is an empty cell."""
    lookup = {(r[row_key], r[column_key]): r for r in rows}
    names = [column_label.format(c) for c in columns]
    out = []
    for value in row_order:
        line = {first: (labels or {}).get(value, str(value))}
        for column, name in zip(columns, names, strict=True):
            found = lookup.get((value, column))
            line[name] = mean_se_cell(found["mean"], found["se"]) if found else ""
        out.append(line)
    return markdown_table(out, [first, *names])


def grid_report(
    records: Sequence[Mapping[str, Any]], labels: Mapping[str, str], columns: Sequence[Any], *,
    metrics: Mapping[str, str], column_key: str = "k", column_label: str = "k={}", runtime: str | None = None,
) -> tuple[dict[str, dict], list[str]]:
    """:func:`summarize` of each of ``metrics`` (record key -> title) and the report's markdown sections:
    each metric's over-target table (a line per ``labels`` key, a column per ``columns`` value), the
    first metric's table per target, and with a ``runtime`` caption :func:`runtime_rows`' table.
    Returns ``({key: summary}, sections)``."""
    summaries = {key: summarize([dict(r) for r in records], key=key) for key in metrics}

    def table(rows: Sequence[Mapping[str, Any]]) -> str:
        return grid_table(rows, row_key="method", column_key=column_key, row_order=list(labels), columns=columns,
                          labels=labels, column_label=column_label)

    sections: list[str] = []
    for key, title in metrics.items():
        sections += ([] if not sections else ["", title, ""]) + [table(summaries[key]["average"])]
    first = next(iter(metrics))
    for target in sorted({r["target"] for r in records}, key=[r["target"] for r in records].index):
        rows = [r for r in summaries[first]["per_target"] if r["target"] == target]
        sections += ["", f"**{target}** (mean ± s.e. over seeds)", "", table(rows)]
    if runtime is not None:
        times = markdown_table(runtime_rows(records, labels), ["method", "runs", "mean_seconds", "total_seconds"],
                               digits=1)
        sections += ["", runtime, "", times]
    return summaries, sections


def paired_summary(
    records: Sequence[Mapping[str, Any]], *, by: str, columns: Mapping[str, str],
    changes: Mapping[str, tuple[str, str, str | None]],
) -> tuple[list[dict], str]:
    """Per value of ``by`` (e.g. k): mean +- s.e. over records of each of ``columns`` (name -> shown
    label) and of each paired difference ``changes[name] = (a, b, label)``, ``r[a] - r[b]`` per record
    (a label of None: in the rows, not in the table). Returns (rows, markdown table)."""
    rows, shown = [], []
    for value in sorted({r[by] for r in records}):
        group = [r for r in records if r[by] == value]
        row: dict = {by: value, "seeds": len(group), **{n: mean_se([r[n] for r in group]) for n in columns}}
        row.update({n: mean_se([r[a] - r[b] for r in group]) for n, (a, b, _) in changes.items()})
        rows.append(row)
        shown.append({by: value, **{label: mean_se_cell(*row[n]) for n, label in columns.items()},
                      **{label: mean_se_cell(*row[n], signed=True) for n, (_, _, label) in changes.items() if label}})
    return rows, markdown_table(shown)


def runtime_rows(records: Sequence[Mapping[str, Any]], labels: Mapping[str, str], *, key: str = "method") -> list[dict]:
    """Per ``key`` value (in ``labels`` order, shown as its label): runs, mean and total ``seconds``."""
    rows = []
    for name, label in labels.items():
        seconds = [r["seconds"] for r in records if r[key] == name]
        if seconds:
            rows.append({key: label, "runs": len(seconds), "mean_seconds": sum(seconds) / len(seconds),
                         "total_seconds": sum(seconds)})
    return rows


def plot_summary(
    rows: Sequence[Mapping[str, Any]], path: Path | str, *, row_key: str, column_key: str, row_order: Sequence[Any],
    labels: Mapping[Any, str] | None = None, **plot: Any,
) -> Path:
    """One line per ``row_key`` value of :func:`summarize` rows: mean against ``column_key`` with s.e. bars
    (``plot`` goes to :func:`taskvec.report.plot_lines`: xlabel, ylabel, title, logx)."""
    from taskvec.report import plot_lines

    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]] = {}
    for value in row_order:
        found = sorted((r for r in rows if r[row_key] == value), key=lambda r: r[column_key])
        if found:
            series[(labels or {}).get(value, str(value))] = (
                [r[column_key] for r in found], [r["mean"] for r in found],
                [0.0 if r["se"] is None or r["se"] != r["se"] else r["se"] for r in found])
    return plot_lines(series, Path(path), **plot)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def plot_bars(
    values: Mapping[str, float], path: Path | str, *, ylabel: str, title: str,
    points: Mapping[str, Mapping[str, float]] | None = None, reference: float | None = None,
) -> Path:
    """One bar per method (``values``), with optional per-task points on top and a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    figure, axis = plt.subplots(figsize=(1.2 + 1.1 * len(names), 4.2))
    axis.bar(range(len(names)), [values[n] for n in names], color="#4c72b0", alpha=0.85)
    if points:
        tasks = sorted({t for per in points.values() for t in per})
        markers = "os^vD<>p*h"
        for j, task in enumerate(tasks):
            xs = [i for i, n in enumerate(names) if task in points.get(n, {})]
            ys = [points[names[i]][task] for i in xs]
            axis.scatter(xs, ys, s=18, marker=markers[j % len(markers)], zorder=3, label=task)
        axis.legend(fontsize=7, ncol=2, loc="lower right")
    if reference is not None:
        axis.axhline(reference, color="grey", lw=0.8, ls="--")
    for i, n in enumerate(names):
        axis.text(i, values[n], f"{values[n]:.3f}", ha="center", va="bottom", fontsize=7)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    try:
        return _save_figure(figure, Path(path))
    finally:
        plt.close(figure)


# ----------------------------------------------------------------------------------------------
# A command line from a config dataclass
# ----------------------------------------------------------------------------------------------


def _scalar(annotation: Any) -> tuple[type, bool]:
    """(element type, optional) of ``int``, ``float | None``, ``Path``, ``str``..."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _scalar(inner[0])[0], True
    return (annotation if isinstance(annotation, type) else str), False


def add_config_arguments(
    parser: argparse.ArgumentParser, config_class: type, *, skip: Sequence[str] = (), names: Mapping[str, str] = (),
) -> None:
    """One option per field of ``config_class`` that has ``metadata["help"]`` and is not in ``skip``.

    ``--field-name`` (or ``names[field]``); tuples take several values; a bool that defaults to True
    becomes ``--no-field-name``; defaults and help text come from the dataclass, so they cannot drift.
    """
    if not is_dataclass(config_class):
        raise TypeError(f"{config_class!r} is not a dataclass")
    hints = typing.get_type_hints(config_class)
    names = dict(names)
    for f in fields(config_class):
        if f.name in skip or "help" not in f.metadata:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        flag = names.get(f.name, "--" + f.name.replace("_", "-"))
        text = f.metadata["help"]
        # a help text that already says its default (e.g. "default: all of the suite's") is not given another
        shown = text if "default" in text else f"{text} (default: %(default)s)"
        hint = hints[f.name]
        if hint is bool:
            if default:
                parser.add_argument(flag if f.name in names else "--no-" + f.name.replace("_", "-"),
                                    dest=f.name, action="store_false", help=text)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=text)
            continue
        if typing.get_origin(hint) is tuple:
            element = typing.get_args(hint)[0]
            parser.add_argument(flag, dest=f.name, nargs="+", type=element, default=list(default),
                                choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                                help=shown)
            continue
        kind, _ = _scalar(hint)
        parser.add_argument(flag, dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"),
                            metavar=f.metadata.get("metavar"), help=shown)


def config_from_args(config_class: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The config built from the options :func:`add_config_arguments` added (its ``__post_init__``
    validates before any work), with ``overrides`` on top."""
    values = {}
    for f in fields(config_class):
        if f.name in overrides:
            continue
        if hasattr(args, f.name) and "help" in f.metadata:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**values, **overrides)


def check_fields(config: Any) -> None:
    """Validate a config dataclass against its fields' metadata, for ``__post_init__``: ``choices`` (a tuple
    must be a non-empty subset, a scalar one of them), ``min`` (a number, unless None) and ``min_items`` (a
    tuple's length). Errors name the class, the field and the value."""
    for f in fields(config):
        value, meta, name = getattr(config, f.name), f.metadata, f"{type(config).__name__}.{f.name}"
        if "choices" in meta:
            allowed, many = list(meta["choices"]), isinstance(value, tuple)
            if not set(value if many else [value]) <= set(allowed) or (many and not value):
                raise ValueError(f"{name}: {value!r} is not {'a non-empty subset' if many else 'one'} of {allowed}")
        if meta.get("min") is not None and value is not None and value < meta["min"]:
            raise ValueError(f"{name} must be >= {meta['min']}; got {value!r}")
        if meta.get("min_items") is not None and len(value) < meta["min_items"]:
            raise ValueError(f"{name} needs at least {meta['min_items']} value(s); got {list(value)}")


def add_nested_arguments(
    parser: argparse.ArgumentParser, config: Any, options: Mapping[str, tuple[str, str, str]]
) -> None:
    """Options for fields of a config's nested settings (``options[dest] = (section, field, help)``, flag
    ``--dest``); type and default come from the ``config`` instance, so they cannot drift."""
    for dest, (section, name, text) in options.items():
        default = getattr(getattr(config, section), name)
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, type=type(default), default=default,
                            help=f"{text} (default: %(default)s)")


def nested_from_args(config: Any, args: argparse.Namespace, options: Mapping[str, tuple[str, str, str]]) -> dict:
    """``{section: config's nested settings with the values of the options}``: overrides for
    :func:`config_from_args` (the options :func:`add_nested_arguments` added)."""
    from dataclasses import replace

    values: dict[str, dict] = {}
    for dest, (section, name, _) in options.items():
        values.setdefault(section, {})[name] = getattr(args, dest)
    return {section: replace(getattr(config, section), **fields_) for section, fields_ in values.items()}


def recipe_command(
    subparsers: argparse._SubParsersAction, name: str, config_class: type, run: Callable[..., dict], *,
    help: str, description: str,
) -> argparse.ArgumentParser:
    """``taskvec run NAME`` for a recipe whose whole command line is its config: options generated from
    ``config_class``, ``--suite`` / ``--bank-root``; the command builds the config (validated before any
    work) and the suite, calls ``run(config, suite=...)`` and prints the table and the files written."""
    from taskvec.suites import add_suite_arguments, suite_from_args

    parser = subparsers.add_parser(name, help=help, description=description)
    add_config_arguments(parser, config_class)
    add_suite_arguments(parser)

    def command(args: argparse.Namespace) -> int:
        config = config_from_args(config_class, args)
        result = run(config, suite=suite_from_args(args, progress=getattr(config, "progress", True)))
        print(result["table"])
        print(f"\nresults: {result['files']['json']}\ntable:   {result['files']['markdown']}")
        return 0

    parser.set_defaults(run=command)
    return parser
