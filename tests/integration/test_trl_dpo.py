"""FisherInitCallback on a real DPOTrainer (tiny Llama, CPU): the reference must stay the original model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from fisher_trainer import policy_logits
from fisher_trainer import summed_loss_fn as trainer_loss_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "tiny"))
import trl_tiny

pytestmark = [pytest.mark.slow, pytest.mark.trl]  # the real TRL trainers, end to end

FISHER = {"num_batches": 2, "progress": False}
EXACT = {"bf16": False}


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_dpo_defaults_to_zero_policy_and_keeps_the_reference(tiny_llama_dir, tmp_path, caplog):
    trainer, callback = trl_tiny.build("dpo", tiny_llama_dir, tmp_path, fisher=FISHER, steps=1, **EXACT)
    assert "save_model" not in vars(trainer)  # under `zero` nothing of the trainer's is replaced
    original = base_weights(trainer.model)
    with caplog.at_level(logging.INFO):
        trainer.train()
    assert any("natural directions from empirical Fisher (zero)" in r.message for r in caplog.records)
    assert callback.report.policy == "zero"
    for name, w in base_weights(trainer.model).items():
        assert torch.equal(w, original[name]), name  # the adapter-disabled reference is the original model
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)  # policy == reference


def test_dpo_explicit_preserve_is_refused(tiny_llama_dir, tmp_path):
    """Refused when the callback is attached, before `train()` (`fisher_trainer.check_before_work`)."""
    with pytest.raises(ValueError, match="reference with the adapter disabled"):
        trl_tiny.build("dpo", tiny_llama_dir, tmp_path, fisher={**FISHER, "policy": "preserve"}, **EXACT)


def test_dpo_preserve_with_precomputed_reference_matches_plain_first_step(tiny_llama_dir, tmp_path):
    plain, _ = trl_tiny.build(
        "dpo", tiny_llama_dir, tmp_path / "plain", steps=1, precompute_ref_log_probs=True, **EXACT
    )
    plain.train()
    fisher, callback = trl_tiny.build(
        "dpo",
        tiny_llama_dir,
        tmp_path / "fisher",
        fisher={**FISHER, "policy": "preserve"},
        steps=1,
        precompute_ref_log_probs=True,
        **EXACT,
    )
    fisher.train()
    assert callback.report.policy == "preserve"
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "entropy", "num_tokens"):
        assert fisher.state.log_history[0][key] == pytest.approx(plain.state.log_history[0][key], abs=1e-5), key


def test_dpo_with_a_separate_reference_model_allows_preserve_and_keeps_its_reference(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trainer, callback = trl_tiny.build(
        "dpo",
        tiny_llama_dir,
        tmp_path,
        fisher={**FISHER, "policy": "preserve"},
        steps=2,
        learning_rate=0.0,
        ref_model=reference,
        **EXACT,
    )
    trainer.train()
    assert callback.report.policy == "preserve"  # the reference is another model: writing this base is safe
    for entry in trainer.state.log_history[:2]:  # lr 0: the policy is the original model, like the reference
        assert entry["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
        assert abs(entry["rewards/chosen"]) < 1e-5 and abs(entry["rewards/rejected"]) < 1e-5


def test_dpo_objective_is_summed_over_pairs_and_true_fisher_reads_completions(tiny_llama_dir, tmp_path):
    trainer, callback = trl_tiny.build(
        "dpo", tiny_llama_dir, tmp_path, fisher={**FISHER, "fisher_type": "true"}, **EXACT
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    pairs = batch["input_ids"].shape[0] // 2
    summed = trainer_loss_fn(trainer)(model, batch)
    torch.testing.assert_close(summed, torch.log(torch.tensor(2.0)) * pairs)  # policy == reference at step 0
    logits, labels = policy_logits(model, batch)
    assert logits.shape[0] == labels.shape[0] == int(batch["completion_mask"][:, 1:].sum())
    trainer.train()
    assert callback.report.fisher_type == "true" and trainer.state.global_step == 2
