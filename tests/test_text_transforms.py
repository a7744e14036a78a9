"""Token batches (padding checked against the tokenizer itself) and seeded text augmentations."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from taskvec.data.text_transforms import (
    TokenizedTexts,
    augment_text,
    augment_texts,
    pad_sequences,
    span_mask,
    text_batches,
    token_dropout,
    word_jitter,
)
from taskvec.evaluate import balanced_accuracy

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "news",
    "about",
    "sport",
    "market",
    "film",
    "long",
    "text",
    "word",
]
TEXTS = [
    "the cat sat on the mat",
    "news",
    "a dog",
    "long long long text " * 20,  # past max_length: truncated
    "market news about sport and film",  # 'and' is not in the vocabulary: [UNK]
    "word",
    "the film",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    try:  # transformers 5 takes the vocabulary as `vocab`, 4.x as `vocab_file`
        tok = transformers.BertTokenizerFast(vocab=str(vocab))
    except TypeError:
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    if tok.convert_tokens_to_ids("cat") == tok.unk_token_id:
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    assert tok("the cat")["input_ids"] == [2, 5, 7, 3]  # the fixture really knows its words
    return tok


# ---------------------------------------------------------------------------------------------- batching


def test_batches_match_the_tokenizers_own_padding(tokenizer):
    labels = torch.arange(len(TEXTS))
    batches = list(text_batches(TEXTS, labels, tokenizer, batch_size=3, max_length=16))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    for b in batches:
        idx = b["index"].tolist()
        oracle = tokenizer([TEXTS[i] for i in idx], truncation=True, max_length=16, padding="longest")
        assert b["input_ids"].tolist() == oracle["input_ids"]
        assert b["attention_mask"].tolist() == oracle["attention_mask"]
        assert b["labels"].tolist() == idx
        for row, i in zip(b["input_ids"], idx, strict=True):  # each row: its own encoding, then [PAD]s
            own = tokenizer(TEXTS[i], truncation=True, max_length=16)["input_ids"]
            assert row[: len(own)].tolist() == own and set(row[len(own) :].tolist()) <= {tokenizer.pad_token_id}
    long = next(b for b in batches if 3 in b["index"].tolist())
    assert long["input_ids"].shape[1] == 16 and long["attention_mask"].sum(1).max() == 16
    assert batches[2]["input_ids"].shape[1] == len(tokenizer(TEXTS[6])["input_ids"])  # padded to its own longest


class WordTokenizer:
    """The Hugging Face call interface on whitespace words (ids = word lengths + 10), no transformers needed."""

    pad_token_id = 0

    def __call__(self, texts, *, truncation, max_length, padding):
        assert truncation and padding is False
        return {"input_ids": [[1, *[10 + len(w) for w in t.split()][: max_length - 2], 2] for t in texts]}


def test_batches_pad_each_row_to_the_batch_longest_without_transformers():
    texts = ["a bb ccc", "dddd", "", "e " * 50]
    batches = list(text_batches(texts, [3, 1, 0, 2], WordTokenizer(), batch_size=2, max_length=8))
    (b0, b1) = batches
    assert b0["input_ids"].tolist() == [[1, 11, 12, 13, 2], [1, 14, 2, 0, 0]]
    assert b0["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b1["input_ids"].tolist() == [[1, 2, 0, 0, 0, 0, 0, 0], [1, 11, 11, 11, 11, 11, 11, 2]]
    assert b1["attention_mask"].sum(1).tolist() == [2, 8]
    assert [b["labels"].tolist() for b in batches] == [[3, 1], [0, 2]]


def test_shuffle_is_seeded_and_covers_every_text(tokenizer):
    tok = TokenizedTexts(TEXTS, None, tokenizer, max_length=16)
    order = lambda **kw: torch.cat([b["index"] for b in tok.batches(2, **kw)]).tolist()  # noqa: E731
    assert order() == list(range(len(TEXTS)))
    a, b, c = order(shuffle=True, seed=5), order(shuffle=True, seed=5), order(shuffle=True, seed=6)
    assert a == b and sorted(a) == list(range(len(TEXTS))) and a != c
    by_len = order(sort_by_length=True)
    lengths = tok.lengths()[by_len].tolist()
    assert lengths == sorted(lengths)
    assert all("labels" not in b for b in tok.batches(2))
    assert sum(b["index"].numel() for b in tok.batches(3, drop_last=True)) == 6


def test_batching_errors(tokenizer):
    with pytest.raises(ValueError, match=r"\(3,\) labels for 7 texts"):
        TokenizedTexts(TEXTS, [0, 1, 2], tokenizer)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(text_batches(TEXTS, None, tokenizer, 0))
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------- augmentations

SENTENCE = " ".join(f"w{i}" for i in range(40))


def test_augmentations_are_pure_functions_of_text_and_seed():
    for f in (token_dropout, span_mask, word_jitter, augment_text):
        assert f(SENTENCE, seed=3) == f(SENTENCE, seed=3)
        assert f(SENTENCE, seed=3) != f(SENTENCE, seed=4)
    views = augment_texts([SENTENCE, SENTENCE], seed=1)
    assert views[0] != views[1]  # each text gets its own view
    assert views == augment_texts([SENTENCE, SENTENCE], seed=1)


def test_augmentations_same_in_another_process_with_another_hash_seed():
    code = (
        "from taskvec.data.text_transforms import augment_texts, span_mask\n"
        f"print(repr((augment_texts([{SENTENCE!r}] * 2, seed=7), span_mask({SENTENCE!r}, seed=7))))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="999", PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr((augment_texts([SENTENCE] * 2, seed=7), span_mask(SENTENCE, seed=7)))


def test_token_dropout_keeps_an_ordered_subsequence():
    words = SENTENCE.split()
    out = token_dropout(SENTENCE, 0.3, seed=0).split()
    it = iter(words)
    assert all(w in it for w in out)  # subsequence: order kept
    assert 0 < len(out) < len(words)
    assert token_dropout(SENTENCE, 0.0, seed=0) == SENTENCE
    assert token_dropout("one", 0.9, seed=0) == "one"


def test_span_mask_hides_one_contiguous_span():
    out = span_mask(SENTENCE, 0.2, seed=2).split()
    words = SENTENCE.split()
    masked = [i for i, w in enumerate(out) if w == "[MASK]"]
    assert len(out) == len(words) and len(masked) == math.ceil(0.2 * 40)
    assert masked == list(range(masked[0], masked[0] + len(masked)))
    assert [w for w in out if w != "[MASK]"] == words[: masked[0]] + words[masked[-1] + 1 :]
    assert span_mask("single", 0.5, seed=0) == "single"


def test_word_jitter_moves_words_at_most_k_places():
    for k in (0, 1, 3):
        out = word_jitter(SENTENCE, k, seed=1).split()
        assert sorted(out) == sorted(SENTENCE.split())
        assert max(abs(out.index(f"w{i}") - i) for i in range(40)) <= k
    assert word_jitter(SENTENCE, 0, seed=1) == SENTENCE


# ---------------------------------------------------------------------------------------------- metric


def test_balanced_accuracy_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(50), torch.ones(10), torch.full((5,), 2), torch.full((3,), 4)]).long()
    for trial in range(5):
        pred = torch.randint(0, 5, labels.shape, generator=g)  # class 3 only in predictions
        if trial == 0:
            pred = torch.zeros_like(labels)  # the majority predictor: accuracy .74, balanced .25
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oracle = metrics.balanced_accuracy_score(labels.numpy(), pred.numpy())
        assert balanced_accuracy(pred, labels) == pytest.approx(oracle, abs=1e-12)
    assert balanced_accuracy(torch.zeros_like(labels), labels) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="3 predictions for 68 labels"):
        balanced_accuracy(pred[:3], labels)
