"""FSDP-sharded models (FSDP2 `fully_shard` and FSDP1, gloo on CPU): the Fisher init writes, shard by shard,
exactly what it writes into the same model unsharded — for `natural` (shapes only) and `fwsvd` (reads W), with
the blocks' gradient checkpointing kept on for the statistics pass, and in keep mode, where the model generates
its own answers on the sharded parameters."""

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


@pytest.fixture(scope="module")
def fsdp_result(tmp_path_factory) -> dict:
    """The worker's results (2 processes); each test reads its own keys."""
    out = tmp_path_factory.mktemp("fsdp")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(root)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    done = subprocess.run([*cmd, str(WORKER), str(out)], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "fsdp.pt")


def test_fsdp_sharded_init_equals_the_unsharded_one(fsdp_result):
    result = {k: dict(v) if isinstance(v, dict) else v for k, v in fsdp_result.items()}
    assert "rank_budget" in result.pop("rank_budget_refusal")  # it would replace modules inside flat parameters
    for selector in ("natural", "fwsvd"):
        plain = result[f"{selector}/"]
        assert "restore_offsets" in result[f"{selector}/fsdp2"].pop("export_error")
        checkpointed = ("fsdp2-ckpt", "fsdp1-ckpt") if selector == "natural" else ()  # gradient checkpointing kept on
        # the default's keep mode (`auto`) with a chat tokenizer: on, whole or sharded (keep_mode_... below)
        for kind in ("", "fsdp2", "fsdp1", "fsdp1-blocks", *checkpointed):
            assert result[f"{selector}/{kind}"].pop("keep_auto").startswith("on: a chat model"), kind
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


def test_keep_mode_generates_on_sharded_parameters_and_writes_what_the_whole_model_writes(fsdp_result):
    """Keep mode on FSDP2, FSDP1 and FSDP1 with a unit per block: the model answers the shipped instructions with
    its parameters sharded (the root's embeddings and head made whole around `generate`, which never calls the
    root's forward; before, that failed inside torch), and the init equals the whole model's given those same
    answers, made whole outside any collective, as `keep_data`."""
    given = fsdp_result["keep/"]
    assert any("lora_A" in k for k in given)
    for kind in ("fsdp2", "fsdp1", "fsdp1-blocks"):
        sharded = fsdp_result[f"keep/{kind}"]
        assert sharded.keys() == given.keys(), kind
        for name, value in given.items():
            torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=f"keep {kind} {name}")
