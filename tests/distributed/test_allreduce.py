"""Two processes on disjoint halves of the data give the statistics of one process on all of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from allreduce_worker import DRAWN, TARGETS, global_batches
from tiny import tiny_llama

from fisher_core import FisherConfig, estimate, select
from fisher_core.estimate.factors import FisherStats, LayerStats

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("allreduce_worker.py")


def test_two_process_statistics_equal_one_process_on_the_same_global_data(tmp_path):
    root = Path(__file__).resolve().parents[2]  # `tiny` imports `benchmarks.tiny_models`
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(root)])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(WORKER),
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, env=env, timeout=300, capture_output=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    batches = global_batches()
    cfg = FisherConfig(progress=False, policy="preserve", num_batches=len(batches), selector="natural")
    model = tiny_llama()
    single = estimate(model, batches, target_modules=TARGETS, config=cfg)
    # one process selecting from the statistics the ranks hold (all-reduced: equal to `single` up to rounding)
    reduced = {
        n: LayerStats(*ranks[0]["stats"][n][:2], ranks[0]["stats"][n][3], ranks[0]["stats"][n][2]) for n in single
    }
    for n, layer in reduced.items():
        layer.input_group = single[n].input_group
    directions = select(FisherStats(reduced, "empirical", len(batches)), model, rank=4, config=cfg)
    for name, s in single.items():
        for r in ranks:
            a, g, mg, tokens = r["stats"][name]
            assert tokens == s.num_tokens
            # fp32 sums in another order: every entry within 1e-5 of the factor's largest entry
            for got, want in ((a, s.input_cov), (g, s.grad_cov), (mg, s.mean_grad)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        b0, a0 = ranks[0]["directions"][name]
        b1, a1 = ranks[1]["directions"][name]
        assert torch.equal(b0, b1) and torch.equal(a0, a1)  # every rank writes the same adapter
        # ... and it is the one a single process selects from the same statistics, though each rank solved half
        torch.testing.assert_close(b0, directions[name].B, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a0, directions[name].A, rtol=1e-5, atol=1e-7)
    # a solve that raises on its owner raises on both processes (before, the other waited in the gather)
    assert ranks[0]["raised"].startswith("planted") and ranks[1]["raised"].startswith("planted")
    assert {r["raised"] for r in ranks} & {"planted"} and any("raised by process" in r["raised"] for r in ranks)
    # the solves were spread over both ranks, q/v of a block (one shared input factor) on the same one
    solved_on = {name: i for i, r in enumerate(ranks) for name in r["solved"]}
    assert sorted(ranks[0]["solved"] + ranks[1]["solved"]) == sorted(single) and set(solved_on.values()) == {0, 1}
    for block in ("model.layers.0", "model.layers.1"):
        assert solved_on[f"{block}.self_attn.q_proj"] == solved_on[f"{block}.self_attn.v_proj"]
    # uneven shards under the default (early-stopping) config: both stopped after the shortest shard's one batch
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[:2])
    assert [r["uneven"][:2] for r in ranks] == [(1, tokens), (1, tokens)]
    assert any("more calibration batches than another process" in w for w in ranks[1]["uneven"][2])
    # a memory budget tightened mid-pass by what each rank holds for Ḡ: one plan for both (the larger hold)
    (kinds0, held0), (kinds1, held1) = (r["budgeted"] for r in ranks)
    assert int(held0) != int(held1) and kinds0 == kinds1
    assert any(kind in ("FactorSketch", "LowRank") for kinds in kinds0.values() for kind in kinds)
    # labels and positions drawn (true Fisher, half the positions): each global batch's draws are its own, so two
    # processes draw what one process does on the same batches (before, both ranks drew from one stream)
    drawn = estimate(model, batches, target_modules=TARGETS, config=cfg.model_copy(update=DRAWN))
    for name, s in drawn.items():
        for r in ranks:
            a, g, tokens = r["drawn"][name]
            assert tokens == s.num_tokens, name
            for got, want in ((a, s.input_cov), (g, s.grad_cov)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # a cache only rank 0 finds (node-local disk): both recompute the same statistics, neither hangs
    for r in ranks:
        source, grad_covs = r["node_local"]
        assert source is None
        for name, s in single.items():
            scale = float(s.grad_cov.abs().max())
            torch.testing.assert_close(grad_covs[name], s.grad_cov, rtol=1e-5, atol=1e-5 * scale)
