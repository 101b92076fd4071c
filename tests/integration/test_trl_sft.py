"""FisherInitCallback on a real SFTTrainer and a plain transformers.Trainer (tiny Llama, CPU)."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from fisher_core.write import load_record, restore_offsets
from fisher_core.write.record import RECORD_FILE
from fisher_trainer import policy_logits
from fisher_trainer import summed_loss_fn as trainer_loss_fn
from fisher_trl import FisherInitCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "tiny"))
import trl_tiny

pytestmark = [pytest.mark.slow, pytest.mark.trl]  # the real TRL trainers, end to end

# `preserve` (opted into): the path with base offsets — B written before step 0, checkpoint records, export
FISHER = {"num_batches": 2, "progress": False, "policy": "preserve"}
EXACT = {"bf16": False}  # SFTConfig defaults to bf16 autocast; comparisons below want fp32


class Probe(TrainerCallback):
    """Registered after the Fisher callback: sees the model as training is about to start."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        trainer.add_callback(self)

    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model
        self.grads = [n for n, p in model.named_parameters() if p.grad is not None]
        self.metrics = copy.deepcopy(self.trainer._metrics)
        self.tokens = self.trainer._total_train_tokens
        self.lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        self.base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
        self.rng = torch.get_rng_state()


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_sft_callback_initializes_from_trainer_objective_and_leaves_no_trace(tiny_llama_dir, tmp_path, caplog):
    trainer, callback = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=FISHER, **EXACT)
    before = lora_state(trainer.model)
    rng = torch.get_rng_state()
    probe = Probe(trainer)
    with caplog.at_level(logging.INFO, logger="fisher_core"):
        trainer.train()
    summary = "natural directions from empirical Fisher (preserve) relative to the keep data's Fisher on 14 layers"
    assert any(summary in r.message for r in caplog.records)  # the default keeps a chat model's answers
    assert callback.report.num_batches == 2 and callback.report.num_tokens > 0
    b_names = [n for n in probe.lora if "lora_B" in n]
    assert all(before[n].abs().max() == 0 for n in b_names)
    assert all(probe.lora[n].abs().max() > 0 for n in b_names)  # written before the first step
    assert probe.grads == []
    assert probe.metrics == {"train": {}, "eval": {}} and probe.tokens == 0
    assert torch.equal(probe.rng, rng)  # the init consumed none of the training run's randomness
    assert trainer.state.global_step == 2


def test_sft_loss_fn_is_the_sum_of_token_losses(tiny_llama_dir, tmp_path):
    trainer, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path, **EXACT)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    summed = trainer_loss_fn(trainer)(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(summed, expected)
    logits_k, labels_k = policy_logits(model, batch)
    assert logits_k.shape[0] == labels_k.shape[0] == int((labels != -100).sum())


def test_sft_true_fisher_initializes_and_trains(tiny_llama_dir, tmp_path):
    trainer, callback = trl_tiny.build(
        "sft", tiny_llama_dir, tmp_path, fisher={**FISHER, "fisher_type": "true"}, **EXACT
    )
    trainer.train()
    assert callback.report.fisher_type == "true" and trainer.state.global_step == 2
    assert all(torch.isfinite(t).all() for t in lora_state(trainer.model).values())


def _stats(tiny_llama_dir, tmp_path, **training):
    trainer, callback = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=FISHER, steps=1, **training)
    trainer.train()
    return callback.report.stats


@pytest.mark.parametrize("variant", [{"gradient_checkpointing": True}, {"bf16": True}], ids=["checkpointing", "bf16"])
def test_statistics_do_not_depend_on_checkpointing_or_autocast(tiny_llama_dir, tmp_path, variant):
    reference = _stats(tiny_llama_dir, tmp_path / "a", bf16=False, gradient_checkpointing=False)
    other = _stats(tiny_llama_dir, tmp_path / "b", **{"bf16": False, "gradient_checkpointing": False, **variant})
    assert set(reference) == set(other)
    for name, s in reference.items():
        assert other[name].num_tokens == s.num_tokens
        for what in ("input_cov", "grad_cov", "mean_grad"):
            a, b = getattr(s, what), getattr(other[name], what)
            assert a.dtype == b.dtype == torch.float32
            if variant.get("bf16"):  # bf16 rounds every activation (2⁻⁹ per op): 0.4–0.9 % normwise, both sets
                assert torch.linalg.norm(b - a) <= 2e-2 * torch.linalg.norm(a), f"{what} of {name}"
            else:
                scale = a.abs().max()
                torch.testing.assert_close(b / scale, a / scale, rtol=1e-4, atol=1e-6, msg=f"{what} of {name}")


def test_preserve_first_step_matches_run_without_callback(tiny_llama_dir, tmp_path):
    plain, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path / "plain", steps=1, **EXACT)
    plain.train()
    fisher, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path / "fisher", fisher=FISHER, steps=1, **EXACT)
    fisher.train()
    first, second = plain.state.log_history[0], fisher.state.log_history[0]
    for key in ("loss", "entropy", "num_tokens", "mean_token_accuracy"):
        assert second[key] == pytest.approx(first[key], rel=1e-5), key


def test_resume_restores_offsets_without_reinitializing(tiny_llama_dir, tmp_path, caplog):
    full, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=FISHER, steps=3, save_steps=2, **EXACT)
    full.train()
    assert (tmp_path / "checkpoint-2" / RECORD_FILE).exists()
    resumed, callback = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=FISHER, steps=3, save_steps=2, **EXACT)
    with caplog.at_level(logging.INFO, logger="fisher_trl"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    lines = [r.message for r in caplog.records if "not re-initializing" in r.message]
    assert len(lines) == 1 and "base offsets of 14 layers restored" in lines[0]
    assert callback.report is None
    final_full, final_resumed = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    for name, p in final_full.items():
        if "base_layer.weight" in name or "lora_" in name:
            torch.testing.assert_close(final_resumed[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_resuming_another_runs_checkpoint_at_the_same_step_is_refused(tiny_llama_dir, tmp_path):
    """The Trainer does not tell callbacks which checkpoint it resumed; the callback reads `output_dir`'s
    `checkpoint-N`. Resumed from another run's checkpoint-2 while output_dir holds this run's own, it would
    restore this run's base offsets under the other run's adapter (before: silently)."""
    for name, batches in (("mine", 2), ("other", 1)):
        fisher = {**FISHER, "num_batches": batches}
        trainer, _ = trl_tiny.build(
            "sft", tiny_llama_dir, tmp_path / name, fisher=fisher, steps=2, save_steps=2, **EXACT
        )
        trainer.train()
    mine, other = (load_record(tmp_path / n / "checkpoint-2") for n in ("mine", "other"))
    name = next(iter(mine.offsets))
    assert not torch.allclose(mine.offsets[name][0].delta(), other.offsets[name][0].delta())  # different bases
    resumed, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path / "mine", fisher=FISHER, steps=3, save_steps=2, **EXACT)
    with pytest.raises(FileNotFoundError, match=r"is not the checkpoint this run resumed"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "other" / "checkpoint-2"))


def test_resuming_a_preserve_run_from_a_checkpoint_without_its_record_is_refused(tiny_llama_dir, tmp_path):
    """A checkpoint copied without fisher_init.safetensors: its adapter was trained against the changed base, so
    resuming on the original one would train a different model silently (before: logged as "policy zero")."""
    full, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=FISHER, steps=2, save_steps=2, **EXACT)
    full.train()
    (tmp_path / "checkpoint-2" / RECORD_FILE).unlink()
    resumed, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=FISHER, steps=3, save_steps=2, **EXACT)
    with pytest.raises(FileNotFoundError, match=r"resuming a `preserve` run from .* no fisher_init\.safetensors"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_final_save_loads_on_original_base_and_reproduces_trained_model(tiny_llama_dir, tmp_path):
    trainer, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=FISHER, steps=3, save_steps=3, **EXACT)
    trainer.train()
    trainer.save_model()
    assert not {"save_model", "train"} & set(vars(trainer))  # no method of the trainer's was replaced
    assert not (tmp_path / RECORD_FILE).exists()  # the model was handed back on the original base
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # oracle: the last checkpoint's raw adapter on the original base minus its recorded offsets
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "checkpoint-3")
    restore_offsets(trained, load_record(tmp_path / "checkpoint-3"))
    trained.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        live = trainer.model.eval()(**inputs).logits
        torch.testing.assert_close(live, expected, rtol=1e-4, atol=1e-4)
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-4)  # training did move the model


class Tracker(TrainerCallback):
    """What `report_to`'s trackers do, registered before fisher-lora's callbacks as a trainer registers them: W&B
    with `WANDB_LOG_MODEL` uploads each checkpoint folder in `on_save` and saves the model in `on_train_end`."""

    def __init__(self, out: Path) -> None:
        self.out, self.records = out, []

    def on_save(self, args, state, control, **kwargs):
        self.records.append((Path(args.output_dir) / f"checkpoint-{state.global_step}" / RECORD_FILE).is_file())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.save_pretrained(self.out)


def test_a_tracker_saving_at_train_end_gets_the_adapter_for_the_original_base(tiny_llama_dir, tmp_path):
    """Before: fisher-lora's callbacks ran after the trainer's reporters, which uploaded the raw adapter (a
    different model on the original base) and checkpoints without their record."""
    trainer, _ = trl_tiny.build("sft", tiny_llama_dir, tmp_path / "run", steps=3, save_steps=3, **EXACT)
    tracker = Tracker(tmp_path / "uploaded")
    trainer.add_callback(tracker)
    FisherInitCallback(**FISHER).attach(trainer)
    trainer.train()
    assert tracker.records == [True]  # the checkpoint it uploaded carries the base offsets
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trained = PeftModel.from_pretrained(original, tmp_path / "run" / "checkpoint-3")  # oracle: raw + offsets
    restore_offsets(trained, load_record(tmp_path / "run" / "checkpoint-3"))
    uploaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "uploaded")
    with torch.no_grad():
        expected = trained.eval()(**inputs).logits
        torch.testing.assert_close(uploaded.eval()(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_second_train_continues_the_handed_back_model_without_reinitializing(tiny_llama_dir, tmp_path, caplog):
    trainer, callback = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=FISHER, **EXACT)
    trainer.train()
    report, handed_back = callback.report, lora_state(trainer.model)
    with caplog.at_level(logging.INFO, logger="fisher_trainer"):
        trainer.train()
    assert any("not re-initializing" in r.message for r in caplog.records) and callback.report is report
    after = lora_state(trainer.model)
    assert after.keys() == handed_back.keys()
    assert any(not torch.equal(after[n], p) for n, p in handed_back.items())  # a fresh optimizer trains it on


def test_plain_trainer_with_peft_model(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)

    def tokenize(row: dict) -> dict:
        prompt, completion = tokenizer(row["prompt"])["input_ids"], tokenizer(row["completion"])["input_ids"]
        return {"input_ids": (prompt + completion)[:64], "labels": ([-100] * len(prompt) + completion)[:64]}

    dataset = load_dataset("json", data_files=str(trl_tiny.DATA / "sft.jsonl"), split="train")
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
    dataset = dataset.filter(lambda row: any(t != -100 for t in row["labels"]))  # truncation can drop completions
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(tmp_path, max_steps=1, per_device_train_batch_size=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    callback = FisherInitCallback(**FISHER).attach(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:].flatten()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels, reduction="sum")
    torch.testing.assert_close(trainer_loss_fn(trainer)(model, batch), expected)
    trainer.train()
    assert callback.report.num_batches == 2 and len(callback.report.layers) == 4
    assert trainer.state.global_step == 1


def test_keep_knowledge_generates_its_keep_data_with_the_trainers_tokenizer(tiny_llama_dir, tmp_path, caplog):
    """The callback hands `trainer.processing_class` through: the own-answer keep data needs nothing else, and the
    default (`keep_knowledge="auto"`) turns keep mode on for a tokenizer with a chat template."""
    fisher = {"num_batches": 2, "progress": False}
    trainer, callback = trl_tiny.build("sft", tiny_llama_dir, tmp_path, fisher=fisher, **EXACT)
    with caplog.at_level(logging.INFO, logger="fisher_core"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records]
    assert any("the model's own greedy answers to 16 instructions" in m for m in messages)
    assert any("keep_knowledge 'auto' is on: a chat model" in m for m in messages)
    assert callback.report.keep_knowledge
    assert "Fisher (zero) relative to the keep data's Fisher" in callback.report.summary()
