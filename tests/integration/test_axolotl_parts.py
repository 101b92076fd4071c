"""The Axolotl plugin's pieces on real objects, in-process (fast): the YAML args model, the trainer
loss as a summed loss, and the statistics pass on a model patched with Axolotl's fused LoRA kernels."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from tiny import tiny_llama

from fisher_core import FisherConfig, estimate

pytest.importorskip("axolotl")

from fisher_axolotl.args import FisherArgs, fisher_config
from fisher_axolotl.kernels import is_fused_kernel, plain_lora_forward
from fisher_trainer import summed_loss_fn as trainer_loss_fn
from fisher_trainer import trainer_state_preserved as metrics_restored

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(seed: int = 0):
    return get_peft_model(
        tiny_llama(seed), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    )


def token_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_every_fisher_config_field_is_a_yaml_key():
    assert {f"fisher_{n}" for n in FisherConfig.model_fields} | {"lora_init"} == set(FisherArgs.model_fields)


@pytest.mark.parametrize(
    ("key", "value"),
    [("fisher_num_batches", 0), ("fisher_selector", "svd"), ("fisher_damping", -1.0), ("fisher_rank_cap", 0.5)],
)
def test_bad_fisher_value_names_the_key(key, value):
    with pytest.raises(ValidationError, match=key):
        FisherArgs(lora_init="fisher", **{key: value})


def test_yaml_keys_become_fisher_config():
    cfg = {"lora_init": "fisher", "fisher_selector": "subspace", "fisher_num_batches": 8, "fisher_rank_budget": None}
    assert fisher_config(cfg) == FisherConfig(selector="subspace", num_batches=8)


def test_early_stopping_is_turned_off_by_zero_where_null_cannot_be_written():
    """Axolotl drops null keys when it validates the YAML (`model_dump(exclude_none=True)`), so
    `fisher_stop_tol: null` cannot reach the plugin; `0` turns early stopping off there, as `--stop-tol 0` does
    on the command line (both were refused before: stop_tol had to be > 0)."""
    from fisher_core.cli import build_parser
    from fisher_core.cli import fisher_config as cli_config

    assert FisherArgs(lora_init="fisher", fisher_stop_tol=0).fisher_stop_tol == 0
    assert fisher_config({"lora_init": "fisher", "fisher_stop_tol": 0}).stop_tol is None
    args = build_parser().parse_args(["init", "--model", "m", "--data", "d.jsonl", "--out", "o", "--stop-tol", "0"])
    assert cli_config(args).stop_tol is None and FisherConfig(stop_tol=0.0) == FisherConfig(stop_tol=None)
    with pytest.raises(ValidationError, match="stop_tol"):
        FisherConfig(stop_tol=-0.1)


def test_an_unquoted_true_fisher_type_in_yaml_means_the_true_fisher():
    """`fisher_fisher_type: true` reaches the config as YAML's boolean (before: refused, "should be 'empirical'
    or 'true'"); `false` stays refused (it names no Fisher type)."""
    assert fisher_config({"lora_init": "fisher", "fisher_fisher_type": True}).fisher_type == "true"
    assert FisherArgs(lora_init="fisher", fisher_fisher_type=True).fisher_fisher_type in (True, "true")
    with pytest.raises(ValueError, match="fisher_fisher_type"):
        fisher_config({"lora_init": "fisher", "fisher_fisher_type": False})


def trainers():
    from axolotl.core.trainers.base import AxolotlTrainer
    from axolotl.core.training_args import AxolotlTrainingArguments
    from transformers import Trainer, TrainingArguments

    return [(Trainer, TrainingArguments), (AxolotlTrainer, AxolotlTrainingArguments)]


@pytest.mark.parametrize(("trainer_cls", "args_cls"), trainers(), ids=["transformers", "axolotl"])
def test_trainer_loss_fn_returns_summed_token_loss(tmp_path, trainer_cls, args_cls):
    model = lora_llama()
    trainer = trainer_cls(model=model, args=args_cls(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    batch = token_batch()
    logits = model(input_ids=batch["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    with metrics_restored(trainer):
        got = trainer_loss_fn(trainer)(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_statistics_see_layers_behind_fused_lora_kernels():
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches
    from axolotl.utils.dict import DictDefault

    plain, patched = lora_llama(), lora_llama()
    apply_lora_kernel_patches(patched, DictDefault(lora_mlp_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True))
    mlp = patched.base_model.model.model.layers[0].mlp
    assert is_fused_kernel(mlp.__dict__["forward"])  # the kernel bypasses nn.Linear.forward of gate/up/down
    config = FisherConfig(num_batches=1, progress=False)
    expected = estimate(plain, [token_batch()], target_modules=TARGETS, config=config)
    with plain_lora_forward(patched) as undone:
        assert undone > 0
        got = estimate(patched, [token_batch()], target_modules=TARGETS, config=config)
    assert is_fused_kernel(mlp.__dict__["forward"])  # the kernels are back for training
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name].grad_cov, expected[name].grad_cov)
        torch.testing.assert_close(got[name].input_cov, expected[name].input_cov)


def test_metrics_appended_during_statistics_are_removed(tmp_path):
    from axolotl.core.trainers.base import AxolotlTrainer
    from axolotl.core.training_args import AxolotlTrainingArguments

    args = AxolotlTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = AxolotlTrainer(model=lora_llama(), args=args)
    trainer.store_metrics({"kept": 1.0})
    with metrics_restored(trainer):
        trainer.store_metrics({"kept": 2.0, "fisher_pass": 3.0})
        trainer.state.tokens = {"trainable": torch.ones(1)}
    assert set(trainer._stored_metrics["train"]) == {"kept"}
    assert trainer._stored_metrics["train"]["kept"]["values"] == [1.0]
    assert not hasattr(trainer.state, "tokens")


# BasePlugin.post_lora_merge as read in Axolotl 0.21.0's axolotl/integrations/base.py (docs/axolotl.md); 0.19 lacks it
POST_LORA_MERGE_0_21 = ["self", "cfg", "adapter_path", "output_path"]


def test_the_plugin_defines_only_axolotl_hooks_with_their_parameters():
    import inspect

    from axolotl.integrations.base import BasePlugin

    from fisher_axolotl import FisherLoRAPlugin

    def parameters(fn) -> list[str]:
        return list(inspect.signature(fn).parameters)

    ours = {name for name, value in vars(FisherLoRAPlugin).items() if callable(value) and not name.startswith("_")}
    for name in ours - {"post_lora_merge"}:
        assert parameters(getattr(FisherLoRAPlugin, name)) == parameters(getattr(BasePlugin, name)), name
    assert parameters(FisherLoRAPlugin.post_lora_merge) == POST_LORA_MERGE_0_21
    if hasattr(BasePlugin, "post_lora_merge"):  # Axolotl >= 0.21
        assert parameters(BasePlugin.post_lora_merge) == POST_LORA_MERGE_0_21


def test_merging_an_adapter_trained_on_a_changed_base_is_stopped(tmp_path):
    """`axolotl merge-lora` (>= 0.21 calls `post_lora_merge` after saving the merge) of a `preserve` checkpoint:
    its raw adapter plus the original base is not the trained model, so the command stops, saying what to run."""
    from axolotl.utils.dict import DictDefault

    from fisher_axolotl import FisherLoRAPlugin
    from fisher_core import initialize
    from fisher_core.write import get_record, save_record

    cfg = DictDefault({"lora_init": "fisher", "base_model": "/models/base"})
    plugin = FisherLoRAPlugin()
    for policy in ("zero", "preserve"):
        model = lora_llama()
        initialize(model, [token_batch()], config=FisherConfig(num_batches=1, progress=False, policy=policy))
        save_record(get_record(model, "default"), tmp_path / policy)
    plugin.post_lora_merge(cfg, str(tmp_path / "zero"), str(tmp_path / "merged"))  # base untouched: a plain merge
    plugin.post_lora_merge(cfg, str(tmp_path / "no-record"), str(tmp_path / "merged"))
    with pytest.raises(ValueError, match=r"not the trained model.*fisher-lora export --model /models/base"):
        plugin.post_lora_merge(cfg, str(tmp_path / "preserve"), str(tmp_path / "merged"))
