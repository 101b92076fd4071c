"""The `smol` preset's tasks: a real pretrained chat LLM (SmolLM2-135M-Instruct, `benchmarks/smollm2.py`) tuned
through TRL on real text in its ChatML chat template, held out by source, with forgetting measured.

- `smol-dialogue` (SFT): the user gives the last 24 words of a speech from a Shakespeare tragedy and asks for the
  reply; the answer is the first 20 words of the speech that follows. Held out by play (train: Hamlet, Lear,
  Othello, Romeo and Juliet; validation: Julius Caesar; test: Macbeth).
- `smol-docstring` (SFT): the user gives a Python function's signature; the answer is the first paragraph of its
  docstring (≤ 32 words). Held out by library (train: numpy, scipy; validation: sympy; test: matplotlib — the
  installed packages of the pinned set).
- `smol-docstring-dpo` (DPO): the same prompts; chosen = the function's own docstring, rejected = the docstring of
  another function of the same source file (real text, plausible, wrong).

Forgetting, each point of a run's curve, reported as the increase over the untuned model:
- `general_loss`: per-token loss on 16 fortunes of the BSD `fortunes` file (real English of the kind the model saw
  in pre-training; no task draws on it), as plain text;
- `own_loss`: per-token loss of the untuned model's own greedy answers (≤ 48 tokens) to the 16 first generic
  instructions of `data/generic_eval.jsonl`, in the chat template: how far tuning moved the model's behaviour on
  what it was not tuned for. The answers are generated once and cached.
"""

from __future__ import annotations

import ast
import json
import os
import random
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.quality.completions import collate, completion_logps, evaluate_sft
from benchmarks.quality.shakespeare import cache_dir
from benchmarks.smollm2 import NAME, smollm2_dir

SMOL_TASKS = ("smol-dialogue", "smol-docstring", "smol-docstring-dpo")
DOC_SPLITS = {"train": ("numpy", "scipy"), "val": ("sympy",), "test": ("matplotlib",)}
GENERIC = Path(__file__).parent / "data" / "generic_eval.jsonl"
PROBE_ROWS = 16


def _functions(path: Path) -> list[tuple[str, str]]:
    """(signature, first docstring paragraph ≤ 32 words) of the file's public functions with a docstring of ≥ 8
    words."""
    from benchmarks.quality.tasks import documented

    return [
        (f"def {node.name}({ast.unparse(node.args)}):"[:160], " ".join(first.split()[:32]))
        for node, first in documented(path)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_")
    ]


def _docstring_rows(split: str, rng: random.Random) -> list[dict]:
    """Rows `{user, completion, rejected}`: rejected is another function's docstring from the same file."""
    from benchmarks.quality.tasks import library_sources

    rows = []
    for lib in DOC_SPLITS[split]:
        for path in library_sources(lib, "the smol docstring tasks")[1]:
            functions = list(dict(_functions(path)).items())  # one row per signature
            for signature, doc in functions:
                others = [d for s, d in functions if d != doc]
                if others:
                    user = f"Write the first paragraph of the docstring of this Python function:\n\n{signature}"
                    rows.append({"user": user, "completion": doc, "rejected": rng.choice(others)})
    return rows


def task_rows(task: str, sizes: tuple[int, int, int], seed: int = 0) -> dict[str, list[dict]]:
    """`{train, val, test}` rows `{user, completion[, rejected]}` of a smol task, held out by source (module
    docstring), `sizes` rows each, seeded."""
    from benchmarks.quality.causal import speech_pairs

    rng = random.Random(seed)
    out = {}
    for split, size in zip(("train", "val", "test"), sizes, strict=True):
        if task == "smol-dialogue":
            rows = [{"user": f"Reply to this line from a play, in its style:\n\n{p}", "completion": c}
                    for p, c in speech_pairs(split)]  # fmt: skip
        else:
            rows = _docstring_rows(split, rng)
        if len(rows) < size:
            raise ValueError(f"{task} {split} has {len(rows)} rows, fewer than {size}")
        rng.shuffle(rows)
        out[split] = rows[:size]
    return out


def chat_prompt(tokenizer, user: str) -> str:
    """The chat template's rendering of one user turn, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def rendered(tokenizer, rows: list[dict]) -> list[dict]:
    """Rows as the evaluation reads them: `prompt` the rendered chat prompt, `completion`/`rejected` the answers."""
    return [{**r, "prompt": chat_prompt(tokenizer, r["user"])} for r in rows]


def trl_rows(task: str, rows: list[dict]) -> list[dict]:
    """TRL's conversational dataset rows: prompt–completion for SFT, prompt–chosen–rejected for DPO."""
    prompt = [[{"role": "user", "content": r["user"]}] for r in rows]
    answer = [[{"role": "assistant", "content": r["completion"]}] for r in rows]
    if task.endswith("-dpo"):
        rejected = [[{"role": "assistant", "content": r["rejected"]}] for r in rows]
        return [{"prompt": p, "chosen": c, "rejected": x} for p, c, x in zip(prompt, answer, rejected, strict=True)]
    return [{"prompt": p, "completion": c} for p, c in zip(prompt, answer, strict=True)]


# ---------------------------------------------------------------- forgetting probes


def general_texts(count: int = PROBE_ROWS) -> list[str]:
    """`count` fortunes of 20–60 words from the BSD `fortunes` file, from its end (no task reads that file)."""
    from benchmarks.quality.tasks import FORTUNES, fortunes, wheel_member

    texts = [t for t in fortunes(wheel_member(FORTUNES, "fortune/fortunes")) if 20 <= len(t.split()) <= 60]
    return texts[-count:]


@torch.no_grad()
def own_answers(count: int = PROBE_ROWS, max_new_tokens: int = 48) -> list[dict]:
    """The untuned model's greedy answers to the first `count` generic instructions, as rows
    `{prompt, completion}` (rendered); generated once, cached beside the converted model."""
    path = cache_dir() / f"{NAME}-own-answers-{count}x{max_new_tokens}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    users = [json.loads(line)["messages"][0]["content"] for line in GENERIC.read_text().splitlines()][:count]
    prompts = [chat_prompt(tokenizer, u) for u in users]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    rows = [{"prompt": p, "completion": a.strip()} for p, a in zip(prompts, answers, strict=True)]
    part = path.with_suffix(f".{os.getpid()}.part")
    part.write_text(json.dumps(rows, indent=1))
    os.replace(part, path)  # atomic: a concurrent worker reads no half-written file
    return rows


def text_loss(model, tokenizer, texts: list[str]) -> float:
    """Per-token next-token loss on plain `texts` (every token after the first of each text)."""
    was = model.training
    model.eval()
    pairs = [(ids, ids) for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)]
    logp, count, _ = completion_logps(model, collate(pairs, tokenizer.pad_token_id))
    model.train(was)
    return -float(logp.sum()) / float(count.sum())


def forgetting(model, tokenizer, probes: dict) -> dict[str, float]:
    """`{general_loss, own_loss}` of `model` on the probes (`general` texts, `own` answer rows)."""
    return {
        "general_loss": text_loss(model, tokenizer, probes["general"]),
        "own_loss": evaluate_sft(model, tokenizer, probes["own"])["test_loss"],
    }


def smol_data(task: str, preset):
    """A smol task as a run reads it (`causal.LMData`): SmolLM2, the chat-rendered rows and the forgetting probes."""
    from transformers import AutoTokenizer

    from benchmarks.quality.causal import LMData

    base = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = task_rows(task, preset.sizes)
    kind = "dpo" if task.endswith("-dpo") else "sft"
    val, test = rendered(tokenizer, rows["val"]), rendered(tokenizer, rows["test"])
    probes = {"general": general_texts(), "own": own_answers()}
    return LMData(kind, base, trl_rows(task, rows["train"]), rendered(tokenizer, rows["train"]), val, test, probes, 192)


def untuned_probes(preset) -> dict:
    """The untuned model's forgetting probes (what every run's forgetting is measured from) and its validation and
    test loss on each of the preset's tasks (`tasks`: {task: [val, test]}; DPO's is ln 2 by construction)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.quality.causal import curve_point

    base = smollm2_dir()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    out: dict = forgetting(model, tokenizer, {"general": general_texts(), "own": own_answers()})
    out["tasks"] = {}
    for task in preset.tasks:
        data = smol_data(task, preset)
        if data.kind == "sft":
            point = curve_point(replace(data, probes=None), model, tokenizer, 0)
            out["tasks"][task] = [point["val_loss"], point["test_loss"]]
    return out
