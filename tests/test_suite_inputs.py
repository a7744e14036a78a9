"""What test-time adaptation asks of a suite, on both suites: ``augment_inputs`` (views of input tensors,
a function of ``(x, generator)``), ``unlabelled`` (a split without labels) and ``unlabelled_loader``
(input batches that never carry labels; UFM's two streams). Text views are checked against independent
oracles on hand-made token rows: special tokens kept in place, mask consistent with ids, whole words
dropped at about the asked rate, every word moved at most ``jitter`` places."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from taskvec.batching import unlabelled_loader
from taskvec.data import ImageSet, augment
from taskvec.data.text import TextSet
from taskvec.data.text_transforms import augment_packed
from taskvec.objectives import TrustedTargets
from taskvec.suites.vision import VisionSuite

PAD, CLS, SEP = 0, 2, 3
SPECIAL = {0, 1, 2, 3, 4}
CONTINUATION = set(range(100, 200))  # "##" pieces: ids 100-199 continue the word before them


def _rows(batch: int, words: int, seed: int = 0) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Packed (B, 2, L) rows [CLS] w_1 .. w_n [SEP] [PAD]...: word i is id 10 + i, followed by a ``##`` piece
    100 + i when i is odd; rows have different lengths. Returns the rows and every row's words."""
    generator = torch.Generator().manual_seed(seed)
    rows, all_words = [], []
    for _ in range(batch):
        n = int(torch.randint(words // 2, words + 1, (1,), generator=generator))
        row_words = [[10 + i] + ([100 + i] if i % 2 else []) for i in range(n)]
        rows.append([CLS, *[t for w in row_words for t in w], SEP])
        all_words.append(row_words)
    width = max(len(r) for r in rows) + 3
    x = torch.zeros((batch, 2, width), dtype=torch.int64)
    for i, r in enumerate(rows):
        x[i, 0, : len(r)] = torch.tensor(r)
        x[i, 1, : len(r)] = 1
    return x, all_words


def _view(x: torch.Tensor, seed: int | None, p: float, jitter: int) -> torch.Tensor:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return augment_packed(x, generator, p_drop=p, jitter=jitter, special=SPECIAL, continuation=CONTINUATION,
                          pad_id=PAD)


def _words_of(row: torch.Tensor) -> list[list[int]]:
    """Oracle parse of one output row: mask must be a prefix, ids padded after it, [CLS] ... [SEP]."""
    ids, mask = row[0].tolist(), row[1].tolist()
    n = sum(mask)
    assert mask == [1] * n + [0] * (len(mask) - n), "mask is not a prefix of ones"
    assert ids[n:] == [PAD] * (len(ids) - n), "ids after the mask are not padding"
    assert ids[0] == CLS and ids[n - 1] == SEP and not SPECIAL & set(ids[1 : n - 1])
    words: list[list[int]] = []
    for t in ids[1 : n - 1]:
        if t in CONTINUATION:
            assert words and words[-1][0] == t - 90, f"piece {t} separated from its word"
            words[-1].append(t)
        else:
            words.append([t])
    return words


def test_text_views_keep_specials_and_mask_and_drop_about_p_of_the_words():
    x, words = _rows(300, 16)
    before = x.clone()
    view = _view(x, 0, 0.3, 0)
    assert torch.equal(x, before), "the input batch was modified"
    assert view.shape == x.shape and view.dtype == torch.int64
    total = dropped = 0
    for row, original in zip(view, words, strict=True):
        kept = _words_of(row)
        assert kept and all(w in original for w in kept)
        positions = [original.index(w) for w in kept]
        assert positions == sorted(positions)  # jitter 0: the order is kept
        total, dropped = total + len(original), dropped + len(original) - len(kept)
    assert dropped / total == pytest.approx(0.3, abs=0.03)


def test_text_jitter_moves_every_word_at_most_k_places_and_views_are_seeded():
    x, words = _rows(200, 12)
    view = _view(x, 1, 0.0, 2)
    moved = 0
    for row, original in zip(view, words, strict=True):
        kept = _words_of(row)
        assert sorted(kept) == sorted(original)  # p = 0: a permutation of the words
        shifts = [abs(original.index(w) - i) for i, w in enumerate(kept)]
        assert max(shifts) <= 2
        moved += sum(s > 0 for s in shifts)
    assert moved > 0
    assert torch.equal(_view(x, 1, 0.0, 2), view)
    assert not torch.equal(_view(x, 2, 0.0, 2), view)
    torch.manual_seed(5)
    a = _view(x, None, 0.3, 2)  # None: torch's global generator, which fit reseeds every epoch
    torch.manual_seed(5)
    assert torch.equal(_view(x, None, 0.3, 2), a)


def test_text_views_keep_at_least_one_word_and_refuse_bad_input():
    x, _ = _rows(50, 2)
    for row in _view(x, 0, 0.99, 1):
        assert len(_words_of(row)) >= 1
    with pytest.raises(ValueError, match=r"\(B, 2, L\)"):
        _view(x[:, 0], 0, 0.1, 1)
    with pytest.raises(ValueError, match="p_drop"):
        _view(x, 0, 1.0, 1)


NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


class NoLabels(ImageSet):
    """An ImageSet whose labels must not be read."""

    @property
    def labels(self) -> torch.Tensor:
        raise AssertionError("labels were read")

    @labels.setter
    def labels(self, value: torch.Tensor) -> None:
        self._labels = value

    def __post_init__(self) -> None:
        pass


def test_vision_suite_inputs_are_the_image_functions_and_read_no_label():
    suite = VisionSuite.for_images(16, NORM)
    images = torch.randint(0, 255, (20, 3, 12, 12), dtype=torch.uint8)
    split = NoLabels(images, torch.zeros(20, dtype=torch.long))
    blind = suite.unlabelled(split)
    assert torch.equal(blind.images, images) and (blind.labels == -1).all()
    trusted = (torch.tensor([1, 5]), torch.tensor([0, 1]))
    for given in (None, trusted):
        mine = list(suite.unlabelled_loader(split, batch_size=4, trusted=given).epoch(torch.Generator().manual_seed(3)))
        theirs = list(unlabelled_loader(images, 16, NORM, 4, given).epoch(torch.Generator().manual_seed(3)))
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs, strict=True):
            a, b = (a, b) if given is None else (a[0], b[0])
            assert torch.equal(a, b)
    x = next(iter(unlabelled_loader(images, 16, NORM, 8).epoch(torch.Generator().manual_seed(0))))
    view = suite.augment_inputs(x, torch.Generator().manual_seed(4), "strong")
    assert torch.equal(view, augment(x, torch.Generator().manual_seed(4), "strong", **NORM))
    assert not torch.equal(view, x)


transformers = pytest.importorskip("transformers")
import test_suite_text  # noqa: E402
from test_suite_text import fake_task, make_suite  # noqa: E402

tiny = test_suite_text.tiny  # the tiny generated BERT + word tokenizer (a fixture)


class TextNoLabels(TextSet):
    @property
    def labels(self) -> torch.Tensor:
        raise AssertionError("labels were read")

    @labels.setter
    def labels(self, value: torch.Tensor) -> None:
        self._labels = value

    def __post_init__(self) -> None:
        pass


def test_text_suite_loader_batches_the_tokenizers_padding_and_reads_no_label(tiny, tmp_path):
    suite = make_suite(tiny, tmp_path)
    texts = fake_task("alpha").test.texts
    split = TextNoLabels(texts, torch.zeros(len(texts), dtype=torch.long))
    blind = suite.unlabelled(split)
    assert blind.texts == texts and (blind.labels == -1).all()
    tok = tiny[1]
    seen = []
    for x in suite.unlabelled_loader(split, batch_size=5).epoch(torch.Generator().manual_seed(0)):
        assert x.dim() == 3 and x.shape[1] == 2
        # Oracle: which texts are these? The tokenizer's own padding of them must equal the batch.
        rows = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(x[:, 0], x[:, 1], strict=True)]
        idx = [texts.index(r) for r in rows]
        enc = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
        assert torch.equal(x[:, 0], enc["input_ids"]) and torch.equal(x[:, 1], enc["attention_mask"])
        seen += idx
    assert sorted(seen) == list(range(len(texts)))  # one pass over every text
    trusted = (torch.tensor([0, 4, 8]), torch.tensor([0, 1, 2]))
    pseudo = {0: 0, 4: 1, 8: 2}
    loader = suite.unlabelled_loader(split, batch_size=4, trusted=trusted)
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == 5  # 9 untrusted texts, 2 per batch
    for x, targets in batches:
        assert isinstance(targets, TrustedTargets) and len(targets) == len(x)
        assert (targets.targets[:-2] == -1).all()
        for row, mask, target in zip(x[-2:, 0], x[-2:, 1], targets.targets[-2:].tolist(), strict=True):
            text = texts.index(tok.decode(row[mask.bool()], skip_special_tokens=True))
            assert pseudo[text] == target  # a trusted text, carrying its own pseudo-label


def test_text_suite_views_keep_cls_sep_and_words(tiny, tmp_path):
    suite = make_suite(tiny, tmp_path)
    tok = tiny[1]
    texts = fake_task("beta").test.texts
    x = next(iter(suite.unlabelled_loader(suite.unlabelled(fake_task("beta").test), batch_size=8).epoch(
        torch.Generator().manual_seed(0))))
    view = suite.augment_inputs(x, torch.Generator().manual_seed(1), "strong")
    assert view.shape == x.shape
    assert torch.equal(view, suite.augment_inputs(x, torch.Generator().manual_seed(1), "strong"))
    for row in view:
        n = int(row[1].sum())
        assert row[0, 0] == tok.cls_token_id and row[0, n - 1] == tok.sep_token_id and (row[1, :n] == 1).all()
        words = Counter(tok.decode(row[0, 1 : n - 1]).split())
        assert words and any(words <= Counter(t.split()) for t in texts)  # some text's words, fewer of them
    with pytest.raises(ValueError, match="medium"):
        suite.augment_inputs(x, None, "medium")
