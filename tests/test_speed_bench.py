"""Smoke runs of the speed benchmarks at tiny size on CPU: every script runs end to end and reports
what it promises (ratios to the floor, peak memory, fisher's phase breakdown, scaling rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is not installed: import it from the checkout
    sys.path.insert(0, str(ROOT))
TINY = ["--presets", "tiny", "--batches", "2", "--batch-size", "1", "--seq-len", "16", "--rank", "4"]


def test_factor_memory_full_kfac_of_llama3_8b_exceeds_lora_ga_gradients_and_sketch_is_smaller():
    from benchmarks.speed import factor_memory
    from benchmarks.speed.workload import PRESETS

    shape = PRESETS["llama3-8b"]
    numbers = factor_memory.block_numbers(shape, k=64)
    full = numbers["input_factors"] + numbers["output_factors"]
    assert numbers["input_factors"] == 3 * 4096**2 + 14336**2  # q/k/v and gate/up share S_A
    assert numbers["output_factors"] == 2 * 4096**2 + 2 * 1024**2 + 2 * 14336**2 + 4096**2
    assert full > numbers["mean_grad"] > numbers["sketch_factors"] + numbers["sketch_mean_grad"]
    table = factor_memory.table(["llama3-8b", "llama3-70b"], rank=16, sketch_multiple=4)
    assert "| llama3-8b | 32 | 85.75 GiB |" in table and "| llama3-70b | 80 |" in table


@pytest.mark.slow
def test_compare_reports_every_method_against_the_floor_with_fisher_phases(tmp_path, capsys):
    from benchmarks.speed import compare

    out = tmp_path / "speed.json"
    methods = ["floor", "fisher", "lora_ga"]
    compare.main([*TINY, "--methods", *methods, "--repeats", "1", "--profile", "--out", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["runs"][0]["summary"]}
    assert set(rows) == set(methods) and not any("error" in r for r in rows.values())
    assert rows["floor"]["x_floor"] == 1.0 and rows["lora_ga"]["x_lora_ga"] == 1.0
    assert all(r["seconds"] > 0 and r["peak_mib"] >= 0 for r in rows.values())
    assert set(rows["fisher"]["phases"]) >= {"estimate", "select", "write"}
    assert rows["fisher"]["profile"]["accumulate"] > 0
    assert "| fisher |" in capsys.readouterr().out


def test_exact_rss_records_peaks_that_follow_live_tensors_and_what_the_wrapping_added(tmp_path):
    from benchmarks.speed import compare

    out = tmp_path / "exact.json"
    compare.main([*TINY, "--methods", "floor", "fisher", "--repeats", "1", "--exact-rss", "--out", str(out)])
    records = {r["method"]: r for r in json.loads(out.read_text())["runs"][0]["records"]}
    assert all(r["freed_blocks_unmapped"] for r in records.values())  # glibc here: the mmap threshold is fixed
    fisher = records["fisher"]
    # recorded for the budget arithmetic (at this size the adapter fits pages the heap already holds, so
    # what get_peft_model adds to the resident set may be 0: only its presence is checked)
    assert fisher["adapter_bytes"] > 0 and fisher["wrapping_bytes"] >= 0 and fisher["peak_bytes"] > 0


@pytest.mark.slow
def test_gpu_script_falls_back_to_cpu_at_tiny_size_and_prints_init_floor_and_lora_ga(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PRESET": "tiny",
        "BATCHES": "2",
        "SEQ_LEN": "16",
        "DTYPE": "fp32",
        "RANK": "4",
        "DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "OUT_DIR": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CUDA is not available: running on CPU" in done.stdout
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["floor", "lora_ga", "fisher"]
    assert not any("error" in r for r in records) and all(r["peak_bytes"] >= 0 for r in records)
    assert "| fisher |" in done.stdout and "| lora_ga |" in done.stdout and "FAILED" not in done.stdout


def test_gpu_script_refuses_the_8b_preset_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "OUT_DIR": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "set PRESET=tiny" in done.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_scaling_reports_one_and_two_process_collection_and_selection_times(capsys):
    from benchmarks.speed import scaling

    scaling.main(["--preset", "tiny", "--batches", "4", "--batch-size", "1", "--seq-len", "16", "--port", "29543"])
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
    ]
    cells = [[c.strip() for c in row.split("|")] for row in rows]
    assert len(rows) == 2 and cells[0][3] == cells[0][5] == "1.00"  # collection and selection speed-ups vs 1
    assert all(float(c[4]) > 0 for c in cells)  # selection timed under both process counts
    assert all(c[6] == "64" for c in cells)  # same global tokens in both runs
