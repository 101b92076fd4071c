"""The protocol's causal-LM tasks: SFT and DPO on Shakespeare's tragedy dialogue, with a small Llama
pre-trained (once, cached, deterministic) on ~2.2 M tokens of other real text.

- `pretrained_lm()`: a byte-level BPE (2048) and a Llama (hidden 192, 4 layers, ~1.7 M parameters)
  trained from scratch for the preset's `pretrain_steps` (1500) steps of 16 × 128 tokens on Shakespeare's comedies and
  histories plus the first paragraphs of the docstrings of six installed libraries (torch, numpy,
  transformers, matplotlib, scipy, sympy). No tragedy is in it: the tasks are a domain it never saw.
  `pretrain.json` beside the weights records tokens, steps, seconds and the last loss.
- `dialogue_splits()`: prompt = the last 24 words of a tragedy speech, completion = the first 20 words of
  the speech that answers it, rejected = the completion's words shuffled (seeded). Held out by play:
  train on four tragedies, validate on *Julius Caesar*, test on *Macbeth*.
- `run_causal()`: one protocol run through TRL (`SFTTrainer`, `DPOTrainer`); our inits through the TRL
  callback (`fisher_trl.FisherInitCallback`), PEFT's with `methods.build_adapter`. Curve points carry the
  completion loss (SFT) or DPO loss (DPO) on validation and test, and token / reward accuracy.
  DPO's reference is the untouched model throughout: for inits that change the base a separate copy of it (TRL's
  `ref_model`, as their users would give it) in training and evaluation; for the others the adapter-disabled model
  in evaluation, and in training the same (TRL's frozen copy of a PEFT-built adapter whose B·A starts at 0, or the
  adapter disabled where TRL adds the adapter itself).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

from benchmarks.quality.completions import collate, encode, evaluate_dpo, evaluate_sft, reference_logps
from benchmarks.quality.shakespeare import cache_dir, speeches, texts_dir

PRETRAIN_NAME = "llama-1.7m-comedies-histories-docstrings-v1"
PRETRAIN_PLAYS = (
    "midsummer_nights_dream", "twelfth_night", "as_you_like_it", "much_ado_about_nothing", "comedy_of_errors",
    "taming_of_the_shrew", "merry_wives_of_windsor", "two_gentlemen_of_verona", "merchant_of_venice",
    "measure_for_measure", "henry_v", "richard_ii", "richard_iii", "henry_iv_part_1", "henry_iv_part_2", "john",
    "henry_viii", "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3",
)  # fmt: skip
DOC_LIBRARIES = ("torch", "numpy", "transformers", "matplotlib", "scipy", "sympy")
SPLITS = {
    "train": ("hamlet", "lear", "othello", "romeo_and_juliet"),
    "val": ("julius_caesar",),
    "test": ("macbeth",),
}
# PEFT inits that write the base (and fisher's `preserve`)
BASE_CHANGING = ("lora_ga", "pissa", "olora", "corda", "corda-kpm", "lora-null")
# PEFT-side inits whose calibration batches are the data whose knowledge is kept
KEEP_DATA_INITS = ("corda-kpm", "lora-null")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 128


def _play_speeches(plays: tuple[str, ...], min_words: int) -> list[list[str]]:
    folder = texts_dir()
    return [speeches((folder / f"{p}_gut.txt").read_text(encoding="utf-8", errors="replace"), min_words) for p in plays]


def _clip(text: str, words: int, tail: bool) -> str:
    w = text.split()
    return " ".join(w[-words:] if tail else w[:words])


def pretraining_text() -> list[str]:
    """The pre-training corpus, in a fixed order: comedy and history speeches, then docstrings."""
    from benchmarks.quality.tasks import docstrings, library_sources

    text = [s for play in _play_speeches(PRETRAIN_PLAYS, 3) for s in play]
    for lib in DOC_LIBRARIES:
        text += [d for path in library_sources(lib, "the pre-training corpus")[1] for d in docstrings(path)]
    return text


def pretrained_lm(steps: int, cache: Path | None = None) -> Path:
    """The pre-trained Llama's directory (model + tokenizer + `pretrain.json`), one per step count; trained
    if missing."""
    target = (cache or cache_dir()) / f"{PRETRAIN_NAME}-{steps}steps"
    if (target / "pretrain.json").is_file():
        return target
    from transformers import LlamaForCausalLM

    from benchmarks.tiny_models import llama_config, pretrain, train_bpe

    started = time.perf_counter()
    text = pretraining_text()
    tokenizer = train_bpe(text, vocab_size=2048)
    stream = torch.tensor([i for s in text for i in tokenizer(s + "\n")["input_ids"]])
    chunks = stream[: len(stream) // SEQ * SEQ].view(-1, SEQ)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer), hidden=192, layers=4, tie_word_embeddings=True))
    warm = max(1, steps // 20)
    last = pretrain(
        model, chunks, steps, 16, 2e-3, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    facts = {
        "corpus_tokens": len(stream), "trained_tokens": steps * 16 * SEQ, "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()), "last_loss": last,
        "seconds": round(time.perf_counter() - started), "threads": torch.get_num_threads(),
    }  # fmt: skip
    (target / "pretrain.json").write_text(json.dumps(facts, indent=1))
    return target


def speech_pairs(split: str) -> list[tuple[str, str]]:
    """(last 24 words of a speech, first 20 words of the speech answering it) in the plays of `split`, in order."""
    return [
        (_clip(prev, 24, tail=True), _clip(nxt, 20, tail=False))
        for play in _play_speeches(SPLITS[split], 6)
        for prev, nxt in pairwise(play)
    ]


def dialogue_splits(sizes: tuple[int, int, int], seed: int = 0) -> dict[str, list[dict]]:
    """`{train, val, test}` rows `{prompt, completion, rejected}`, held out by play (module docstring)."""
    rng = random.Random(seed)
    out = {}
    for (split, plays), size in zip(SPLITS.items(), sizes, strict=True):
        rows = [{"prompt": prev + "\n", "completion": nxt} for prev, nxt in speech_pairs(split)]
        if len(rows) < size:
            raise ValueError(f"{split} plays {plays} give {len(rows)} speech pairs, fewer than {size}")
        rng.shuffle(rows)
        for r in rows[:size]:
            words = r["completion"].split()
            rng.shuffle(words)
            r["rejected"] = " ".join(words)
        out[split] = rows[:size]
    return out


@dataclass(frozen=True)
class LMData:
    """One causal-LM task as a run reads it: `kind` "sft" or "dpo"; `base` the model directory; `train` TRL's
    dataset rows; `calibration`, `val`, `test` rendered rows `{prompt, completion[, rejected]}` (the text the
    model reads; `calibration` is what PEFT's data-driven inits read); `probes` the forgetting probes
    (`smol.forgetting`), None when the task has none; `max_length` TRL's truncation."""

    kind: str
    base: Path
    train: list[dict]
    calibration: list[dict]
    val: list[dict]
    test: list[dict]
    probes: dict | None = None
    max_length: int = 96


def tragedy_data(task: str, preset) -> LMData:
    """`sft-tragedy` / `dpo-tragedy` on the pre-trained tiny Llama (plain text, no chat template)."""
    rows = dialogue_splits(preset.sizes)
    if task == "sft-tragedy":
        train = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows["train"]]
    else:
        train = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["rejected"]} for r in rows["train"]]
    kind = "sft" if task == "sft-tragedy" else "dpo"
    return LMData(kind, pretrained_lm(preset.pretrain_steps), train, rows["train"], rows["val"], rows["test"])


def _evaluate(data: LMData, model, tokenizer, rows: list[dict], reference_pairs=None) -> tuple[float, float]:
    """(loss, accuracy): completion loss and token accuracy (SFT), or DPO loss against `reference_pairs` (the
    reference's `reference_logps` of `rows`) and reward accuracy."""
    if data.kind == "sft":
        m = evaluate_sft(model, tokenizer, rows)
        return m["test_loss"], m["token_accuracy"]
    m = evaluate_dpo(model, tokenizer, rows, reference_pairs=reference_pairs)
    return m["test_loss"], m["reward_accuracy"]


def curve_point(data: LMData, model, tokenizer, step: int, reference=None, cache: dict | None = None) -> dict:
    """Validation and test quality at `step`, and the forgetting probes where the task has them. DPO's reference
    (`reference`, None: the adapter-disabled model) log-probs of each split are computed once into `cache`."""
    from benchmarks.quality.smol import forgetting

    cache = {} if cache is None else cache
    quality = {}
    for split in ("val", "test"):
        rows = getattr(data, split)
        if data.kind == "dpo" and split not in cache:
            cache[split] = reference_logps(model, tokenizer, rows, reference)
        quality[split] = _evaluate(data, model, tokenizer, rows, cache.get(split))
    (val, val_acc), (test, acc) = quality["val"], quality["test"]
    point = {"step": step, "test_loss": test, "accuracy": acc, "val_loss": val, "val_accuracy": val_acc,
             "train_loss": None}  # fmt: skip
    return {**point, **(forgetting(model, tokenizer, data.probes) if data.probes else {})}


def run_causal(method: str, fisher: dict | None, lr: float, seed: int, preset, data: LMData) -> dict:
    """One run; returns `{curve, init_seconds, init_batches}` in the protocol's record shape. `fisher`:
    `FisherConfig` fields of a Fisher variant (None: a PEFT init named `method`)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    from benchmarks.quality.methods import build_adapter

    tokenizer = AutoTokenizer.from_pretrained(data.base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(data.base)
    reference = None
    if data.kind == "dpo" and (method in BASE_CHANGING or (fisher or {}).get("policy") == "preserve"):
        reference = AutoModelForCausalLM.from_pretrained(data.base).eval().requires_grad_(False)
    lora = {"r": preset.rank, "lora_alpha": 2 * preset.rank, "lora_dropout": 0.0, "target_modules": TARGETS}
    started, peft_config = time.perf_counter(), None
    if fisher is not None:
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora)
    else:
        batches = _calibration(method, data, model, tokenizer, preset, seed)
        model = build_adapter(method, model, batches, lora={**lora, "task_type": "CAUSAL_LM"}).model
    trainer = _trainer(data, model, tokenizer, peft_config, lr, seed, preset, reference)
    callback = None
    if fisher is not None:
        from fisher_trl import FisherInitCallback

        options = {"num_batches": preset.calibration, "progress": False, **fisher}
        callback = FisherInitCallback(**options).attach(trainer)
    at = sorted({round(f * preset.steps) for f in preset.eval_at})
    curve: list[dict] = []
    init_seconds: list[float] = []
    reference_pairs: dict = {}  # DPO: the reference's log-probs of each split, computed at the first curve point

    class Curve(TrainerCallback):  # after the Fisher callback: the init has run when training begins
        def on_train_begin(self, args, state, control, **kwargs):
            init_seconds.append(time.perf_counter() - started)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in at:
                curve.append(curve_point(data, trainer.model, tokenizer, state.global_step, reference, reference_pairs))

    trainer.add_callback(Curve())
    trainer.remove_callback(PrinterCallback)  # one line per run comes from the protocol
    trainer.train()
    return {
        "curve": curve,
        "init_seconds": init_seconds[0],
        "init_batches": callback.report.num_batches if callback and callback.report else None,
    }


def _calibration(method: str, data: LMData, model, tokenizer, preset, seed: int) -> list[dict]:
    """The batches a PEFT data-driven init reads: `calibration·batch_size` training rows drawn by `seed`; for
    CorDA's knowledge-preserved mode and LoRA-Null the data whose knowledge is kept, the same keep data
    `keep_knowledge` builds by default (the model's own greedy answers to fisher-lora's shipped instructions)."""
    if method in KEEP_DATA_INITS:
        from fisher_core.keep.answers import instructions, own_answer_batches, prompt_ids

        return own_answer_batches(model, tokenizer, [prompt_ids(tokenizer, i) for i in instructions()])
    rows = random.Random(seed).sample(data.calibration, preset.calibration * preset.batch_size)
    encoded = [encode(tokenizer, r["prompt"], r["completion"]) for r in rows]
    return [
        collate(encoded[i : i + preset.batch_size], tokenizer.pad_token_id)
        for i in range(0, len(encoded), preset.batch_size)
    ]


def _trainer(data: LMData, model, tokenizer, peft_config, lr: float, seed: int, preset, reference=None):
    """TRL's SFTTrainer / DPOTrainer with the protocol's schedule (warm-up, linear decay, AdamW); `reference`
    DPO's separate `ref_model` (None: the adapter-disabled model)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    common = dict(
        output_dir=str(cache_dir() / "runs" / "causal"), max_steps=preset.steps,
        per_device_train_batch_size=preset.batch_size, learning_rate=lr, lr_scheduler_type="linear",
        warmup_steps=round(preset.warmup * preset.steps), weight_decay=0.0, max_length=data.max_length,
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=preset.device == "cpu", disable_tqdm=True,
        seed=seed, data_seed=seed,
    )  # fmt: skip
    rows = Dataset.from_list(data.train)
    if data.kind == "sft":
        return SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=rows, processing_class=tokenizer,
                          peft_config=peft_config)  # fmt: skip
    return DPOTrainer(model=model, ref_model=reference, args=DPOConfig(beta=0.1, **common), train_dataset=rows,
                      processing_class=tokenizer, peft_config=peft_config)  # fmt: skip
