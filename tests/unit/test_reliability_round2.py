"""Reliability, round 2: silent wrong results found by an adversarial pass (docs/reliability.md).

Each test fails on the code before its fix. Models are tiny Llamas (and GPT-2 where the weight layout
differs); the oracle is always the model's own outputs or PEFT's own save/load.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import ValidationError
from tiny import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fisher_core import FisherConfig, initialize, select
from fisher_core.write import apply

IDS = torch.randint(3, 384, (2, 8), generator=torch.Generator().manual_seed(1))


def _batches(n: int = 4, t: int = 8, vocab: int = 384) -> list[dict]:
    ids = torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def _cfg(**kw) -> FisherConfig:
    return FisherConfig(progress=False, num_batches=1, **kw)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _tied_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


@pytest.mark.parametrize(
    ("build", "targets"),
    [(_tied_llama, ["q_proj", "lm_head"]), (_tied_gpt2, ["c_attn", "lm_head"])],
    ids=["llama", "gpt2"],
)
def test_tied_output_layer_keeps_outputs_and_the_tied_embedding(build, targets):
    model = build()
    embedding = model.get_input_embeddings().weight.detach().clone()
    before = _logits(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    report = initialize(peft_model, _batches(), config=_cfg())
    torch.testing.assert_close(_logits(peft_model), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(peft_model.get_input_embeddings().weight, embedding)  # the tied input embedding is untouched
    assert all(d.policy == "zero" and not d.B.any() for d in report.directions.values())  # the default


def test_tied_output_layer_with_explicit_preserve_is_refused_before_the_pass():
    peft_model = get_peft_model(_tied_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="tied to another module"):
        initialize(peft_model, iter(()), config=_cfg(policy="preserve"))  # no batches read: refused first


def test_a_second_adapter_does_not_move_the_active_one():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    initialize(peft_model, _batches(), config=_cfg())
    peft_model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    active = _logits(peft_model)
    report = initialize(peft_model, _batches(), config=_cfg(), adapter_name="second")
    torch.testing.assert_close(_logits(peft_model), active, rtol=1e-5, atol=1e-5)
    assert all(d.policy == "zero" for d in report.directions.values())


def test_preserve_says_once_that_its_learning_rate_needs_tuning(caplog):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with caplog.at_level(logging.WARNING, logger="fisher_core"):
        initialize(peft_model, _batches(), config=_cfg(policy="preserve"))
    assert sum("Tune the learning rate" in r.message for r in caplog.records) == 1
    caplog.clear()
    fresh = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with caplog.at_level(logging.WARNING, logger="fisher_core"):
        initialize(fresh, _batches(), config=_cfg())  # the default `zero`: nothing to say
    assert not any("learning rate" in r.message for r in caplog.records)


def test_preserve_on_a_shared_base_is_refused_before_the_pass():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"shared with adapter\(s\) default; use policy='zero'"):
        initialize(peft_model, iter(()), config=_cfg(policy="preserve"), adapter_name="second")


def test_apply_with_another_rank_updates_peft_config_and_the_saved_adapter_loads(tmp_path):
    targets = ["q_proj", "v_proj"]
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    stats = initialize(other, _batches(), config=_cfg()).stats
    directions = select(stats, other, config=_cfg())
    apply(peft_model, directions)
    outputs = _logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    base = tiny_llama()
    for name, module in peft_model.named_modules():  # the residual base the adapter trained on
        if hasattr(module, "base_layer") and "lora_A" in dir(module):
            dict(base.named_modules())[name.removeprefix("base_model.model.")].weight.data.copy_(
                module.base_layer.weight
            )
    loaded = PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(_logits(loaded), outputs, rtol=1e-5, atol=1e-5)


def test_select_rank_on_a_peft_model_is_refused_not_ignored():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    stats = initialize(copy.deepcopy(peft_model), _batches(), config=_cfg()).stats
    with pytest.raises(ValueError, match="rank comes from its LoraConfig"):
        select(stats, peft_model, config=_cfg(), rank=2)


@pytest.mark.parametrize("field", ["damping", "stable_gamma", "stop_tol", "position_fraction", "rank_cap"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        FisherConfig(**{field: value})


def _trained(targets=("q_proj", "v_proj"), head: bool = False):
    """A PEFT model whose adapter was initialized and then moved (as training would)."""
    kwargs = {"modules_to_save": ["lm_head"]} if head else {}
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **kwargs))
    initialize(peft_model, _batches(), config=_cfg())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.05))
    return peft_model


@pytest.mark.parametrize("head", [False, True], ids=["adapter", "adapter+head"])
def test_force_reinitializes_from_the_model_it_sits_on(head):
    trained = _trained(head=head)
    outputs = _logits(trained)
    fresh_on_trained = copy.deepcopy(trained)
    report = initialize(trained, _batches(), config=_cfg(force=True))
    torch.testing.assert_close(_logits(trained), outputs, rtol=1e-4, atol=1e-4)  # preserve keeps the trained model
    # the oracle: the same statistics from the trained model merged into a plain model
    merged = fresh_on_trained.merge_and_unload()
    oracle = get_peft_model(merged, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    expected = initialize(oracle, _batches(), config=_cfg()).stats
    for name, stats in report.stats.items():
        torch.testing.assert_close(stats.mean_grad, expected[name].mean_grad, rtol=1e-4, atol=1e-6)


def test_refusing_a_merged_trained_adapter_leaves_it_merged_and_untouched():
    peft_model = _trained()
    peft_model.merge_adapter()
    weights = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    outputs = _logits(peft_model)
    with pytest.raises(RuntimeError, match="looks trained"):
        initialize(peft_model, iter(()), config=_cfg())  # refused before any batch is read
    assert all(torch.equal(p, weights[n]) for n, p in peft_model.named_parameters())
    assert all(getattr(m, "merged", True) for m in peft_model.modules() if hasattr(m, "lora_A"))
    torch.testing.assert_close(_logits(peft_model), outputs)


def test_rank_above_a_layer_dimension_is_refused_before_the_pass():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=40, lora_alpha=40, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="exceeds min"):
        initialize(peft_model, iter(()), config=_cfg())
