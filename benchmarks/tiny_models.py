"""Tiny causal LMs built locally (no hub), for the tests and the quality benchmark alike: a byte-level BPE
tokenizer trained on given texts, and a small Llama config whose special-token ids match it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import LlamaConfig, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def train_bpe(texts: Iterable[str], vocab_size: int, extra_specials: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `<pad>`/`<s>`/`</s>`/`<unk>` (ids 0–3, then `extra_specials`); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIALS, *extra_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llama_config(vocab_size: int, hidden: int, layers: int, *, tie_word_embeddings: bool) -> LlamaConfig:
    """A Llama with an MLP of 2× `hidden`, 4 heads over 2 KV heads, 256 positions and `train_bpe`'s
    special-token ids (pad 0, bos 1, eos 2)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
    )


def pretrain(
    model: torch.nn.Module, chunks: torch.Tensor, steps: int, batch_size: int, lr: float,
    schedule: Callable[[int], float],
) -> float:  # fmt: skip
    """Train `model` from scratch on rows of `chunks` drawn with a generator seeded 0: AdamW (weight decay
    0.01), lr × `schedule(step)`, gradients clipped to norm 1. Leaves it in eval mode; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        rows = chunks[torch.randint(len(chunks), (batch_size,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return loss.item()
