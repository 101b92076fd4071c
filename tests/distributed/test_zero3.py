"""DeepSpeed ZeRO-3 (gloo on CPU, 2 processes, every parameter partitioned): the Fisher init of the partitioned
model equals the one of the same model whole — statistics through DeepSpeed's gathering passes, selection and
writing gathering one adapted layer at a time — and what needs whole weights on one process (export) is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("zero3_worker.py")


def test_zero3_partitioned_init_equals_the_whole_one(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), str(root)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*cmd, str(WORKER), str(tmp_path)], env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "zero3.pt")
    for selector in ("natural", "fwsvd"):
        whole, zero3 = result[f"{selector}/False"], result[f"{selector}/True"]
        assert zero3["partitioned"] and zero3["cache_reused"] and not whole["cache_reused"]
        # the default's keep mode (`auto`) with a chat tokenizer: on, whole or partitioned (below)
        assert whole["keep_auto"].startswith("a chat model") and zero3["keep_auto"].startswith("a chat model")
        assert "ZeRO-3" in zero3["export_error"] and "restore_offsets" in zero3["export_error"]
        for name, (*factors, tokens) in whole["stats"].items():
            assert zero3["stats"][name][2] == tokens
            for got, want in zip(zero3["stats"][name][:2], factors, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)
        assert zero3["weights"].keys() == whole["weights"].keys() and any("lora_B" in k for k in whole["weights"])
        for name, value in whole["weights"].items():
            assert bool(value.any()), name  # every factor and base weight was written / kept
            # eigen/SVD problems amplify the statistics' rounding (summed in another order): compare to the scale
            scale = float(value.abs().max())
            torch.testing.assert_close(
                zero3["weights"][name], value, rtol=0, atol=2e-3 * scale, msg=f"{selector} {name}"
            )
        if selector == "natural":  # gradient checkpointing kept on: the same statistics, fewer inputs held for Ḡ
            checkpointed = result["natural/True-ckpt"]
            assert checkpointed["held"] < zero3["held"]
            for name, (*factors, tokens) in whole["stats"].items():
                assert checkpointed["stats"][name][2] == tokens
                want_mean = whole["mean_grads"][name]
                for got, want in zip(
                    (*checkpointed["stats"][name][:2], checkpointed["mean_grads"][name]),
                    (*factors, want_mean),
                    strict=True,
                ):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)
        for name, factors in whole["direct"].items():  # `select` on its own gathers what it reads
            for got, want in zip(zero3["direct"][name], factors, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()), msg=name)
    # keep mode: the own answers generated on partitioned parameters give what the whole model writes given them
    given, generated = result["keep/whole"], result["keep/zero3"]
    assert generated.keys() == given.keys() and any("lora_A" in k for k in given)
    for name, value in given.items():
        torch.testing.assert_close(generated[name], value, rtol=0, atol=2e-3 * float(value.abs().max()), msg=name)
