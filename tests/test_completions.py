"""The causal-LM tasks' metrics (`benchmarks/quality/completions.py`) against independent oracles:
transformers' own label-masked loss for SFT, DPO's closed form at an identity adapter (ln 2, a coin flip), and a
separate reference model read as the adapter-disabled one."""

from __future__ import annotations

import math

import pytest
import torch

ROWS = [
    {"prompt": "to be or not\n", "completion": "that is the question", "rejected": "question the is that"},
    {"prompt": "the quality of mercy\n", "completion": "is not strained", "rejected": "strained not is"},
    {"prompt": "all the world\n", "completion": "is a stage and all", "rejected": "all and stage a is"},
]


@pytest.fixture(scope="module")
def lm():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from benchmarks.tiny_models import llama_config, train_bpe

    tokenizer = train_bpe([r[k] for r in ROWS for k in r] * 4, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer), hidden=32, layers=1, tie_word_embeddings=True))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(model, config), tokenizer


def test_sft_loss_is_the_models_own_completion_loss(lm):
    from benchmarks.quality.completions import collate, encode, evaluate_sft

    model, tokenizer = lm
    for row in ROWS:  # one row at a time: transformers averages over that row's completion tokens
        batch = collate([encode(tokenizer, row["prompt"], row["completion"])], tokenizer.pad_token_id)
        with torch.no_grad():
            expected = float(model(**batch).loss)
        assert evaluate_sft(model, tokenizer, [row])["test_loss"] == pytest.approx(expected, rel=1e-5)


def test_dpo_at_an_identity_adapter_is_ln2_and_a_coin_flip_and_moves_when_b_does(lm):
    from benchmarks.quality.completions import evaluate_dpo

    model, tokenizer = lm
    at_start = evaluate_dpo(model, tokenizer, ROWS)
    assert at_start["test_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert at_start["reward_accuracy"] == 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert abs(evaluate_dpo(model, tokenizer, ROWS)["test_loss"] - math.log(2)) > 1e-3
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()


def test_dpo_reads_a_separate_reference_model_as_its_reference(lm):
    """A separate reference holding the base weights gives the adapter-disabled reference's loss (the oracle; the
    trained model as its own reference would give ln 2), and one holding the trained weights gives ln 2 (an
    ignored reference would give the adapter-disabled loss)."""
    import copy

    from benchmarks.quality.completions import evaluate_dpo

    model, tokenizer = lm
    reference = copy.deepcopy(model.get_base_model())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    try:
        separate = evaluate_dpo(model, tokenizer, ROWS, reference=reference)
        assert separate == pytest.approx(evaluate_dpo(model, tokenizer, ROWS), rel=1e-6)
        assert abs(separate["test_loss"] - math.log(2)) > 1e-3
        itself = evaluate_dpo(model, tokenizer, ROWS, reference=copy.deepcopy(model))
        assert itself["test_loss"] == pytest.approx(math.log(2), rel=1e-6)
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()


def test_dpo_reference_logps_computed_once_before_training_equal_the_references_at_every_step(lm):
    """The protocol computes the reference's log-probs once per run (`reference_logps`) and reuses them at every
    curve point: after B moves they still give the loss computed from scratch, and they are transformers' own
    summed completion log-likelihoods (a cache of the trained model instead gives ln 2)."""
    from benchmarks.quality.completions import collate, encode, evaluate_dpo, reference_logps

    model, tokenizer = lm
    cached = reference_logps(model, tokenizer, ROWS)
    for side, logps in zip(("completion", "rejected"), cached, strict=True):
        for row, logp in zip(ROWS, logps, strict=True):
            batch = collate([encode(tokenizer, row["prompt"], row[side])], tokenizer.pad_token_id)
            with torch.no_grad():
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                assert float(logp) == pytest.approx(-float(model(**batch).loss) * tokens, rel=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    try:
        fresh = evaluate_dpo(model, tokenizer, ROWS)
        assert evaluate_dpo(model, tokenizer, ROWS, reference_pairs=cached) == pytest.approx(fresh, rel=1e-6)
        stale = evaluate_dpo(model, tokenizer, ROWS, reference_pairs=reference_logps(model, tokenizer, ROWS, model))
        assert stale["test_loss"] == pytest.approx(math.log(2), rel=1e-6)
        assert abs(fresh["test_loss"] - math.log(2)) > 1e-3
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
