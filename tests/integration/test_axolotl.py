"""`lora_init: fisher` through the real `axolotl train` on a tiny local Llama (CPU).

Each run is a subprocess of the Axolotl CLI on a YAML from `recipes/tiny/`; runs are module-scoped
fixtures shared by the assertions. Four trainings: a fresh run with `fisher_rank_budget` and
checkpoints, the same run again (determinism), a resume from its first checkpoint, QLoRA, and DPO.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fisher_core.write import load_record, restore_offsets
from fisher_core.write.record import RECORD_FILE

pytest.importorskip("axolotl")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny"
LAYERS = 14  # 2 decoder layers × 7 projections
BUDGET = 40  # of 14 × r=4 = 56


def axolotl_yaml(name: str | Path, model_dir: Path, work: Path, *, plugin: bool = True, **overrides) -> Path:
    """A recipe (a file in recipes/tiny/, or the path of another) pointed at `model_dir`, shared prepared data and
    its own output dir; `plugin=False` drops the plugin and every key of it (the same run without fisher-lora)."""
    cfg = yaml.safe_load((TINY / name).read_text())
    cfg["base_model"] = str(model_dir)
    for ds in cfg["datasets"]:
        ds["path"] = str(ROOT / ds["path"])
    cfg["dataset_prepared_path"] = str(work / "prepared")
    cfg.update(overrides)
    if not plugin:
        cfg = {k: v for k, v in cfg.items() if not k.startswith("fisher_") and k not in ("plugins", "lora_init")}
    path = work / f"{Path(cfg['output_dir']).name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def axolotl_train(config: Path, *, ok: bool = True) -> str:
    """Run `axolotl train config` (single process, without the accelerate re-launch); return its output."""
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [str(bin_dir / "axolotl"), "train", str(config), "--launcher", "python"],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    if ok and proc.returncode != 0:
        pytest.fail(f"axolotl train failed ({proc.returncode}):\n{out[-6000:]}")
    return out


def log_history(out: Path) -> list[dict]:
    """The per-step metrics of a run at full precision (the printed log rounds losses to 4 digits), as the trainer
    state of its one checkpoint holds them."""
    (checkpoint,) = out.glob("checkpoint-*")
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def fisher_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "fisher-lora:" in line]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("axolotl")


FRESH = {  # `preserve` (opted into) exercises the base offsets: checkpoint records, resume, export
    "fisher_policy": "preserve",
    "fisher_rank_budget": BUDGET,
    "max_steps": 4,
    "save_strategy": "steps",
    "save_steps": 2,
}


@pytest.fixture(scope="module")
def fresh(tiny_llama_dir, work) -> tuple[Path, str]:
    config = axolotl_yaml("axolotl_sft.yml", tiny_llama_dir, work, output_dir=str(work / "fresh"), **FRESH)
    return work / "fresh", axolotl_train(config)


@pytest.fixture(scope="module")
def fresh_again(tiny_llama_dir, work, fresh) -> Path:
    config = axolotl_yaml("axolotl_sft.yml", tiny_llama_dir, work, output_dir=str(work / "again"), **FRESH)
    axolotl_train(config)
    return work / "again"


@pytest.fixture(scope="module")
def resumed(tiny_llama_dir, work, fresh) -> tuple[Path, str]:
    """Continue `fresh` from checkpoint-2 in a new output dir (as if it had stopped after step 2)."""
    out = work / "resumed"
    out.mkdir()
    shutil.copytree(fresh[0] / "checkpoint-2", out / "checkpoint-2")
    overrides = {**FRESH, "output_dir": str(out), "auto_resume_from_checkpoints": True}
    return out, axolotl_train(axolotl_yaml("axolotl_sft.yml", tiny_llama_dir, work, **overrides))


@pytest.fixture(scope="module")
def qlora(tiny_llama_dir, work, fresh) -> tuple[Path, str]:
    config = axolotl_yaml("axolotl_qlora.yml", tiny_llama_dir, work, output_dir=str(work / "qlora"))
    return work / "qlora", axolotl_train(config)


@pytest.fixture(scope="module")
def dpo(tiny_llama_dir, work, fresh) -> tuple[Path, str]:
    config = axolotl_yaml("axolotl_dpo.yml", tiny_llama_dir, work, output_dir=str(work / "dpo"))
    return work / "dpo", axolotl_train(config)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_model(base_dir: Path, checkpoint: Path):
    """The model training ran: original base minus the offsets recorded in its last checkpoint, plus its raw
    adapter (an oracle independent of the conversion at train end)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), checkpoint)
    restore_offsets(model, load_record(checkpoint))
    return model.eval()


def test_fresh_run_initializes_every_layer_and_writes_report(fresh):
    out, log = fresh
    summary = [line for line in fisher_lines(log) if "directions from empirical Fisher" in line]
    assert len(summary) == 1, fisher_lines(log)
    assert "natural directions" in summary[0] and " tokens in 4 batches" in summary[0]
    report = json.loads((out / "fisher_init_report.json").read_text())
    assert report["selector"] == "natural" and report["policy"] == "preserve"
    assert report["num_tokens"] > 0 and len(report["layers"]) == LAYERS
    assert all(layer["num_tokens"] > 0 and layer["top_scores"] for layer in report["layers"].values())
    assert "'train_loss'" in log


def test_rank_budget_sets_peft_rank_pattern(fresh):
    out, _ = fresh
    raw = PeftConfig.from_pretrained(out / "checkpoint-4")
    ranks = raw.rank_pattern
    assert len(ranks) == LAYERS and sum(ranks.values()) == BUDGET and len(set(ranks.values())) > 1
    weights = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    for name, r in ranks.items():
        (key,) = [k for k in weights if k.endswith(f"{name}.lora_A.weight")]
        assert weights[key].shape[0] == r


def test_checkpoints_carry_the_base_offsets(fresh):
    out, _ = fresh
    for step in (2, 4):
        record = load_record(out / f"checkpoint-{step}")
        assert record is not None and len(record.offsets) == LAYERS


def test_saved_adapter_reproduces_trained_model_on_original_base(fresh, tiny_llama_dir):
    out, _ = fresh
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = logits(trained_model(tiny_llama_dir, out / "checkpoint-4"), ids)
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    torch.testing.assert_close(logits(exported, ids), expected, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert not torch.allclose(logits(base, ids), expected, atol=1e-4)  # training changed the model
    assert load_record(out) is None and not (out / "fisher_raw").exists()  # the plain save is the export


def test_same_seed_gives_same_adapter(fresh, fresh_again):
    first = load_file(fresh[0] / "checkpoint-2" / "adapter_model.safetensors")
    second = load_file(fresh_again / "checkpoint-2" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    report = json.loads((fresh[0] / "fisher_init_report.json").read_text())
    assert report["layers"] == json.loads((fresh_again / "fisher_init_report.json").read_text())["layers"]


def test_resume_restores_offsets_and_does_not_reinitialize(fresh, resumed, tiny_llama_dir):
    out, log = resumed
    lines = fisher_lines(log)
    assert any("resuming from" in line and "not re-initializing" in line for line in lines), lines
    assert not any("directions from" in line for line in lines)
    assert not (out / "fisher_init_report.json").exists()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    continued = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    uninterrupted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), fresh[0]).eval()
    torch.testing.assert_close(logits(continued, ids), logits(uninterrupted, ids), rtol=1e-4, atol=1e-4)


def test_resuming_from_a_checkpoint_without_its_base_offsets_is_refused(tiny_llama_dir, work, fresh):
    """`checkpoint-2` copied without `fisher_init.safetensors`: the preserve run's adapter was trained against the
    changed base; resumed on the original one it would be a different model, so the run stops with one line."""
    out = work / "resumed-without-record"
    shutil.copytree(fresh[0] / "checkpoint-2", out / "checkpoint-2", ignore=shutil.ignore_patterns(RECORD_FILE))
    overrides = {**FRESH, "output_dir": str(out), "auto_resume_from_checkpoints": True}
    log = axolotl_train(axolotl_yaml("axolotl_sft.yml", tiny_llama_dir, work, **overrides), ok=False)
    assert "resuming a `preserve` run from" in log and "no fisher_init.safetensors" in log, log[-3000:]
    assert "'train_loss'" not in log


def test_qlora_default_policy_leaves_the_4bit_base_untouched(qlora):
    out, log = qlora
    report = json.loads((out / "fisher_init_report.json").read_text())
    assert report["policy"] == "zero" and len(report["layers"]) == LAYERS
    # the default's keep mode stays off on a 4-bit base (untested there; greedy generation failed in bitsandbytes)
    assert report["keep_knowledge"] is False and report["keep_why"].startswith("untested on a bnb-4bit base")
    assert load_record(out) is None  # the base is untouched: no offsets travel with the adapter
    assert "'train_loss'" in log


def test_qlora_with_preserve_is_refused_before_the_pass(tiny_llama_dir, work):
    out = work / "qlora-preserve"
    config = axolotl_yaml("axolotl_qlora.yml", tiny_llama_dir, work, output_dir=str(out), fisher_policy="preserve")
    log = axolotl_train(config, ok=False)
    assert "its weight is quantized (bnb-4bit) and cannot be written; use policy='zero'" in log
    assert not any("directions from" in line for line in fisher_lines(log))
    assert not (out / "adapter_config.json").exists()


def test_bad_fisher_key_fails_validation_naming_it(tiny_llama_dir, work):
    config = axolotl_yaml("axolotl_sft.yml", tiny_llama_dir, work, output_dir=str(work / "bad"), fisher_num_batches=0)
    log = axolotl_train(config, ok=False)
    assert "fisher_num_batches" in log and "greater than or equal to 1" in log
    assert not (work / "bad" / "adapter_config.json").exists()


def test_dpo_initializes_from_dpo_loss_with_the_base_untouched(dpo, tiny_llama_dir):
    """DPO's reference is the adapter-disabled model, so the policy is `zero` and the plain save is the adapter
    (its reference staying the original model at lr 0 is tested in test_trainer_glue.py)."""
    out, log = dpo
    assert any("directions from empirical Fisher (zero)" in line for line in fisher_lines(log)), fisher_lines(log)
    assert len(json.loads((out / "fisher_init_report.json").read_text())["layers"]) == LAYERS
    assert load_record(out) is None
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    trained = load_file(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # it trained from B = 0
    PeftModel.from_pretrained(base, out)  # loads on the original base


def test_dpo_with_fisher_keep_knowledge_generates_keep_data_with_axolotls_tokenizer(tiny_llama_dir, work):
    """`fisher_keep_knowledge: true` on DPO: the plugin hands the trainer's tokenizer through; the keep data are the
    model's own answers (scored by cross-entropy, not the DPO loss) and the policy stays `zero`."""
    out = work / "dpo-keep"
    config = axolotl_yaml("axolotl_dpo.yml", tiny_llama_dir, work, output_dir=str(out), fisher_keep_knowledge=True)
    lines = fisher_lines(axolotl_train(config))
    assert any("Fisher (zero) relative to the keep data's Fisher on 14 layers" in line for line in lines), lines
    assert json.loads((out / "fisher_init_report.json").read_text())["keep_knowledge"] is True
