"""Keep data made from the model itself: its own greedy answers to the shipped generic instructions.

`fisher_core/resources/keep_instructions.jsonl` holds 32 hand-written instructions (facts, advice,
explanation, code, arithmetic, writing). Each is rendered with the tokenizer's chat template and a
generation prompt when it has one (else `instruction + "\\n"`), the model answers greedily with at most
`MAX_NEW_TOKENS` new tokens, and the batch supervises exactly the answer's tokens (up to and including its
first EOS): the statistics are those of what the model does now, on requests like a user's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from importlib import resources
from typing import Any, NamedTuple

import torch
from torch import nn

from fisher_core.data import IGNORE_INDEX, collate
from fisher_core.estimate.distributed import process_index, world_size
from fisher_core.estimate.objective import Batch
from fisher_core.sharded import root_whole, sharding

logger = logging.getLogger("fisher_core")
MAX_NEW_TOKENS = 48
BATCH_SIZE = 8


def instructions() -> list[str]:
    """The shipped generic instructions, in file order."""
    text = (resources.files("fisher_core") / "resources" / "keep_instructions.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["instruction"] for line in text.splitlines() if line.strip()]


def prompt_ids(tokenizer: Any, instruction: str) -> list[int]:
    """The tokens the model answers after: the chat template's user turn plus generation prompt, or the
    instruction and a newline (with the tokenizer's special tokens) when there is no template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": instruction}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(instruction + "\n")["input_ids"])


class Share(NamedTuple):
    """How many instructions the keep pass answers, and whether processes share them out (`process_share`)."""

    count: int
    shared: bool


def plan_share(available: int, num_batches: int, world: int) -> Share:
    """The instructions answered, at most `num_batches` batches a process: where `num_batches · world` batches'
    worth split into equal whole batches, that many, shared out — the set one process reading `num_batches · world`
    batches makes, so the statistics do not depend on the process count, and every process makes the same number
    of `generate` calls and forwards (on sharded parameters each is a collective); else `num_batches` batches'
    worth, every process answering all of them. Every prompt a process answers is read."""
    count = min(available, BATCH_SIZE * num_batches * world)
    if world > 1 and math.ceil(count / BATCH_SIZE) % world == 0:
        return Share(count, True)
    return Share(min(available, BATCH_SIZE * num_batches), False)


def process_share(prompts: list[list[int]], world: int, rank: int, shared: bool) -> list[list[int]]:
    """The prompts process `rank` of `world` answers: whole batches of `BATCH_SIZE` round-robin if `shared`, else
    all of them."""
    if not shared:
        return prompts
    batches = [prompts[i : i + BATCH_SIZE] for i in range(0, len(prompts), BATCH_SIZE)]
    return [prompt for batch in batches[rank::world] for prompt in batch]


def own_answer_batches(model: nn.Module, tokenizer: Any, prompts: list[list[int]], shared: bool = False) -> list[Batch]:
    """Batches of (prompt, the model's greedy answer), labels on the answer only; deterministic. Under
    torch.distributed each process answers its `process_share`."""
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    device = model.get_input_embeddings().weight.device
    sharded = sharding(model) is not None
    prompts = process_share(prompts, world_size(), process_index(), shared)
    examples = []
    for start in range(0, len(prompts), BATCH_SIZE):
        chunk = prompts[start : start + BATCH_SIZE]
        for prompt, answer in zip(chunk, _greedy(model, chunk, pad, eos, device, sharded), strict=True):
            examples.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    batches = [collate(examples[i : i + BATCH_SIZE], pad) for i in range(0, len(examples), BATCH_SIZE)]
    tokens = sum(len(e["input_ids"]) - e["labels"].count(IGNORE_INDEX) for e in examples)
    logger.info("fisher-lora: keep data: the model's own greedy answers to %d instructions (%d answer tokens)",
                len(examples), tokens)  # fmt: skip
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _greedy(
    model: nn.Module, prompts: list[list[int]], pad: int, eos: int | None, device: torch.device, sharded: bool
) -> list[list[int]]:
    """Greedy answers (token ids, cut after the first EOS) to left-padded prompts, the model in eval mode;
    on sharded parameters every process keeps stepping until all are done (`synced_gpus`)."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    settings = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    with _eval_mode(model), torch.no_grad(), root_whole(model):
        synced = True if sharded and world_size() > 1 else None  # None: transformers' own detection
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings, synced_gpus=synced)
    answers = []
    for row in out[:, width:].tolist():
        cut = row.index(eos) + 1 if eos is not None and eos in row else len(row)
        answers.append(row[:cut])
    return answers


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token, or pass keep_data")
    return pad


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) while generating; each module's own mode back afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
