"""Token batches for text models (dynamic padding, seeded shuffles) and seeded text augmentations.

Batching: texts are tokenised once (truncated to ``max_length`` tokens, no padding), and each batch is
padded only to its own longest text. Real texts of the text suite are mostly 9-42 tokens, so this runs
several times faster than padding everything to 128. ``sort_by_length=True`` groups similar lengths for
evaluation (less padding still); every batch carries ``index``, the positions of its rows in the input,
so predictions can be put back in order.

Augmentations work on words (whitespace tokens), not on the model's sub-word tokens, so they are
tokenizer-agnostic pure functions of ``(text, seed)``:

* :func:`token_dropout` drops each word with probability ``p``: the view keeps the topic words of a
  long text but not all of them, like a random crop;
* :func:`span_mask` replaces one contiguous run of words by the tokenizer's mask token, as a cut-out
  hides a patch;
* :func:`word_jitter` moves every word at most ``k`` places.

What works, measured with the frozen all-MiniLM-L6-v2 encoder (mean pooling) on 300 test texts each of
BBC news, WordNet nouns and fortunes (``benchmarks/text_tasks_report.py``; a probe trained on clean
texts, then applied to views): dropout 0.1 and jitter 2 keep the probe within 0-2 points of clean
(cosine to the clean embedding .95-.98); :func:`augment_text` (dropout 0.1 then jitter 2, cosine
.91-.94, probe -1.6 to -2.4 points) is the default view for few-shot training, SimCLR and UFM. Span
masking is NOT recommended with mean pooling: the ``[MASK]`` tokens pull the sentence embedding away
(cosine .42-.80) and the probe loses 33-39 points on fortunes. Dropout 0.3 is a stronger view that
still keeps most of the label (probe -1.6 to -8.3 points).

The same ``(text, seed)`` always gives the same view: every random choice comes from a
``random.Random`` seeded with a string (hashed with SHA-512 by Python, so independent of
``PYTHONHASHSEED`` and of the platform).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "TokenizedTexts",
    "augment_packed",
    "augment_text",
    "augment_texts",
    "pad_sequences",
    "span_mask",
    "text_batches",
    "token_dropout",
    "word_jitter",
]

DEFAULT_MAX_LENGTH = 128
"""Tokens per text: long enough for news leads (BBC zero-shot .835 at 128, .788 at 64 tokens)."""


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask), both int64 (B, L)."""
    if not seqs:
        raise ValueError("pad_sequences: no sequence to pad")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
            mask[i, : len(s)] = 1
    return ids, mask


class TokenizedTexts:
    """Texts tokenised once (a Hugging Face tokenizer, truncation to ``max_length``) and their labels.

    Why a class: a training run walks the same texts for many epochs; tokenising once and padding per
    batch keeps the tokenizer out of the loop.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: torch.Tensor | Sequence[int] | None,
        tokenizer: Any,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        texts = list(texts)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad_token_id: cannot pad batches")
        self.labels: torch.Tensor | None = None
        if labels is not None:
            lab = torch.as_tensor(labels, dtype=torch.int64)
            if lab.shape != (len(texts),):
                raise ValueError(f"{tuple(lab.shape)} labels for {len(texts)} texts")
            self.labels = lab
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False) if texts else {"input_ids": []}
        self.ids: list[list[int]] = [list(map(int, s)) for s in enc["input_ids"]]
        self.pad_id = int(pad_id)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> torch.Tensor:
        """Number of tokens of each text (special tokens included)."""
        return torch.tensor([len(s) for s in self.ids], dtype=torch.int64)

    def order(self, *, shuffle: bool = False, seed: int = 0, sort_by_length: bool = False) -> torch.Tensor:
        """The order batches walk the texts in: as given, shuffled under ``seed``, or by length."""
        n = len(self.ids)
        if shuffle and sort_by_length:
            raise ValueError("choose shuffle or sort_by_length, not both")
        if shuffle:
            return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        if sort_by_length:
            return torch.argsort(self.lengths(), stable=True)
        return torch.arange(n)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        sort_by_length: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``{"input_ids", "attention_mask", "index"[, "labels"]}``, each padded to its longest text."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = self.order(shuffle=shuffle, seed=seed, sort_by_length=sort_by_length)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and idx.numel() < batch_size:
                break
            ids, mask = pad_sequences([self.ids[i] for i in idx.tolist()], self.pad_id)
            batch = {"input_ids": ids, "attention_mask": mask, "index": idx.clone()}
            if self.labels is not None:
                batch["labels"] = self.labels[idx]
            yield batch


def text_batches(
    texts: Sequence[str],
    labels: torch.Tensor | Sequence[int] | None,
    tokenizer: Any,
    batch_size: int,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    sort_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass of dynamically padded batches over ``texts`` (see :class:`TokenizedTexts`)."""
    tok = TokenizedTexts(texts, labels, tokenizer, max_length)
    yield from tok.batches(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, sort_by_length=sort_by_length)


# --------------------------------------------------------------------------------------------------
# augmentations: pure functions of (text, seed)


def _rng(seed: int | str, op: str) -> random.Random:
    return random.Random(f"taskvec-text-aug:{op}:{seed}")


def token_dropout(text: str, p: float = 0.1, *, seed: int | str) -> str:
    """Drop each word with probability ``p`` (at least one word is always kept)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"token_dropout: p must be in [0, 1), got {p}")
    words = text.split()
    if len(words) <= 1:
        return " ".join(words)
    rng = _rng(seed, "dropout")
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept) if kept else words[rng.randrange(len(words))]


def span_mask(text: str, frac: float = 0.15, *, seed: int | str, mask_token: str = "[MASK]") -> str:
    """Replace one contiguous span of ``ceil(frac * words)`` words by ``mask_token`` each.

    ``mask_token`` should be the tokenizer's (``tokenizer.mask_token``), so it stays one token.
    Texts of one word are returned unchanged (masking them would leave nothing).
    """
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"span_mask: frac must be in [0, 1), got {frac}")
    words = text.split()
    n = len(words)
    width = min(math.ceil(frac * n), n - 1)
    if width <= 0:
        return " ".join(words)
    start = _rng(seed, "span").randrange(n - width + 1)
    return " ".join(words[:start] + [mask_token] * width + words[start + width :])


def word_jitter(text: str, k: int = 2, *, seed: int | str) -> str:
    """Local shuffle: word i is sorted by ``i + u``, ``u ~ U[0, k + 1)``, so it moves at most ``k`` places."""
    if k < 0:
        raise ValueError(f"word_jitter: k must be >= 0, got {k}")
    words = text.split()
    rng = _rng(seed, "jitter")
    keys = [i + rng.uniform(0, k + 1) for i in range(len(words))]
    return " ".join(w for _, w in sorted(zip(keys, words, strict=True), key=lambda kw: kw[0]))


def augment_text(text: str, *, seed: int | str, p_drop: float = 0.1, jitter: int = 2) -> str:
    """The default view: :func:`token_dropout` then :func:`word_jitter` (each seeded from ``seed``)."""
    return word_jitter(token_dropout(text, p_drop, seed=seed), jitter, seed=seed)


def augment_texts(texts: Sequence[str], *, seed: int, p_drop: float = 0.1, jitter: int = 2) -> list[str]:
    """:func:`augment_text` over a list; text ``i`` uses the seed ``"{seed}:{i}"`` (views differ per text)."""
    return [augment_text(t, seed=f"{seed}:{i}", p_drop=p_drop, jitter=jitter) for i, t in enumerate(texts)]


def augment_packed(
    x: torch.Tensor,
    generator: torch.Generator | None,
    *,
    p_drop: float,
    jitter: int,
    special: Collection[int],
    continuation: Collection[int],
    pad_id: int,
) -> torch.Tensor:
    """Word dropout then word-order jitter on packed token batches ``(B, 2, L)`` (ids, mask), re-padded.

    Why on tokens: objectives (SimCLR, UFM) augment the batch they are given, which for text is the
    packed tensor, so the view is made there without going back to strings. Words, not word pieces, are
    the unit (a piece in ``continuation``, e.g. WordPiece's ``##``-tokens, stays with the piece before
    it), as the string augmentations measured above. Tokens in ``special`` ([CLS], [SEP], ...) are never
    dropped and never moved; at least one other word is kept. Each word is dropped with probability
    ``p_drop``, then kept word ``i`` is sorted by ``i + u``, ``u ~ U[0, jitter + 1)``, so it moves at most
    ``jitter`` places. Rows are right-padded with ``pad_id`` to the input's ``L`` (a view is never
    longer), and the mask marks exactly the kept tokens. All randomness comes from two draws of
    ``generator`` (torch's global generator when None), so the output is a function of ``(x, generator)``.
    """
    if x.dim() != 3 or x.shape[1] != 2 or x.dtype != torch.int64:
        raise ValueError(f"augment_packed expects int64 (B, 2, L) packed tokens; got {x.dtype} {tuple(x.shape)}")
    if not 0.0 <= p_drop < 1.0 or jitter < 0:
        raise ValueError(f"augment_packed: p_drop must be in [0, 1) and jitter >= 0; got {p_drop}, {jitter}")
    batch, _, length = x.shape
    drop_u = torch.rand(batch, length, generator=generator).tolist()
    shift_u = torch.rand(batch, length, generator=generator).tolist()
    ids_all, mask_all = x[:, 0].cpu(), x[:, 1].cpu()
    out = torch.zeros((batch, 2, length), dtype=torch.int64)
    out[:, 0] = int(pad_id)
    for row in range(batch):
        ids = ids_all[row][mask_all[row].bool()].tolist()
        content = [i for i, t in enumerate(ids) if t not in special]
        if content:
            first, last = content[0], content[-1]
            words: list[list[int]] = []  # positions in ids, a word per list
            for i in range(first, last + 1):
                joins = words and ids[i] in continuation and ids[i] not in special and ids[words[-1][-1]] not in special
                if joins:
                    words[-1].append(i)
                else:
                    words.append([i])
            droppable = [ids[w[0]] not in special for w in words]
            keep = [not d or drop_u[row][w[0]] >= p_drop for w, d in zip(words, droppable, strict=True)]
            if not any(k for k, d in zip(keep, droppable, strict=True) if d):
                keep[max((j for j, d in enumerate(droppable) if d), key=lambda j: drop_u[row][words[j][0]])] = True
            kept = [w for w, k in zip(words, keep, strict=True) if k]
            keys = [rank + (jitter + 1) * shift_u[row][w[0]] for rank, w in enumerate(kept)]
            order = sorted(range(len(kept)), key=lambda j: (keys[j], j))
            ids = ids[:first] + [ids[i] for j in order for i in kept[j]] + ids[last + 1 :]
        out[row, 0, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        out[row, 1, : len(ids)] = 1
    return out.to(x.device)
