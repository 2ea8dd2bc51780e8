"""The six text-classification tasks, built from text that Debian packages ship.

Nothing is downloaded: ``bench/accuracy/setup.sh`` installs ``wordnet-base``, ``fortunes``,
``fortunes-min`` and ``bible-kjv`` (its ``bible`` program reads ``bible-kjv-text``). Each task
is a list of (text, label) pairs, split into train / validation / test by a seeded hash of the
text (so a text lands in the same split whatever else changes), then balanced: every class
gets at most ``size // n_classes`` examples of each split, the ones with the smallest hashes.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SPLITS", "TASK_NAMES", "Sizes", "Task", "load_tasks"]

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
SPLITS = ("train", "val", "test")
#: Share of the hash range that goes to the test and validation splits; the rest is train.
TEST_SHARE, VAL_SHARE = 0.25, 0.10

# WordNet lexicographer files (lexnames(5WN)): the supersense of a synset.
NOUN_LEXFILES = {
    4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition",
    10: "communication", 11: "event", 12: "feeling", 13: "food", 14: "group", 15: "location",
    16: "motive", 17: "object", 18: "person", 19: "phenomenon", 20: "plant", 21: "possession",
    22: "process", 23: "quantity", 24: "relation", 25: "shape", 26: "state", 27: "substance",
    28: "time",
}  # fmt: skip
VERB_LEXFILES = {
    29: "body", 30: "change", 31: "cognition", 32: "communication", 33: "competition",
    34: "consumption", 35: "contact", 36: "creation", 37: "emotion", 38: "motion",
    39: "perception", 40: "possession", 41: "social", 42: "stative", 43: "weather",
}  # fmt: skip
#: Supersenses with fewer synsets than this are left out (noun: 14 classes kept, verb: 12).
MIN_CLASS = {"noun": 2000, "verb": 400}

FORTUNE_COLLECTIONS = (
    "computers", "definitions", "men-women", "people", "politics", "science", "songs-poems",
    "zippy",
)  # fmt: skip

KJV_GROUPS: dict[str, tuple[str, ...]] = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": (
        "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
        "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther",
    ),
    "poetry": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": (
        "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
        "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
        "Malachi",
    ),
    "gospels_acts": ("Matthew", "Mark", "Luke", "John", "Acts"),
    "epistles_revelation": (
        "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians",
        "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
        "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John",
        "Jude", "Revelation",
    ),
}  # fmt: skip
GOSPELS = ("Matthew", "Mark", "Luke", "John")


@dataclass(frozen=True)
class Sizes:
    """Examples per task and split (before the per-class cap rounds them down)."""

    train: int
    val: int
    test: int


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    classes: tuple[str, ...]
    splits: dict[str, list[tuple[str, int]]]  # split -> [(text, class index)]

    def counts(self) -> dict[str, int]:
        return {s: len(v) for s, v in self.splits.items()}


def _space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _wordnet_glosses(pos: str) -> list[tuple[str, int]]:
    """(definition, lex_filenum) for every synset of ``data.<pos>`` (wndb(5WN) format); the
    quoted usage examples after the definition are dropped, since they often name the word."""
    out = []
    with open(WORDNET / f"data.{pos}", encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            if definition:
                out.append((_space(definition), int(head.split()[1])))
    return out


def _supersense(pos: str, names: dict[int, str]) -> list[tuple[str, str]]:
    pairs = [(t, names[lex]) for t, lex in _wordnet_glosses(pos) if lex in names]
    sizes: dict[str, int] = defaultdict(int)
    for _, label in pairs:
        sizes[label] += 1
    return [(t, label) for t, label in pairs if sizes[label] >= MIN_CLASS[pos]]


def noun_supersense() -> list[tuple[str, str]]:
    return _supersense("noun", NOUN_LEXFILES)


def verb_supersense() -> list[tuple[str, str]]:
    return _supersense("verb", VERB_LEXFILES)


def part_of_speech() -> list[tuple[str, str]]:
    names = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    return [(t, label) for pos, label in names.items() for t, _ in _wordnet_glosses(pos)]


def fortune_collection() -> list[tuple[str, str]]:
    pairs = []
    for name in FORTUNE_COLLECTIONS:
        text = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        pairs += [(_space(e), name) for e in re.split(r"^%$", text, flags=re.M) if e.strip()]
    return pairs


def _kjv_verses() -> list[tuple[str, str]]:
    """(verse, book) for the whole King James Bible, read with the ``bible`` program."""
    exe = shutil.which("bible")
    if exe is None:
        raise RuntimeError("the `bible` program is missing: run bench/accuracy/setup.sh")
    text = subprocess.run(
        [exe, "-l10000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    verses, book = [], None
    for line in text.splitlines():
        if m := re.match(r"^\s+\d+ (.*)$", line):
            verses.append((_space(m.group(1)), book))
        elif m := re.match(r"^(\S.*) \d+$", line):
            book = m.group(1)
    return verses


def kjv_book_group() -> list[tuple[str, str]]:
    group_of = {book: g for g, books in KJV_GROUPS.items() for book in books}
    return [(t, group_of[b]) for t, b in _kjv_verses()]


def gospel_author() -> list[tuple[str, str]]:
    return [(t, b) for t, b in _kjv_verses() if b in GOSPELS]


_BUILDERS: dict[str, tuple[Callable[[], list[tuple[str, str]]], str]] = {
    "noun_supersense": (noun_supersense, "WordNet noun gloss → noun supersense (lexicographer file)"),
    "verb_supersense": (verb_supersense, "WordNet verb gloss → verb supersense (lexicographer file)"),
    "part_of_speech": (part_of_speech, "WordNet gloss → part of speech (noun, verb, adjective, adverb)"),
    "fortune_collection": (fortune_collection, "fortune-cookie text → its collection file"),
    "kjv_book_group": (kjv_book_group, "KJV verse → book group (law, history, poetry, prophets, gospels+Acts, epistles+Revelation)"),
    "gospel_author": (gospel_author, "KJV verse of a Gospel → which Gospel (Matthew, Mark, Luke, John)"),
}  # fmt: skip
TASK_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _unit_hash(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def make_task(name: str, pairs: list[tuple[str, str]], sizes: Sizes, seed: int) -> Task:
    """Split ``pairs`` by the hash of the text and balance the classes (see the module doc).
    A text that occurs with two labels is dropped; repeats with one label count once."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in pairs:
        labels_of[text].add(label)
    unique = {t: next(iter(ls)) for t, ls in labels_of.items() if len(ls) == 1}
    classes = tuple(sorted(set(unique.values())))
    index = {c: i for i, c in enumerate(classes)}
    buckets: dict[tuple[str, int], list[tuple[float, str]]] = defaultdict(list)
    for text, label in unique.items():
        u = _unit_hash(seed, text)
        split = "test" if u < TEST_SHARE else "val" if u < TEST_SHARE + VAL_SHARE else "train"
        buckets[split, index[label]].append((u, text))
    splits: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        cap = getattr(sizes, split) // len(classes)
        rows = []
        for c in range(len(classes)):
            rows += [(t, c) for _, t in sorted(buckets[split, c])[:cap]]
        rows.sort(key=lambda r: _unit_hash(seed + 1, r[0]))  # mix the classes
        splits[split] = rows
    return Task(name, _BUILDERS[name][1], classes, splits)


def load_tasks(sizes: Sizes, seed: int = 0, names: tuple[str, ...] = TASK_NAMES) -> list[Task]:
    """Build the named tasks (all six by default)."""
    return [make_task(n, _BUILDERS[n][0](), sizes, seed) for n in names]
