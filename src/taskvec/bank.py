"""The bank: one fine-tuned task vector and one frozen head per task, on one pre-trained backbone.

For each task the builder (1) fits a linear head on the pre-trained backbone's features of the
task's training split, which then stays frozen (it plays the role of CLIP's zero-shot head),
(2) fine-tunes the whole backbone through that head with normalisation statistics frozen, selecting
the epoch on the validation split, and (3) saves the task vector, the head and a metadata file.

Every file is written atomically and ``manifest.json`` (the sha256 and size of every other file)
last, so an interrupted build resumes at the first incomplete task (and inside it, at its last
finished epoch). An entry counts as complete only while its files match the manifest: a truncated or
altered file makes it incomplete, readers refuse it with a message and ``build`` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taskvec.data import Task, augment, batches, load_task
from taskvec.evaluate import accuracy, features
from taskvec.fetch import cache_dir
from taskvec.heads import LinearHead, fit_linear_head
from taskvec.io import CheckpointError, write_json
from taskvec.linearize import LinearizedModel
from taskvec.models import build_backbone
from taskvec.train import Loader, TrainConfig, fit
from taskvec.vectors import TaskVector, load_task_vector

DEFAULT_TASKS = ("mnist", "fashion_mnist", "animal_mnist", "digits", "emoji_google", "emoji_twitter")
MANIFEST = "manifest.json"
ENTRY_FILES = ("vector.safetensors", "head.safetensors", "meta.json")


class BankEntryError(CheckpointError, FileNotFoundError):
    """A bank entry is missing, unfinished, or its files do not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, files: Sequence[str] = ENTRY_FILES, **extra: object) -> Path:
    """Record sha256 and size of ``files``; written last, it is what marks the entry complete."""
    entries = {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
               for name in files}
    return write_json(directory / MANIFEST, {"format": 1, **extra, "files": entries})


def check_manifest(directory: Path, *, full: bool = True) -> str | None:
    """``None`` when every file matches ``manifest.json``, else what is wrong (naming the file).

    ``full=False`` compares sizes only (cheap, catches truncation); ``full=True`` also the sha256.
    """
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{manifest}: missing (the entry was never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
        checks = [(name, int(info["bytes"]), str(info["sha256"])) for name, info in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{manifest}: unreadable manifest ({type(err).__name__}: {err})"
    for name, size, digest in checks:
        file = directory / name
        if not file.is_file():
            return f"{file}: listed in the manifest but missing"
        if file.stat().st_size != size:
            return f"{file}: {file.stat().st_size} bytes, the manifest says {size} (truncated or replaced)"
        if full and sha256_file(file) != digest:
            return f"{file}: content does not match its sha256 in the manifest (corrupted)"
    return None


@dataclass(frozen=True)
class BankConfig:
    """Everything that determines a bank's contents; its hash names the bank's directory."""

    backbone: str = "mobilenet_v2"
    resolution: int = 48
    epochs: int = 2
    min_steps: int = 150  # small tasks get more epochs: at least this many optimiser steps per task
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    linearized: bool = False
    pretrained: bool = True  # False only for tests on tiny randomly initialised (seeded) backbones

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        mode = "-linear" if self.linearized else ""
        return f"{self.backbone}-{self.resolution}px{mode}-{digest}"

    def label(self) -> str:
        """How reports name the backbone and its input size, e.g. ``mobilenet_v2 @ 48px``."""
        return f"{self.backbone} @ {self.resolution}px"


class Bank:
    """A directory of task vectors and heads built under one :class:`BankConfig`."""

    def __init__(
        self,
        config: BankConfig | None = None,
        root: Path | str | None = None,
        *,
        loader: Callable[..., Task] = load_task,
        entries: EntryMaker | None = None,
    ) -> None:
        self.config = config or BankConfig()
        self.root = Path(root) if root is not None else cache_dir() / "banks" / self.config.key()
        # How an entry is made: images + fitted linear heads by default; a suite (text) brings its own,
        # and then ``loader`` reads the suite's tasks.
        self.entries: EntryMaker = entries or _ImageEntries(self.config, loader)
        if entries is not None and loader is load_task:
            loader = _suite_loader(entries)
        self.loader = loader  # (name, seed=...) -> Task; tests pass small in-memory tasks
        self._verified: dict[str, tuple] = {}  # task -> file stamps last found matching the manifest

    # -- reading -------------------------------------------------------------------------------

    def entry(self, task: str) -> Path:
        return self.root / task

    def problem(self, task: str) -> str | None:
        """Why ``task``'s entry is not complete and intact, or ``None`` if it is (sha256 verified once)."""
        directory = self.entry(task)
        if not (directory / MANIFEST).is_file() and (directory / "meta.json").is_file():
            self._adopt(directory)
        stamp = self._stamp(directory)
        if self._verified.get(task) == stamp:
            return None
        problem = check_manifest(directory)
        if problem is None:
            self._verified[task] = stamp
        return problem

    @staticmethod
    def _stamp(directory: Path) -> tuple:
        try:
            return tuple((n, (directory / n).stat().st_size, (directory / n).stat().st_mtime_ns)
                         for n in (MANIFEST, *ENTRY_FILES))
        except OSError:
            return ()

    def _adopt(self, directory: Path) -> None:
        """An entry from before manifests: give it one only if its files load completely."""
        try:
            load_task_vector(directory / "vector.safetensors")
            LinearHead.load(directory / "head.safetensors")
            json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError, TypeError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"bank: entry {directory} has no manifest and does not load ({first}); it will be rebuilt",
                  file=sys.stderr)
            return
        try:
            write_manifest(directory, adopted=True)
        except OSError as err:
            print(f"bank: cannot write {directory / MANIFEST} ({err.strerror})", file=sys.stderr)

    def has(self, task: str) -> bool:
        return self.problem(task) is None

    def tasks(self) -> list[str]:
        """Tasks with a complete, intact entry (files match their manifest)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.has(p.name))

    def incomplete(self) -> dict[str, str]:
        """Entry directories that are not complete, with the reason (shown by ``bank list``)."""
        if not self.root.is_dir():
            return {}
        found = {p.name: self.problem(p.name) for p in sorted(self.root.iterdir()) if p.is_dir()}
        return {task: problem for task, problem in found.items() if problem is not None}

    def meta(self, task: str) -> dict:
        self._require(task)
        return json.loads((self.entry(task) / "meta.json").read_text())

    def vector(self, task: str) -> TaskVector:
        self._require(task)
        return load_task_vector(self.entry(task) / "vector.safetensors")

    def vectors(self, tasks: Iterable[str]) -> list[TaskVector]:
        return [self.vector(task) for task in tasks]

    def head(self, task: str) -> LinearHead:
        self._require(task)
        return LinearHead.load(self.entry(task) / "head.safetensors")

    def base(self) -> nn.Module:
        """A fresh pre-trained backbone, the base every vector of this bank was made on."""
        return self.entries.base().eval()

    def _require(self, task: str) -> None:
        problem = self.problem(task)
        if problem is None:
            return
        if not self.entry(task).is_dir():
            built = ", ".join(self.tasks()) or "none"
            raise BankEntryError(
                f"bank {self.root} has no finished entry for task '{task}' (built: {built}); "
                f"run `taskvec bank build --tasks {task}`"
            )
        raise BankEntryError(f"bank entry '{task}' is not usable: {problem}; "
                             f"`taskvec bank build --tasks {task}` rebuilds it")

    def table(self) -> list[dict]:
        rows = []
        for task in self.tasks():
            meta = self.meta(task)
            keys = ("task", "head_test_acc", "finetuned_test_acc", "epochs", "seconds")
            row = {key: meta[key] for key in keys}
            row.update({key: meta[key] for key in ("head_test_bal", "finetuned_test_bal", "steps") if key in meta})
            rows.append(row)
        return rows

    # -- building ------------------------------------------------------------------------------

    def build(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        *,
        progress: bool = True,
        force: bool = False,
        workers: int = 1,
        factory: Callable[[], Bank] | None = None,
    ) -> list[dict]:
        """Build every missing entry (all of them with ``force``); returns their metadata.

        ``workers`` > 1 builds entries side by side in that many fresh processes, each with its share of
        this process's threads (small models use two single-threaded processes better than one process
        with two threads). ``factory`` is a picklable zero-argument callable that makes this same bank in
        a worker. Each entry is made exactly as in a sequential build (its own seeds, its own directory
        and manifest), so the vectors do not depend on ``workers``.
        """
        if workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        todo = [task for task in tasks if force or not self.has(task)]
        for task in todo:
            problem = None if force else self.problem(task)
            if problem is not None and self.entry(task).is_dir() and any(self.entry(task).iterdir()):
                print(f"bank: rebuilding '{task}': {problem}", file=sys.stderr)
        if workers > 1 and len(todo) > 1:
            if factory is None:
                raise ValueError("workers > 1 needs `factory`: a picklable callable that makes this bank in a worker")
            self._build_parallel(todo, min(workers, len(todo)), factory, progress)
        else:
            for task in tqdm(todo, desc="bank", disable=not progress or not todo):
                self.build_entry(task, progress=progress)
        return [self.meta(task) for task in tasks]

    def _build_parallel(self, todo: list[str], workers: int, factory: Callable[[], Bank], progress: bool) -> None:
        """Entries in ``workers`` spawned processes, the costliest first (so the last one to finish is short).

        The entry maker's ``prepare(task)`` (when it has one) fetches what the entry needs here, once,
        before any worker starts, and returns the entry's relative cost.
        """
        import multiprocessing
        import pickle
        from concurrent.futures import ProcessPoolExecutor, as_completed

        try:
            pickle.dumps(factory)
        except Exception as error:
            raise ValueError(f"bank factory {factory!r} cannot be sent to a worker process: {error}") from error
        prepare = getattr(self.entries, "prepare", None)
        costs = {task: float(prepare(task)) if prepare is not None else 0.0 for task in todo}
        order = sorted(todo, key=lambda task: -costs[task])
        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")  # never fork a process whose thread pools have run
        with ProcessPoolExecutor(workers, mp_context=context) as pool, \
                tqdm(total=len(order), desc=f"bank ({workers} workers)", disable=not progress) as bar:
            running = {pool.submit(_build_in_worker, factory, task, threads): task for task in order}
            for future in as_completed(running):
                try:
                    future.result()
                except Exception as error:
                    raise RuntimeError(f"bank entry '{running[future]}' failed in its worker: {error}") from error
                bar.set_postfix_str(running[future])
                bar.update()

    def build_entry(self, task_name: str, *, progress: bool = True) -> dict:
        cfg = self.config
        make = self.entries
        started = time.perf_counter()
        task = make.load(task_name, cfg.seed)
        base = make.base().eval()
        head = make.make_head(task, base)
        head.requires_grad_(False)
        select = make.selection_split(task)
        head_val = make.scores(base, head, select)
        head_test = make.scores(base, head, task.test)

        model: nn.Module
        if cfg.linearized:
            model = LinearizedModel(base)
        else:
            model = make.base()
            model.requires_grad_(True)
        directory = self.entry(task_name)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest is written
        self._verified.pop(task_name, None)
        loader = make.train_loader(task)
        epochs = make.epochs(loader)
        result = fit(
            model,
            _head_loss(head),
            loader,
            TrainConfig(
                epochs=epochs,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                seed=cfg.seed,
                max_grad_norm=1.0,
                select_initial=False,
                train_mode=False,  # BatchNorm statistics / dropout frozen: the vector is a pure parameter difference
                progress=progress,
                checkpoint=directory / "train_state.pt",
                resume=True,
                description=f"fine-tune {task_name}",
            ),
            evaluate=lambda m: make.scores(m, head, select)["acc"],
        )
        finetuned_test = make.scores(model, head, task.test)
        name = f"{task_name}{'-linear' if cfg.linearized else ''}"
        if cfg.linearized:
            vector = model.task_vector(name=task_name, base_name=cfg.backbone)
        else:
            vector = TaskVector.from_models(base, model, name=task_name, base_name=cfg.backbone)
        vector.save(directory / "vector.safetensors")
        make.save_head(head, directory / "head.safetensors", task)
        meta = {
            "task": task_name,
            "name": name,
            "classes": task.classes,
            "config": asdict(cfg),
            "sizes": {"train": len(task.train), "val": len(task.val), "test": len(task.test)},
            "head_val_acc": head_val["acc"],
            "head_test_acc": head_test["acc"],
            "finetuned_val_acc": result.best_metric,
            "finetuned_test_acc": finetuned_test["acc"],
            "best_epoch": result.best_epoch,
            "epochs": epochs,
            "steps": epochs * len(loader),
            "examples": epochs * len(loader) * cfg.batch_size,
            "vector_norm": vector.norm(),
            "seconds": time.perf_counter() - started,
        }
        if "balanced_acc" in head_test:
            meta.update(head_test_bal=head_test["balanced_acc"], finetuned_test_bal=finetuned_test["balanced_acc"],
                        selection_size=len(select))
        write_json(directory / "meta.json", meta)
        write_manifest(directory, task=task_name, bank=self.config.key())
        (directory / "train_state.pt").unlink(missing_ok=True)
        return meta


def _build_in_worker(factory: Callable[[], Bank], task: str, threads: int) -> dict:
    """One entry in a worker process (see :meth:`Bank.build`)."""
    torch.set_num_threads(threads)
    return factory().build_entry(task, progress=False)


class EntryMaker(Protocol):
    """How one bank entry is made for one modality: load a task, make a fresh base, make its frozen
    head, batch its training split, score a model, save the head. The image default is
    :class:`_ImageEntries`; :class:`taskvec.suites.text.TextSuite` is the text one."""

    def load(self, task: str, seed: int) -> Any: ...

    def base(self) -> nn.Module: ...

    def make_head(self, task: Any, base: nn.Module) -> nn.Module: ...

    def save_head(self, head: Any, path: Path, task: Any) -> None: ...

    def train_loader(self, task: Any) -> Loader: ...

    def epochs(self, loader: Loader) -> int: ...

    def selection_split(self, task: Any) -> Any: ...

    def scores(self, model: nn.Module, head: nn.Module, split: Any) -> dict[str, float]: ...


def _suite_loader(entries: EntryMaker) -> Callable[..., Any]:
    def load(name: str, seed: int = 0) -> Any:
        return entries.load(name, seed)

    return load


class _ImageEntries:
    """Image tasks: a linear head fitted on the pre-trained features of the training split."""

    def __init__(self, config: BankConfig, loader: Callable[..., Task]) -> None:
        self.config = config
        self.loader = loader
        self._norm: dict | None = None

    @property
    def norm(self) -> dict:
        if self._norm is None:
            self.base()
        assert self._norm is not None
        return self._norm

    def load(self, task: str, seed: int) -> Task:
        return self.loader(task, seed=seed)

    def base(self) -> nn.Module:
        backbone, spec = build_backbone(self.config.backbone, pretrained=self.config.pretrained)
        self._norm = {"mean": spec.mean, "std": spec.std}
        return backbone.eval()

    def make_head(self, task: Task, base: nn.Module) -> nn.Module:
        return fit_linear_head(
            features(base, task.train, self.config.resolution, **self.norm), task.train.labels, task.num_classes
        )

    def save_head(self, head: Any, path: Path, task: Task) -> None:
        head.save(path)

    def train_loader(self, task: Task) -> Loader:
        return _loader(task, self.config.resolution, self.config.batch_size, self.norm)

    def epochs(self, loader: Loader) -> int:
        return max(self.config.epochs, math.ceil(self.config.min_steps / len(loader)))

    def selection_split(self, task: Task) -> Any:
        return task.val

    def scores(self, model: nn.Module, head: nn.Module, split: Any) -> dict[str, float]:
        return {"acc": accuracy(model, head, split, self.config.resolution, **self.norm)}


def _loader(task: Task, resolution: int, batch_size: int, norm: dict) -> Loader:
    steps = (len(task.train) + batch_size - 1) // batch_size

    def make(generator: torch.Generator):
        for x, y in batches(task.train, batch_size, shuffle=True, generator=generator, resolution=resolution, **norm):
            yield augment(x, generator, "weak", **norm), y

    return Loader(make, steps)


def _head_loss(head: nn.Module):
    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(head(model(x)), y)

    return loss
