"""Tiny real models for tests: a Llama built from a config and a BPE tokenizer trained locally on the
shipped Tempest text (no hub). Deterministic: the same call gives the same weights and vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.tiny_models import llama_config, train_bpe

DATA = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def texts() -> list[str]:
    return [json.loads(line)["text"] for line in (DATA / "text.jsonl").read_text().splitlines()]


def train_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the shipped text, with pad/bos/eos/unk and a chat template."""
    fast = train_bpe(texts(), vocab_size, extra_specials=("<|user|>", "<|assistant|>"))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int = 384, hidden: int = 32, layers: int = 2) -> LlamaConfig:
    return llama_config(vocab_size, hidden, layers, tie_word_embeddings=False)


def tiny_llama(seed: int = 0, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kwargs)).eval()


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Write a loadable model directory (config, safetensors weights, tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    model = tiny_llama(seed, vocab_size=len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def checkpointing_on(model: torch.nn.Module, use_reentrant: bool = False) -> torch.nn.Module:
    """Turn transformers' checkpointing on, through whichever public name this transformers has
    (`activation_checkpointing_enable`, which deprecated `gradient_checkpointing_enable`)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    return model
