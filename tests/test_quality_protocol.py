"""The quality protocol end to end at its `tiny` preset (real MiniLM, the real word-sentiment task):
grid → seeds → ablation planned from the records, run by two workers sharing one results file,
tables and plot written. Seconds, not evidence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_protocol_runs_every_stage_and_writes_tables(tmp_path):
    from benchmarks.quality.protocol import PRESETS, RunKey, plan

    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality.protocol", "--preset", "tiny", "--out", str(out), "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "protocol.jsonl").read_text().splitlines()]
    assert not [r for r in records if "failed" in r], [r["failed"] for r in records if "failed" in r]
    keys = [RunKey(r["task"], r["method"], r["lr"], r["seed"]) for r in records]
    assert len(keys) == len(set(keys))  # two workers, no run twice
    assert {r["method"] for r in records} == {"lora", "fisher", "fisher-nowhiten"}
    assert {r["seed"] for r in records} == {0, 1}
    assert plan(PRESETS["tiny"], records) == []  # nothing left: grid bracketed, seeds and ablation done
    tables = (out / "tables.md").read_text()
    assert "## word-sentiment" in tables and "Ablation" in tables and (out / "curves.png").stat().st_size > 0
