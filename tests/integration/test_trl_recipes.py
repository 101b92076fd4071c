"""The TRL recipes run end to end on the tiny Llama (CPU) and leave adapters that load on the original base."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fisher_core.write import load_record

pytestmark = [pytest.mark.slow, pytest.mark.trl]  # the real TRL trainers, end to end

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path[:0] = [str(RECIPES / "tiny"), str(RECIPES / "trl")]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"recipe_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loads_on_original_base(model_dir: Path, adapter_dir: Path) -> None:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    out = model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(out).all()


def test_tiny_recipes_train_and_save(tiny_llama_dir, tmp_path):
    recipe = load(RECIPES / "tiny" / "trl_tiny.py")
    recipe.main(["--task", "sft", "--model", str(tiny_llama_dir), "--output-dir", str(tmp_path / "sft")])
    assert load_record(tmp_path / "sft") is None  # default policy zero: the base was never changed
    loads_on_original_base(tiny_llama_dir, tmp_path / "sft")
    recipe.main(["--task", "dpo", "--model", str(tiny_llama_dir), "--output-dir", str(tmp_path / "dpo")])
    assert load_record(tmp_path / "dpo") is None
    loads_on_original_base(tiny_llama_dir, tmp_path / "dpo")


def test_gpu_recipes_run_on_tiny_model_with_fisher_flags(tiny_llama_dir, tmp_path):
    common = ["--model", str(tiny_llama_dir), "--max-steps", "1", "--rank", "4", "--max-length", "64"]
    common += ["--batch-size", "2", "--grad-accum", "1", "--fisher-num-batches", "2", "--fisher-damping", "0.01"]
    load(RECIPES / "trl" / "sft.py").main(
        [
            *common,
            "--data",
            str(RECIPES / "tiny/data/sft.jsonl"),
            "--output-dir",
            str(tmp_path / "sft"),
            "--fisher-type",
            "true",
            "--fisher-report",
            str(tmp_path / "sft.json"),
        ]
    )
    report = json.loads((tmp_path / "sft.json").read_text())
    assert report["fisher_type"] == "true" and report["num_batches"] == 2
    loads_on_original_base(tiny_llama_dir, tmp_path / "sft")
    load(RECIPES / "trl" / "dpo.py").main(
        [
            *common,
            "--data",
            str(RECIPES / "tiny/data/dpo.jsonl"),
            "--output-dir",
            str(tmp_path / "dpo"),
            "--precompute-ref",
            "--fisher-policy",
            "preserve",
        ]
    )
    assert load_record(tmp_path / "dpo") is None  # preserve (allowed here) was handed back on the original base
    loads_on_original_base(tiny_llama_dir, tmp_path / "dpo")
