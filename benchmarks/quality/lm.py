"""Causal-LM tasks: a tiny Llama pre-trained once on Shakespeare's comedies, then tuned on tragedies.

- `base_model()`: a byte-level BPE tokenizer and a small Llama trained from scratch on the comedies'
  speeches (deterministic: fixed seeds, fixed data order), cached under `cache_dir()/tiny-llama-comedies-v1`
  and rebuilt when missing.
- SFT task: prompt = the end of a tragedy speech, completion = the start of the speech that answers it;
  metric: completion token accuracy; test loss: completion cross-entropy per token.
- DPO task: the same prompts, chosen = the real answer, rejected = the real answer's words shuffled;
  metric: reward accuracy (the policy-over-reference log-ratio ranks chosen above rejected); test loss:
  DPO loss. (With rejected = a random other speech, the tiny model did not generalize for any init.)
Training runs through TRL (`SFTTrainer`, `DPOTrainer`); our init is `fisher_trl.FisherInitCallback`,
PEFT's inits are built with `methods.build_adapter` (LoraConfig) and handed to the trainer.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.quality.shakespeare import cache_dir, speeches, texts_dir

COMEDIES = (
    "midsummer_nights_dream",
    "twelfth_night",
    "as_you_like_it",
    "much_ado_about_nothing",
    "comedy_of_errors",
    "taming_of_the_shrew",
    "merry_wives_of_windsor",
    "two_gentlemen_of_verona",
)
TRAGEDIES = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_NAME = "tiny-llama-comedies-v1"
SEQ = 64


def _play_speeches(plays: tuple[str, ...], min_words: int) -> list[list[str]]:
    folder = texts_dir()
    return [speeches((folder / f"{p}_gut.txt").read_text(encoding="utf-8", errors="replace"), min_words) for p in plays]


def base_model(cache: Path | None = None, steps: int = 600) -> Path:
    """The pre-trained tiny Llama's directory (model + tokenizer); trained (~2-5 CPU minutes) if missing.

    The folder name carries `steps` when it is not the default 600, so a short build never stands in for it."""
    target = (cache or cache_dir()) / (BASE_NAME if steps == 600 else f"{BASE_NAME}-{steps}steps")
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import LlamaForCausalLM

    from benchmarks.tiny_models import llama_config, pretrain, train_bpe

    text = [s for play in _play_speeches(COMEDIES, 3) for s in play]
    tokenizer = train_bpe(text, vocab_size=1024)
    stream = torch.tensor([i for s in text for i in tokenizer(s + "\n")["input_ids"]])
    chunks = stream[: len(stream) // SEQ * SEQ].view(-1, SEQ)
    config = llama_config(len(tokenizer), hidden=128, layers=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pretrain(model, chunks, steps, 32, 3e-3, lambda s: min(1.0, s / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _clip(text: str, words: int, tail: bool) -> str:
    w = text.split()
    return " ".join(w[-words:] if tail else w[:words])


def dialogue(seed: int = 0, n_train: int = 800, n_test: int = 96) -> tuple[list[dict], list[dict]]:
    """(train, test) rows `{prompt, completion, rejected}` from consecutive tragedy speeches; test disjoint.

    `rejected` is the real answer with its words shuffled (seeded): the preference is for fluent text."""
    rows = []
    for play in _play_speeches(TRAGEDIES, 6):
        for prev, nxt in itertools.pairwise(play):
            rows.append({"prompt": _clip(prev, 24, tail=True) + "\n", "completion": _clip(nxt, 20, tail=False)})
    if len(rows) < n_train + n_test:
        raise ValueError(
            f"the tragedies give {len(rows)} speech pairs; lower n_train + n_test (now {n_train + n_test})"
        )
    rng = random.Random(seed)
    rng.shuffle(rows)
    rows = rows[: n_train + n_test]
    for r in rows:  # a random other speech was tried first: no init made the tiny model generalize on it
        words = r["completion"].split()
        rng.shuffle(words)
        r["rejected"] = " ".join(words)
    return rows[:n_train], rows[n_train:]


def _encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


def _collate(pairs: list[tuple[list[int], list[int]]], pad: int) -> dict[str, Tensor]:
    width = max(len(i) for i, _ in pairs)
    ids = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for j, (i, lab) in enumerate(pairs):
        ids[j, : len(i)], labels[j, : len(i)], mask[j, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def _completion_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
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
        rows = [_encode(tokenizer, r["prompt"], r["completion"]) for r in test[start : start + 32]]
        lp, n, c = _completion_logps(model, _collate(rows, tokenizer.pad_token_id))
        nll, count, correct = nll - float(lp.sum()), count + float(n.sum()), correct + float(c.sum())
    model.train(was)
    return {"test_loss": nll / count, "token_accuracy": correct / count}


def evaluate_dpo(model: nn.Module, tokenizer, test: list[dict], beta: float = 0.1) -> dict[str, float]:
    """DPO loss (reference = the adapter-disabled model) and reward accuracy over `test`."""
    was = model.training
    model.eval()
    losses, wins = [], []
    for start in range(0, len(test), 32):
        part = test[start : start + 32]
        chosen = _collate([_encode(tokenizer, r["prompt"], r["completion"]) for r in part], tokenizer.pad_token_id)
        rejected = _collate([_encode(tokenizer, r["prompt"], r["rejected"]) for r in part], tokenizer.pad_token_id)
        pc, pr = _completion_logps(model, chosen)[0], _completion_logps(model, rejected)[0]
        with model.disable_adapter():
            rc, rr = _completion_logps(model, chosen)[0], _completion_logps(model, rejected)[0]
        margin = beta * ((pc - rc) - (pr - rr))
        losses.append(-F.logsigmoid(margin))
        wins.append((margin > 0).float() + 0.5 * (margin == 0).float())  # a tie (e.g. at step 0) is a coin flip
    model.train(was)
    return {"test_loss": float(torch.cat(losses).mean()), "reward_accuracy": float(torch.cat(wins).mean())}


@dataclass(frozen=True)
class LMRun:
    task: str  # "sft" | "dpo"
    method: str  # a `methods.METHODS` name; "fisher" uses the TRL callback
    label: str  # the name the records and tables use
    seed: int = 0
    steps: int = 60
    lr: float = 2e-3
    rank: int = 8
    batch_size: int = 8
    calibration: int = 4
    fisher: dict | None = None  # every FisherConfig keyword of method "fisher" (the caller's whole config)
    device: str = "cpu"  # "cuda": the trainer moves the model (PEFT's data-driven inits still run on CPU)


def run_lm(spec: LMRun, base: Path, train: list[dict], test: list[dict]) -> dict:
    """Train `spec` with TRL and return its record (curve at 0/10/25/50/75/100 % of steps)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from benchmarks.quality.methods import build_adapter
    from benchmarks.quality.runner import peak_memory
    from fisher_trl import FisherInitCallback

    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = {"r": spec.rank, "lora_alpha": 2 * spec.rank, "lora_dropout": 0.0, "target_modules": TARGETS}
    init_seconds = init_mib = 0.0
    peft_config = None
    if spec.method == "fisher":
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)
    else:
        rng = random.Random(spec.seed)
        calib_rows = [train[rng.randrange(len(train))] for _ in range(spec.calibration * spec.batch_size)]
        encoded = [_encode(tokenizer, r["prompt"], r["completion"]) for r in calib_rows]
        batches = [
            _collate(encoded[i : i + spec.batch_size], tokenizer.pad_token_id)
            for i in range(0, len(encoded), spec.batch_size)
        ]
        with peak_memory() as peak:
            started = time.perf_counter()
            model = build_adapter(spec.method, model, batches, lora={**lora, "task_type": "CAUSAL_LM"}).model
            init_seconds = time.perf_counter() - started
        init_mib = peak()
    common = dict(
        output_dir=str(cache_dir() / "runs" / f"{spec.task}-{spec.label}-{spec.seed}"),
        max_steps=spec.steps,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_length=96,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=spec.device == "cpu",
        disable_tqdm=True,
        seed=spec.seed,
        data_seed=spec.seed,
    )
    if spec.task == "sft":
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train])
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        evaluate = evaluate_sft
    else:
        data = Dataset.from_list(
            [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["rejected"]} for r in train]
        )
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(beta=0.1, **common),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        evaluate = evaluate_dpo
    callback = FisherInitCallback(**spec.fisher).attach(trainer) if spec.method == "fisher" else None
    checkpoints = sorted({round(f * spec.steps) for f in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)})
    curve: list[dict] = []
    timing: dict[str, float] = {}

    class Curve(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timing["begin"] = time.perf_counter() - timing["start"]
            timing["mib"] = peak()
            curve.append({"step": 0, **evaluate(trainer.model, tokenizer, test)})

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in checkpoints:
                curve.append({"step": state.global_step, **evaluate(trainer.model, tokenizer, test)})

    trainer.add_callback(Curve())  # after the Fisher callback: step 0 is evaluated after the init
    started = time.perf_counter()
    with peak_memory() as peak:
        timing["start"] = time.perf_counter()
        trainer.train()
    if callback is not None and callback.report is not None:
        init_seconds, init_mib = sum(callback.report.seconds.values()), timing["mib"]
    return {
        "task": spec.task,
        "label": spec.label,
        "method": spec.method,
        "seed": spec.seed,
        "lr": spec.lr,
        "steps": spec.steps,
        "fisher": callback.config.model_dump(mode="json", exclude={"cache_path", "progress", "force"})
        if callback
        else None,
        "init_batches": callback.report.num_batches if callback and callback.report else None,
        "curve": curve,
        "init_seconds": init_seconds,
        "init_peak_mib": init_mib,
        "wall_seconds": time.perf_counter() - started,
    }
