"""The default init at twice default LoRA's learning rate does not diverge on a tiny Llama (next-token loss on
a learnable synthetic sequence, AdamW). A guard for this small case only: on the encoder protocol's play-genre
task the default DOES collapse at 2× LoRA's lr (BENCHMARKS.md, lr robustness), which is why the default is
under review (issue 14)."""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama

from fisher_core import FisherConfig, initialize

LR = 5e-3  # default LoRA's best lr on this task: last-ten mean 5.937/5.904/5.857/5.862/5.941 at 1e-3..2e-2
STEPS = 40


def _batches(n: int, seed: int) -> list[dict]:
    """Sequences of a fixed random permutation walk (token t+1 = perm[token t]): learnable, not memorizable."""
    perm = torch.randperm(384, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.empty(4, 16, dtype=torch.long)
        ids[:, 0] = torch.randint(0, 384, (4,), generator=g)
        for t in range(1, 16):
            ids[:, t] = perm[ids[:, t - 1]]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _train(fisher: bool, lr: float) -> list[float]:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    data = _batches(STEPS, seed=1)
    if fisher:
        initialize(model, data[:8], config=FisherConfig(progress=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def test_default_init_at_twice_loras_lr_does_not_diverge():
    lora = _train(fisher=False, lr=LR)
    ours = _train(fisher=True, lr=2 * LR)
    assert all(math.isfinite(x) for x in ours)
    late = sum(ours[-10:]) / 10
    # a random tiny model learns slowly (5.97 → 5.86 in 40 steps): the margins are sized to that
    assert late < ours[0] - 0.05, f"no progress at 2x LoRA's lr: first {ours[0]:.3f}, last ten {late:.3f}"
    assert max(ours[5:]) < ours[0] + 0.05, "the loss rose above its start: a divergence"
    assert late < sum(lora[-10:]) / 10 + 0.02  # not behind default LoRA at its own lr
