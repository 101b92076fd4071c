"""The demo's task builder and runner at a tiny size: real MiniLM weights, real (shipped) text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _write_plays(folder: Path) -> None:
    """Two "plays" in Project Gutenberg's layout (speaker line, speech, blank line) from shipped text."""
    rows = [json.loads(line)["text"] for line in (ROOT / "recipes/tiny/data/text.jsonl").read_text().splitlines()]
    lines = list(dict.fromkeys(line for row in rows for line in row.split("\n") if ": " in line))
    half = len(lines) // 2
    for name, part in (("first", lines[:half]), ("second", lines[half:])):
        blocks = ["FIRST PLAY\n\nby William Shakespeare\n\n[Enter all.]"]
        for line in part:
            speaker, speech = line.split(": ", 1)
            blocks.append(f"{speaker.upper()}.\n{speech} [Aside.]")
        (folder / f"{name}_gut.txt").write_text("\n\n".join(blocks) + "\n")


def test_speeches_drop_speaker_and_stage_directions(tmp_path):
    from benchmarks.quality.shakespeare import speeches

    text = "ACT I.\n\nScene I. A heath.\n\nHAMLET.\nTo be, or not to be, [Aside.] that is\nthe question.\n\nHor.\nAy.\n"
    assert speeches(text, min_words=3) == ["To be, or not to be, that is the question."]


@pytest.mark.slow
def test_default_and_fisher_runs_start_equal_and_report_costs(tmp_path):
    from benchmarks.demo import init_cost, side_by_side
    from benchmarks.quality.encoder import encode
    from benchmarks.quality.runner import RunSpec, run
    from benchmarks.quality.shakespeare import play_task
    from fisher_core import FisherConfig

    _write_plays(tmp_path)
    task = play_task(("first", "second"), train_per_play=12, test_per_play=6, min_words=6, texts=tmp_path)
    assert set(task.train_texts).isdisjoint(task.test_texts)
    assert play_task(("first", "second"), train_per_play=12, test_per_play=6, min_words=6, texts=tmp_path) == task
    train, test = encode(task, max_length=24)
    base = RunSpec(steps=3, batch_size=4, calibration_batches=2, head_warmup=1, eval_at=(0.0, 1.0))
    fisher_spec = RunSpec(**{**vars(base), "method": "fisher", "fisher": FisherConfig(num_batches=2, progress=False)})
    default, fisher = (run(spec, train, test, task.num_labels) for spec in (base, fisher_spec))

    assert [p.step for p in default.curve] == [p.step for p in fisher.curve] == [0, 3]
    # same model, same head, and both step-0 policies keep the outputs: identical at step 0
    assert math.isclose(default.curve[0].test_loss, fisher.curve[0].test_loss, rel_tol=1e-5)
    assert all(math.isfinite(p.test_loss) for p in default.curve + fisher.curve)
    assert fisher.curve[-1].test_loss != default.curve[-1].test_loss  # the init changed training
    assert fisher.init_seconds > 0 and default.trainable_params == fisher.trainable_params
    assert "fisher-natural init" in init_cost(default, fisher) and len(side_by_side(default, fisher).splitlines()) == 4
