"""TRL's SFTTrainer under DeepSpeed ZeRO-3 (one process, CPU, every parameter partitioned): the callback writes
the same adapter as without DeepSpeed (keep mode on: the own answers generated on partitioned parameters), that
adapter survives the first optimizer step (DeepSpeed's fp32 master copies are refreshed; without that, a step at
learning rate 0 puts the old adapter back), and the final save keeps the adapter with its record, exportable for
the original base by `fisher-lora export`.

Two processes are covered by `test_zero3.py` (fisher_core directly): accelerate 1.13 does not set up
DeepSpeed's process group on CPU-only machines, so a 2-process Trainer run needs GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("trl_zero3_worker.py")


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trl-zero3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29537", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "integrations"), str(ROOT)])
    for mode in ("whole", "zero3"):
        cmd = [sys.executable, str(WORKER), mode, str(tiny_llama_dir), str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        if mode == "zero3":
            assert "fisher-lora export --model ORIGINAL_BASE" in done.stderr
    return out


def test_zero3_callback_writes_the_whole_models_adapter_and_it_survives_the_first_step(runs):
    whole, zero3 = torch.load(runs / "whole.pt"), torch.load(runs / "zero3.pt")
    assert zero3["written"].keys() == whole["written"].keys() and any("lora_B" in k for k in whole["written"])
    for name, value in whole["written"].items():
        scale = float(value.abs().max())
        torch.testing.assert_close(zero3["written"][name], value, rtol=0, atol=2e-3 * scale, msg=name)
        assert torch.equal(zero3["stepped"][name], zero3["written"][name]), f"the step at lr 0 changed {name}"


def test_zero3_final_save_keeps_the_adapter_with_its_record_and_exports_offline(runs, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zero3 = torch.load(runs / "zero3.pt")
    assert {"adapter_model.safetensors", "fisher_init.safetensors"} <= set(zero3["saved"])
    assert not any(f.startswith("fisher_raw/") for f in zero3["saved"])  # not exported: nothing was moved
    saved = load_file(runs / "zero3" / "adapter_model.safetensors")
    assert len(saved) == len(zero3["stepped"]) and all(bool(t.any()) for t in saved.values())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["--model", tiny_llama_dir, "--adapter", runs / "zero3", "--out", runs / "exported"]
    done = subprocess.run(
        [sys.executable, "-m", "fisher_core", "export", *map(str, cmd)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    # oracle: the adapter the whole run exported in-process, on the same original base
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    outputs = []
    for adapter in (runs / "exported", runs / "whole"):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True)
        with torch.no_grad():
            outputs.append(PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-3 * float(outputs[1].abs().max()))
