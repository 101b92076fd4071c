"""Completion metrics of the causal-LM tasks (`causal.py`): rows `{prompt, completion, rejected}` encoded with
the loss on the completion only, completion cross-entropy per token and token accuracy (SFT), DPO loss
against the reference (the adapter-disabled model, or a separate one) and reward accuracy (DPO)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(input ids, labels): prompt + completion + EOS, the prompt's labels -100."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


def collate(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `labels` (padding labelled -100)."""
    width = max(len(i) for i, _ in pairs)
    ids = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for j, (i, lab) in enumerate(pairs):
        ids[j, : len(i)], labels[j, : len(i)], mask[j, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def completion_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: summed completion log-prob, completion token count, correctly predicted tokens."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    correct = (logits.argmax(-1) == labels) & mask
    return (logp * mask).sum(1), mask.sum(1), correct.sum(1)


def evaluate_sft(model: nn.Module, tokenizer, test: list[dict]) -> dict[str, float]:
    """Completion cross-entropy per token and token accuracy over `test`."""
    was = model.training
    model.eval()
    nll = count = correct = 0.0
    for start in range(0, len(test), 32):
        rows = [encode(tokenizer, r["prompt"], r["completion"]) for r in test[start : start + 32]]
        lp, n, c = completion_logps(model, collate(rows, tokenizer.pad_token_id))
        nll, count, correct = nll - float(lp.sum()), count + float(n.sum()), correct + float(c.sum())
    model.train(was)
    return {"test_loss": nll / count, "token_accuracy": correct / count}


@torch.no_grad()
def pair_logps(model: nn.Module, tokenizer, rows: list[dict]) -> tuple[Tensor, Tensor]:
    """Per row of `rows`: the summed log-prob of its chosen (`completion`) and of its `rejected` completion."""
    was = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(rows), 32):
        part = rows[start : start + 32]
        for side, out in (("completion", chosen), ("rejected", rejected)):
            batch = collate([encode(tokenizer, r["prompt"], r[side]) for r in part], tokenizer.pad_token_id)
            out.append(completion_logps(model, batch)[0])
    model.train(was)
    return torch.cat(chosen), torch.cat(rejected)


def reference_logps(
    model: nn.Module, tokenizer, rows: list[dict], reference: nn.Module | None = None
) -> tuple[Tensor, Tensor]:
    """`pair_logps` of DPO's reference: `reference` when given (the run's separate `ref_model`), else the
    adapter-disabled `model`. Training never changes it, so a run computes it once per split."""
    with model.disable_adapter() if reference is None else nullcontext():
        return pair_logps(model if reference is None else reference, tokenizer, rows)


def evaluate_dpo(
    model: nn.Module,
    tokenizer,
    test: list[dict],
    beta: float = 0.1,
    reference: nn.Module | None = None,
    reference_pairs: tuple[Tensor, Tensor] | None = None,
) -> dict[str, float]:
    """DPO loss `−log σ(β((log π_c − log π_ref,c) − (log π_r − log π_ref,r)))` and reward accuracy over `test`;
    the reference's log-probs are `reference_pairs` when given (`reference_logps` of `test`), else computed here."""
    ref_chosen, ref_rejected = reference_pairs or reference_logps(model, tokenizer, test, reference)
    chosen, rejected = pair_logps(model, tokenizer, test)
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()  # a tie (e.g. at step 0) is a coin flip
    return {"test_loss": float(-F.logsigmoid(margin).mean()), "reward_accuracy": float(wins.mean())}
