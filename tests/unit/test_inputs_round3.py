"""Batches as users' own dataloaders build them (round 3)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama

from fisher_core import FisherConfig, estimate

LAYERS = ["q_proj", "v_proj"]


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_int32_labels_give_the_statistics_of_int64_labels(fisher_type):
    cfg = FisherConfig(progress=False, num_batches=1, fisher_type=fisher_type)
    ids = torch.randint(3, 384, (4, 10), generator=torch.Generator().manual_seed(0))
    want = estimate(tiny_llama(), [{"input_ids": ids, "labels": ids}], target_modules=LAYERS, config=cfg)
    got = estimate(tiny_llama(), [{"input_ids": ids, "labels": ids.int()}], target_modules=LAYERS, config=cfg)
    for name in want:
        assert torch.equal(got[name].grad_cov, want[name].grad_cov)
        assert torch.equal(got[name].mean_grad, want[name].mean_grad)
