"""Writing into PEFT: step-0 outputs, export round trips, determinism, trained adapters, resume."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from fisher_core import FisherConfig, export_adapter, initialize, to_original_base
from fisher_core.write import get_record, load_record, restore_offsets, save_record

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(n: int = 8, t: int = 12, batch_size: int = 4, vocab: int = 384) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": mask[i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, n, batch_size)
    ]


def _cfg(**kw) -> FisherConfig:
    return FisherConfig(progress=False, num_batches=2, **kw)


def _peft(model=None, **kw):
    return get_peft_model(model or tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train(model, batches, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("selector", ["select", "fwsvd", "natural", "subspace"])
def test_preserve_keeps_logits(selector):
    batches = _batches()
    reference = _logits(tiny_llama(), batches[0])
    model = _peft()
    initialize(model, batches, config=_cfg(selector=selector, policy="preserve"))
    assert (_logits(model, batches[0]) - reference).abs().max() <= 1e-5
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.any()


def test_initialize_and_export_add_no_attribute_to_any_module_of_the_users_model(tmp_path):
    """The record of what `preserve` took out of the base lives beside the model, not in its modules' `__dict__`;
    `export_adapter` still finds it (through a wrapper too: a trainer may hand back its DDP/FSDP wrapper)."""
    model = _peft()
    names = {n: set(vars(m)) for n, m in model.named_modules()}
    initialize(model, _batches(), config=_cfg(policy="preserve"))
    assert {n: set(vars(m)) for n, m in model.named_modules()} == names
    wrapper = torch.nn.Sequential(model)
    assert get_record(wrapper, "default") is get_record(model, "default") is not None
    export_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("policy", ["preserve", "zero"])
def test_exported_adapter_reproduces_the_trained_model_on_the_original_base(policy, tmp_path):
    batches = _batches()
    model = _peft()
    initialize(model, batches, config=_cfg(selector="fwsvd", policy=policy))
    _train(model, batches)
    trained = _logits(model, batches[1])
    export_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert (_logits(loaded, batches[1]) - trained).abs().max() <= 1e-4


@pytest.mark.parametrize("rank_budget", [None, 30])
def test_to_original_base_hands_back_the_original_weights_and_an_adapter_for_them(rank_budget, tmp_path):
    batches = _batches()
    model = _peft(use_rslora=rank_budget is not None)
    initialize(model, batches, config=_cfg(policy="preserve", rank_budget=rank_budget))
    _train(model, batches)
    trained = _logits(model, batches[1])
    assert to_original_base(model) == 5 * 2  # every adapted layer of both blocks
    assert (_logits(model, batches[1]) - trained).abs().max() <= 1e-5  # the same model
    original = tiny_llama().state_dict()
    for name, p in model.named_parameters():
        if "base_layer.weight" in name:  # the offsets are back in: the base is the original, to fp32 rounding
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            torch.testing.assert_close(p, original[key], rtol=0, atol=1e-6)
    assert not get_record(model, "default").changes_base and to_original_base(model) == 0
    model.save_pretrained(tmp_path / "plain")  # a plain save is the export
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")
    assert (_logits(loaded, batches[1]) - trained).abs().max() <= 1e-5
    _train(model, batches, steps=1)  # the reshaped adapter trains on
    assert (_logits(model, batches[1]) - trained).abs().max() > 1e-4


def test_to_original_base_leaves_a_zero_policy_model_alone():
    model = _peft()
    initialize(model, _batches(), config=_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert to_original_base(model) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_two_runs_with_the_same_seed_give_bit_identical_adapters():
    batches = _batches()
    runs = []
    for _ in range(2):
        model = _peft()
        initialize(model, batches, config=_cfg(selector="natural", fisher_type="true", mc_samples=2, seed=7))
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_trained_adapter_is_refused_and_forced_reinit_keeps_the_trained_outputs(tmp_path):
    batches = _batches()
    model = _peft()
    initialize(model, batches, config=_cfg(selector="fwsvd"))
    _train(model, batches)
    trained = _logits(model, batches[0])
    with pytest.raises(RuntimeError, match="force=True"):
        initialize(model, batches, config=_cfg(selector="subspace"))
    assert (_logits(model, batches[0]) - trained).abs().max() == 0  # refused: nothing changed
    initialize(model, batches, config=_cfg(selector="subspace", force=True))
    assert (_logits(model, batches[0]) - trained).abs().max() <= 1e-5
    export_adapter(model, tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert (_logits(loaded, batches[0]) - trained).abs().max() <= 1e-4


def test_resume_restores_the_residual_base_from_the_saved_record(tmp_path):
    batches = _batches()
    model = _peft()
    initialize(model, batches, config=_cfg(selector="fwsvd"))
    _train(model, batches)
    trained = _logits(model, batches[0])
    model.save_pretrained(tmp_path / "ckpt")  # the raw adapter, as a Trainer checkpoint holds it
    save_record(get_record(model, "default"), tmp_path / "ckpt")
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ckpt", is_trainable=True)
    restore_offsets(resumed, load_record(tmp_path / "ckpt"))
    assert (_logits(resumed, batches[0]) - trained).abs().max() <= 1e-5


def test_rank_budget_resizes_adapters_and_the_export_still_loads(tmp_path):
    batches = _batches()
    model = _peft()
    report = initialize(model, batches, config=_cfg(selector="fwsvd", rank_budget=30))
    ranks = {n: layer.rank for n, layer in report.layers.items()}
    assert sum(ranks.values()) == 30 and len(set(ranks.values())) > 1
    assert model.peft_config["default"].rank_pattern == report.rank_pattern
    reference = _logits(tiny_llama(), batches[0])
    assert (_logits(model, batches[0]) - reference).abs().max() <= 1e-5
    _train(model, batches)
    trained = _logits(model, batches[0])
    export_adapter(model, tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert (_logits(loaded, batches[0]) - trained).abs().max() <= 1e-4


def test_conv1d_layers_of_gpt2_are_written_and_exported(tmp_path):
    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()

    batches = _batches()
    reference = _logits(gpt2(), batches[0])
    model = get_peft_model(
        gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    initialize(model, batches, config=_cfg(selector="fwsvd"))
    assert (_logits(model, batches[0]) - reference).abs().max() <= 1e-5
    _train(model, batches)
    trained = _logits(model, batches[0])
    export_adapter(model, tmp_path / "a")
    loaded = PeftModel.from_pretrained(gpt2(), tmp_path / "a")
    assert (_logits(loaded, batches[0]) - trained).abs().max() <= 1e-4


def test_export_never_overwrites_an_existing_adapter(tmp_path):
    model = _peft()
    initialize(model, _batches(), config=_cfg())
    export_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before


def test_non_peft_model_and_unknown_adapter_are_refused_with_what_to_pass():
    with pytest.raises(TypeError, match="get_peft_model"):
        initialize(tiny_llama(), _batches(), config=_cfg())
    with pytest.raises(KeyError, match="adapter_name"):
        initialize(_peft(), _batches(), config=_cfg(), adapter_name="other")
