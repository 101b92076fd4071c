"""FSDP-sharded models (FSDP2 `fully_shard` and FSDP1, gloo on CPU): the Fisher init writes, shard by shard,
exactly what it writes into the same model unsharded — for `natural` (shapes only) and `fwsvd` (reads W), and
with the blocks' gradient checkpointing kept on for the statistics pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fisher_core.layers import canonical_name

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("fsdp_worker.py")
BLOCKS = 2  # decoder blocks of tests/tiny.py's Llama


def test_fsdp_sharded_init_equals_the_unsharded_one(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(root)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    done = subprocess.run([*cmd, str(WORKER), str(tmp_path)], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "fsdp.pt")
    assert "rank_budget" in result.pop("rank_budget_refusal")  # it would replace modules inside flat parameters
    for selector in ("natural", "fwsvd"):
        plain = result[f"{selector}/"]
        assert "restore_offsets" in result[f"{selector}/fsdp2"].pop("export_error")
        checkpointed = ("fsdp2-ckpt", "fsdp1-ckpt") if selector == "natural" else ()  # gradient checkpointing kept on
        # the default's keep mode (`auto`) with a chat tokenizer: on for whole parameters, off where sharded (untested)
        assert plain.pop("keep_auto").startswith("on: a chat model")
        for kind in ("fsdp2", "fsdp1", "fsdp1-blocks", *checkpointed):
            name = "FSDP2" if kind.startswith("fsdp2") else "FSDP1"
            assert result[f"{selector}/{kind}"].pop("keep_auto").startswith(f"off: untested on {name}-sharded"), kind
        # one unit: its parameters are whole throughout, never summoned again; a unit per block: one at a time,
        # each made whole once per pass over the layers (initialize checks every adapter is at its init before the
        # statistics pass; apply checks again, then writes; fwsvd's select reads W before), not once per layer
        # (3 adapted layers per block here)
        assert result[f"{selector}/fsdp1"].pop("whole_at_once").tolist() == [0, 0, 0]
        most, whole_model, summons = result[f"{selector}/fsdp1-blocks"].pop("whole_at_once").tolist()
        passes = 4 if selector == "fwsvd" else 3
        assert (most, whole_model) == (1, 0) and summons == passes * BLOCKS
        for kind in ("fsdp2", "fsdp1", "fsdp1-blocks", *checkpointed):
            result[f"{selector}/{kind}"].pop("export_error", None)
            result[f"{selector}/{kind}"].pop("whole_at_once", None)
            sharded = {canonical_name(k): v for k, v in result[f"{selector}/{kind}"].items()}
            assert {canonical_name(k) for k in plain} == sharded.keys() and any("lora_B" in k for k in plain)
            for name, value in plain.items():
                assert bool(value.any()), name  # every factor and base weight was written / kept
                torch.testing.assert_close(
                    sharded[canonical_name(name)], value, rtol=1e-5, atol=1e-6, msg=f"{kind} {selector} {name}"
                )
