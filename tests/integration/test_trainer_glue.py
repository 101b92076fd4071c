"""The shared trainer glue through both integrations, on the real frameworks.

DPO's reference must stay the ORIGINAL model: at learning rate 0 the policy is its own reference, so
DPO's loss is ln 2 and every reward 0 — with `lora_init: fisher` on (the default policy `zero`), and
with a precomputed reference (where `preserve` is allowed; Axolotl 0.19 has no separate reference model
for adapters). Objectives fisher-lora cannot sum are refused before any work; an explicit `preserve`
against an adapter-disabled reference is refused with the reason. Both integrations leave the trainer's
state exactly as they found it.
"""

from __future__ import annotations

import ast
import logging
import math
import random
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_axolotl import axolotl_train, axolotl_yaml, fisher_lines, log_history
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from fisher_core.write import get_record
from fisher_trainer import check_objective

pytestmark = pytest.mark.slow
LN2 = math.log(2.0)


def logged_steps(log: str) -> list[dict]:
    """The per-step metric dicts a Trainer prints (`{'loss': ..., 'rewards/chosen': ...}`)."""
    found = []
    for match in re.finditer(r"\{'loss': [^{}]*\}", log):
        found.append(ast.literal_eval(match.group(0).replace("'", '"').replace('"', "'")))
    return found


def dpo_at_lr0(tiny_llama_dir, tmp_path, **overrides) -> tuple[list[dict], str]:
    out = tmp_path / "dpo"
    config = axolotl_yaml(
        "axolotl_dpo.yml", tiny_llama_dir, tmp_path, output_dir=str(out), learning_rate=0.0, **overrides
    )
    log = axolotl_train(config)
    return logged_steps(log), log


def assert_own_reference(steps: list[dict]) -> None:
    assert steps, "no step metrics were logged"
    for step in steps:
        assert abs(float(step["loss"]) - LN2) < 1e-4, step
        assert abs(float(step["rewards/chosen"])) < 1e-5 and abs(float(step["rewards/rejected"])) < 1e-5, step


def test_axolotl_dpo_keeps_the_original_model_as_reference(tiny_llama_dir, tmp_path):
    steps, log = dpo_at_lr0(tiny_llama_dir, tmp_path)
    assert_own_reference(steps)
    assert any("directions from empirical Fisher (zero)" in line for line in fisher_lines(log)), fisher_lines(log)


def test_axolotl_dpo_with_precomputed_reference_allows_preserve(tiny_llama_dir, tmp_path):
    steps, _ = dpo_at_lr0(tiny_llama_dir, tmp_path, precompute_ref_log_probs=True, fisher_policy="preserve")
    assert_own_reference(steps)
    # preserve changed the base; at lr 0 the trained model is the original one, and so is what was saved
    saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "dpo").eval()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()(input_ids=ids).logits
        torch.testing.assert_close(saved(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_axolotl_dpo_refuses_an_explicit_preserve_against_its_own_reference(tiny_llama_dir, tmp_path):
    out = tmp_path / "dpo"
    config = axolotl_yaml("axolotl_dpo.yml", tiny_llama_dir, tmp_path, output_dir=str(out), fisher_policy="preserve")
    log = axolotl_train(config, ok=False)
    assert "policy 'preserve' would change that reference" in log
    assert not (out / "adapter_config.json").exists()


@pytest.mark.parametrize(
    ("module", "name", "objective"),
    [
        ("axolotl.core.trainers.trl", "AxolotlKTOTrainer", "KTO"),
        ("axolotl.core.trainers.trl", "AxolotlORPOTrainer", "ORPO"),
        ("axolotl.core.trainers.trl", "AxolotlCPOTrainer", "CPO/SimPO"),
    ],
)
def test_objectives_without_a_per_example_sum_are_refused(module, name, objective):
    cls = getattr(pytest.importorskip(module), name)
    with pytest.raises(ValueError, match=f"does not support {re.escape(objective)}"):
        check_objective(cls.__new__(cls))


def _state(trainer: Trainer) -> tuple:
    return (
        random.getstate(),
        np.random.get_state()[1].copy(),
        torch.get_rng_state(),
        repr(getattr(trainer, "_metrics", None)),
        getattr(trainer.state, "tokens", None),
    )


def _sft_trainer(
    tiny_llama_dir, tmp_path, *, adapter_name: str = "default", rows: int = 8, base=None, **training
) -> Trainer:
    model = get_peft_model(
        base if base is not None else AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        adapter_name=adapter_name,
    )
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(3, 300, (rows, 12), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], use_cpu=True, **training
    )
    return Trainer(model=model, args=args, train_dataset=data)


def _via_trl(trainer: Trainer, tmp_path) -> None:
    from fisher_trl import FisherInitCallback

    callback = FisherInitCallback(num_batches=2, progress=False, policy="preserve").attach(trainer)
    callback.on_train_begin(trainer.args, trainer.state, trainer.control)


def _via_axolotl(trainer: Trainer, tmp_path) -> None:
    """What Axolotl calls once its trainer exists (`post_trainer_create`), with `lora_init: fisher`."""
    from axolotl.utils.dict import DictDefault

    from fisher_axolotl import FisherLoRAPlugin

    cfg = {"lora_init": "fisher", "output_dir": str(tmp_path), "fisher_num_batches": 2, "fisher_progress": False}
    cfg["fisher_policy"] = "preserve"
    FisherLoRAPlugin().post_trainer_create(DictDefault(cfg), trainer)


def _refusal(integrate, trainer: Trainer, tmp_path) -> str:
    with pytest.raises(ValueError) as caught:
        integrate(trainer, tmp_path)
    return str(caught.value)


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("integrate", [_via_trl, _via_axolotl], ids=["trl", "axolotl"])
def test_qlora_with_preserve_is_refused_before_any_forward(integrate, tiny_llama_dir, tmp_path):
    """A 4-bit base cannot take W - s·B·A: both integrations refuse before the statistics pass reads a batch
    (TRL used to run the whole pass first), with the adapter as it was."""
    from transformers import BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    trainer = _sft_trainer(tiny_llama_dir, tmp_path, base=base)
    forwards = []
    trainer.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    before = _lora(trainer.model)
    message = _refusal(integrate, trainer, tmp_path)
    assert "its weight is quantized (bnb-4bit) and cannot be written; use policy='zero'" in message
    assert not forwards
    assert all(torch.equal(p, before[n]) for n, p in _lora(trainer.model).items())


@pytest.mark.parametrize("integrate", [_via_trl, _via_axolotl], ids=["trl", "axolotl"])
def test_the_active_adapter_is_initialized_whatever_its_name(integrate, tiny_llama_dir, tmp_path):
    trainer = _sft_trainer(tiny_llama_dir, tmp_path, adapter_name="fisher")
    integrate(trainer, tmp_path)
    b = [p for n, p in trainer.model.named_parameters() if "lora_B.fisher" in n]
    assert len(b) == 4 and all(p.abs().max() > 0 for p in b)  # preserve wrote B
    assert get_record(trainer.model, "fisher").changes_base


def test_both_integrations_refuse_an_empty_training_set_with_the_same_line(tiny_llama_dir, tmp_path):
    trl = _refusal(_via_trl, _sft_trainer(tiny_llama_dir, tmp_path, rows=0), tmp_path)
    axolotl = _refusal(_via_axolotl, _sft_trainer(tiny_llama_dir, tmp_path, rows=0), tmp_path)
    assert trl == axolotl and "the training set is empty" in trl and "\n" not in trl


@pytest.mark.parametrize("integrate", [_via_trl, _via_axolotl], ids=["trl", "axolotl"])
def test_a_second_init_of_the_same_adapter_does_nothing(integrate, tiny_llama_dir, tmp_path, caplog):
    trainer = _sft_trainer(tiny_llama_dir, tmp_path)
    integrate(trainer, tmp_path)
    first = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="fisher_trainer"):
        integrate(trainer, tmp_path)
    assert any("not re-initializing" in r.message for r in caplog.records)
    assert all(torch.equal(p, first[n]) for n, p in trainer.model.named_parameters())


def _train_via_trl(trainer: Trainer, tmp_path) -> None:
    from fisher_trl import FisherInitCallback

    FisherInitCallback(num_batches=2, progress=False).attach(trainer)
    trainer.train()


def _train_via_axolotl(trainer: Trainer, tmp_path) -> None:
    from axolotl.utils.dict import DictDefault

    from fisher_axolotl import FisherLoRAPlugin

    cfg = {"lora_init": "fisher", "output_dir": str(tmp_path), "fisher_num_batches": 2, "fisher_progress": False}
    FisherLoRAPlugin().post_trainer_create(DictDefault(cfg), trainer)  # before train(), as Axolotl calls it
    trainer.train()


@pytest.mark.parametrize("integrate", [_train_via_trl, _train_via_axolotl], ids=["trl", "axolotl"])
def test_the_statistics_pass_runs_under_the_autocast_training_runs_under(integrate, tiny_llama_dir, tmp_path):
    """bf16 mixed precision: the pass (the first forwards) and the training step see the same CPU autocast state;
    Axolotl's pass, taken before `train()` prepares the model, used to run in fp32."""
    trainer = _sft_trainer(tiny_llama_dir, tmp_path, bf16=True, max_steps=1)
    seen = []
    trainer.model.get_base_model().model.layers[0].register_forward_pre_hook(  # inside accelerate's forward wrapper
        lambda module, args: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    integrate(trainer, tmp_path)
    assert len(seen) == 3  # two statistics batches, one training step
    assert set(seen) == {(True, torch.bfloat16)}, seen


@pytest.mark.parametrize("integrate", [_via_trl, _via_axolotl], ids=["trl", "axolotl"])
def test_both_integrations_leave_the_trainer_state_as_they_found_it(integrate, tiny_llama_dir, tmp_path):
    trainer = _sft_trainer(tiny_llama_dir, tmp_path)
    random.random(), np.random.rand(), torch.rand(1)
    before = _state(trainer)
    integrate(trainer, tmp_path)
    after = _state(trainer)
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    assert before[3:] == after[3:]
    assert not {"save_model", "train", "compute_loss"} & set(vars(trainer))  # no method of the trainer's replaced


def test_axolotl_ipo_keeps_the_original_model_as_reference(tiny_llama_dir, tmp_path):
    """IPO is DPO's trainer with another loss: the same reference, the same default policy. At lr 0 every
    log-ratio is 0, so IPO's loss is (1/(2β))² = 25 for β = 0.1 and every reward 0."""
    steps, log = dpo_at_lr0(tiny_llama_dir, tmp_path, rl="ipo")
    assert steps
    for step in steps:
        assert abs(float(step["loss"]) - 25.0) < 1e-3, step
        assert abs(float(step["rewards/chosen"])) < 1e-5 and abs(float(step["rewards/rejected"])) < 1e-5, step
    assert any("directions from empirical Fisher (zero)" in line for line in fisher_lines(log)), fisher_lines(log)


def test_axolotl_training_set_emptied_by_its_filtering_is_named_in_one_line(tiny_llama_dir, tmp_path):
    out = tmp_path / "empty"
    config = axolotl_yaml("axolotl_sft.yml", tiny_llama_dir, tmp_path, output_dir=str(out), sequence_len=4)
    log = axolotl_train(config, ok=False)
    assert "num_samples should be a positive integer" not in log
    assert "the training set is empty after preprocessing" in log, log[-3000:]


def test_axolotl_qlora_at_lr0_keeps_b_zero_and_the_loss_of_a_run_without_the_plugin(tiny_llama_dir, tmp_path):
    """A 4-bit base with the default policy: at learning rate 0 every logged loss equals that of the same run
    without the plugin (the model's outputs are the original's), and the saved adapter's B is all zero."""
    logs = {}
    for name in ("fisher", "plain"):
        out = tmp_path / name
        overrides = {"output_dir": str(out), "learning_rate": 0.0, "plugin": name == "fisher"}
        overrides.update(save_strategy="steps", save_steps=3)  # the trainer state holds the unrounded losses
        logs[name] = axolotl_train(axolotl_yaml("axolotl_qlora.yml", tiny_llama_dir, tmp_path, **overrides))
    assert any("directions from empirical Fisher (zero)" in line for line in fisher_lines(logs["fisher"]))
    assert not fisher_lines(logs["plain"])
    fisher, plain = log_history(tmp_path / "fisher"), log_history(tmp_path / "plain")
    assert fisher and len(fisher) == len(plain)
    for ours, theirs in zip(fisher, plain, strict=True):
        assert ours["loss"] == theirs["loss"], (ours, theirs)
    adapter = load_file(tmp_path / "fisher" / "adapter_model.safetensors")
    assert not any(v.any() for k, v in adapter.items() if "lora_B" in k)
    assert any(v.any() for k, v in adapter.items() if "lora_A" in k)


def test_the_record_goes_wherever_the_trainer_writes_the_checkpoint(tiny_llama_dir, tmp_path):
    """With `save_on_each_node` each node's first process writes the checkpoint (`args.should_save`); it writes the
    base-offset record there too, not only the world's first process (a resume from another node's disk would
    find no offsets). Here: the only process of a node that is not the world's first."""
    from transformers import TrainerState

    from fisher_core.write.record import RECORD_FILE
    from fisher_trainer.glue import RecordInCheckpoints

    trainer = _sft_trainer(tiny_llama_dir, tmp_path, save_on_each_node=True)
    _via_trl(trainer, tmp_path)  # preserve: the base changed, so checkpoints need the record
    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    state = TrainerState(is_world_process_zero=False, is_local_process_zero=True, global_step=3)
    RecordInCheckpoints(lambda: trainer.model).on_save(trainer.args, state, trainer.control)
    assert (checkpoint / RECORD_FILE).is_file()
