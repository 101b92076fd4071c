"""Tiny causal LMs built locally (no hub), for the tests and the quality benchmark alike: a byte-level BPE
tokenizer trained on given texts, and a small Llama config whose special-token ids match it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
