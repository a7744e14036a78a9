"""Argument checks that every CLI command runs before it does any work.

Why a module of its own: a typo in ``--target`` or a ``--shots 0`` used to surface only after minutes of
data fetching and fine-tuning, and a mistaken ``-o`` could overwrite an input. Each command has one
small function here that checks ALL its arguments (names, ranges, input files, where its outputs go)
and raises :class:`UsageError` with one line naming the argument and the value at fault.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


class UsageError(ValueError):
    """A command-line argument is invalid; raised before any work starts."""


def _positive(name: str, value: int | float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else ">= 1" if isinstance(value, int) else "> 0"
        raise UsageError(f"{name} must be {bound}, got {value}")


def _known(name: str, values: Iterable[str], known: Iterable[str], extra: Iterable[str] = ()) -> None:
    allowed = list(extra) + sorted(known)
    for value in values:
        if value not in allowed:
            raise UsageError(f"{name} {value!r} is not one of: {', '.join(allowed)}")


def _tasks(suite: str = "vision") -> list[str]:
    """Task names a command may name: the image tasks, or with ``--suite text`` the text tasks."""
    if suite == "text":
        from taskvec.data.text import available_text_tasks

        return list(available_text_tasks())
    from taskvec.data import available_tasks

    return list(available_tasks())


def demo_out(args: argparse.Namespace) -> Path:
    """Where the demo writes: ``--out``, whose default becomes ``runs/demo-text`` with ``--suite text``."""
    out = Path(args.out)
    if getattr(args, "suite", "vision") == "text" and out == Path("runs/demo"):
        return Path("runs/demo-text")
    return out


def _input_file(name: str, path: str | Path) -> Path:
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{name} {file}: no such file or directory")
    if not os.access(file, os.R_OK):
        raise UsageError(f"{name} {file}: not readable (permission denied)")
    return file


def writable_dir(name: str, directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, before any work."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{name} {folder}: exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".taskvec-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"{name} {folder}: not writable ({err.strerror or err})") from err
    return folder


def output_file(name: str, path: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """An output file must not be (or hide inside) an input, must not silently replace an existing file,
    and its folder must be writable."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{name} {out}: is a directory; give a file name")
    for source in inputs:
        src = Path(source)
        same = out.exists() and src.exists() and os.path.samefile(out, src)
        inside = src.is_dir() and out.resolve().is_relative_to(src.resolve())
        if same or out.resolve() == src.resolve() or inside:
            raise UsageError(f"{name} {out}: would write over the input {src}; choose another output")
    if out.exists() and not force:
        raise UsageError(f"{name} {out}: already exists; pass --force to replace it")
    if out.exists() and not out.stat().st_mode & 0o222:  # mode bits, so that it holds for root too
        raise UsageError(f"{name} {out}: is read-only; make it writable first if you mean to replace it")
    writable_dir(f"{name} folder", out.parent if str(out.parent) else Path("."))
    return out


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")


# -- one function per command ------------------------------------------------------------------


def vector_make(args: argparse.Namespace) -> None:
    _input_file("base", args.base)
    _input_file("finetuned", args.finetuned)
    if Path(args.base).resolve() == Path(args.finetuned).resolve():
        raise UsageError(f"base and finetuned are the same file ({args.base}): the task vector would be zero")
    output_file("--output", args.output, inputs=(args.base, args.finetuned), force=args.force)


def vector_info(args: argparse.Namespace) -> None:
    for file in args.files:
        if Path(file).is_dir():
            raise UsageError(f"{file}: is a directory, not a task vector file")
        _input_file("file", file)


def bank(args: argparse.Namespace) -> None:
    from taskvec.models import available_backbones

    _known("--backbone", [args.backbone], available_backbones())
    _known("--tasks", args.tasks or [], _tasks(getattr(args, "suite", "vision")))
    _positive("--resolution", args.resolution)
    _positive("--epochs", args.epochs)
    _positive("--lr", args.lr)
    _positive("--seed", args.seed, allow_zero=True)
    if args.root is not None and getattr(args, "action", "") == "build":
        writable_dir("--root", args.root)
    if getattr(args, "workers", None) is not None:
        _positive("--workers", args.workers)


def bench_step(args: argparse.Namespace) -> None:
    from taskvec.bench import BENCH_ONLY_MODELS
    from taskvec.models import available_backbones

    _known("--models", args.models, available_backbones() + list(BENCH_ONLY_MODELS))
    for name in ("batch", "resolution", "steps", "rounds"):
        _positive(f"--{name}", getattr(args, name))
    for count in args.vectors:
        _positive("--vectors", count)
    if args.json is not None:
        output_file("--json", args.json, force=args.force)


def demo(args: argparse.Namespace) -> None:
    suite = getattr(args, "suite", "vision")
    tasks = _tasks(suite)
    if args.target is not None:
        _known("--target", [args.target], tasks)
    if suite == "vision":
        _known("--head-from", [args.head_from], tasks, extra=("auto", "own"))
    _positive("--shots", args.shots)
    _positive("--epochs", args.epochs)
    _positive("--seed", args.seed, allow_zero=True)
    out = writable_dir("--out", demo_out(args))
    existing = [name for name in ("demo.json", "demo.md", "demo_coefficients.safetensors") if (out / name).exists()]
    if existing and not args.force:
        raise UsageError(f"--out {out}: already holds {', '.join(existing)}; pass --force to replace them")


def recipe(args: argparse.Namespace) -> None:
    """``taskvec run <recipe>``: the options recipes share, checked by name (each recipe checks the rest)."""
    tasks = _tasks(getattr(args, "suite", "vision"))
    for name in ("tasks", "targets"):
        values = getattr(args, name, None)
        if values:
            _known(f"--{name}", [v for v in values if v != "all"], tasks)
    if getattr(args, "target", None):
        _known("--target", [args.target], tasks)
    if getattr(args, "head_from", None):
        _known("--head-from", [args.head_from], tasks, extra=("auto", "own"))
    for name in ("shots", "ood_shots", "epochs"):
        value = getattr(args, name, None)
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, int | float):
                _positive(f"--{name.replace('_', '-')}", item)
    for name in ("lr", "finetune_lr"):
        value = getattr(args, name, None)
        if isinstance(value, int | float):
            _positive(f"--{name.replace('_', '-')}", value)
    seeds = getattr(args, "seeds", None)
    for seed in seeds if isinstance(seeds, list | tuple) else []:
        _positive("--seeds", seed, allow_zero=True)
    if getattr(args, "out", None) is not None:
        writable_dir("--out", args.out)


CHECKS: dict[tuple[str, str | None], Callable[[argparse.Namespace], None]] = {
    ("vector", "make"): vector_make,
    ("vector", "info"): vector_info,
    ("bank", "build"): bank,
    ("bank", "list"): bank,
    ("bench", "step"): bench_step,
    ("demo", None): demo,
    ("run", None): recipe,
}


def validate(args: argparse.Namespace) -> None:
    """Run the checks of ``args.command`` (and its action); raise :class:`UsageError` on the first fault."""
    check_threads(getattr(args, "threads", None))
    check = CHECKS.get((args.command, getattr(args, "action", None))) or CHECKS.get((args.command, None))
    if check is not None:
        check(args)
