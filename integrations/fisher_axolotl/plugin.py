"""`FisherLoRAPlugin`: `lora_init: fisher` in an Axolotl YAML (docs/axolotl.md).

Where each step happens in Axolotl's flow:

- `pre_lora_load`: seed, so two fresh runs build the same PEFT model.
- `get_lora_config_kwargs`: when resuming, the checkpoint's `rank_pattern` (a `fisher_rank_budget`
  run has per-layer ranks the YAML alone does not give).
- `post_trainer_create`: the PeftModel, the trainer's train dataloader (its real collator) and its
  own loss exist, the optimizer does not yet. Fresh run: `fisher_core.initialize` with Axolotl's
  fused LoRA kernels routed around (see `kernels`), then the JSON report goes to `output_dir`.
  Resumed run: no initialization; the base offsets recorded in the checkpoint are restored.
- checkpoints: each `checkpoint-N/` keeps the raw adapter and gets `fisher_init.safetensors`.
- when training ends (before Axolotl's final save): where the base was changed (policy `preserve`), the
  model becomes the original base plus an adapter for it, so `output_dir` gets an adapter that loads with
  plain PEFT on the original base (`fisher_trainer.OriginalBaseAtTrainEnd`).

Every decision (which objectives allow policy `preserve`, opted into — not DPO/IPO without
`rl_adapter_ref_model`, whose reference is the adapter-disabled model; KTO/ORPO/SimPO are refused —,
the summed loss, what the pass leaves untouched, checkpoint records, resume) is the shared trainer
glue's (`fisher_trainer`), the same as the TRL callback's; this module maps Axolotl's hooks onto it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger
from transformers import set_seed

from fisher_axolotl.args import fisher_config
from fisher_axolotl.kernels import plain_lora_forward
from fisher_core import initialize
from fisher_core.layers import layer_kind
from fisher_core.write.peft import lora_layers
from fisher_trainer import (
    OriginalBaseAtTrainEnd,
    RecordInCheckpoints,
    check_objective,
    check_step0_policy,
    policy_logits,
    resume,
    summed_loss_fn,
    trainer_state_preserved,
)

LOG = get_logger("axolotl.integrations.fisher_lora")
REPORT_FILE = "fisher_init_report.json"


def enabled(cfg: Any) -> bool:
    return cfg.get("lora_init") == "fisher"


def resume_checkpoint(cfg: Any) -> Path | None:
    """The checkpoint this run resumes from (what Axolotl's determine_last_checkpoint will pick), or None."""
    if cfg.get("resume_from_checkpoint"):
        return Path(cfg["resume_from_checkpoint"])
    if cfg.get("auto_resume_from_checkpoints"):
        found = [p for p in Path(cfg["output_dir"]).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        if found:
            return max(found, key=lambda p: int(p.name.split("-")[-1]))
    return None


def unwritable_base(cfg: Any, model: torch.nn.Module) -> str | None:
    """Why the base weights cannot be written (quantized layers, QLoRA), or None when they can."""
    kinds = {layer_kind(m).name for m in lora_layers(model, "default").values() if not layer_kind(m).writable}
    if kinds:
        return f"{', '.join(sorted(kinds))} layers"
    if cfg.get("adapter") == "qlora" or cfg.get("load_in_4bit") or cfg.get("load_in_8bit"):
        return "a quantized base"
    return None


class FisherLoRAPlugin(BasePlugin):
    """Initializes Axolotl's LoRA/QLoRA adapter from Fisher statistics of the training data."""

    def get_input_args(self) -> str:
        return "fisher_axolotl.args.FisherArgs"

    def pre_lora_load(self, cfg, model):
        if enabled(cfg):
            set_seed(cfg.seed if cfg.seed is not None else fisher_config(cfg).seed)

    def get_lora_config_kwargs(self, cfg) -> dict:
        checkpoint = resume_checkpoint(cfg) if enabled(cfg) else None
        if checkpoint is None or not (checkpoint / "adapter_config.json").exists():
            return {}
        from peft import PeftConfig

        saved = PeftConfig.from_pretrained(str(checkpoint))
        patterns = {k: getattr(saved, k) for k in ("rank_pattern", "alpha_pattern") if getattr(saved, k, None)}
        if patterns:
            LOG.info(f"fisher-lora: per-layer ranks from {checkpoint} ({len(saved.rank_pattern)} layers)")
        return patterns

    def post_trainer_create(self, cfg, trainer):
        if not enabled(cfg):
            return
        check_objective(trainer)
        if (
            trainer.train_dataset is not None
            and hasattr(trainer.train_dataset, "__len__")
            and not len(trainer.train_dataset)
        ):
            raise ValueError(
                "fisher-lora: the training set is empty after Axolotl's preprocessing (rows longer than "
                f"sequence_len={cfg.get('sequence_len')} are dropped, and so are rows without a trainable token); "
                "raise sequence_len or check the dataset's fields"
            )
        model = trainer.model
        trainer.add_callback(RecordInCheckpoints(lambda: model))
        trainer.add_callback(OriginalBaseAtTrainEnd(trainer, lambda: model))
        checkpoint = resume_checkpoint(cfg)
        if checkpoint is not None:
            LOG.info(f"fisher-lora: {resume(model, checkpoint)}")
            return
        config = fisher_config(cfg)
        check_step0_policy(config, trainer, unwritable_base(cfg, model) if config.policy == "preserve" else None)
        loss_fn = summed_loss_fn(trainer) if config.fisher_type == "empirical" else None
        with plain_lora_forward(model) as undone, trainer_state_preserved(trainer):
            if undone:
                LOG.info(f"fisher-lora: {undone} fused LoRA kernels bypassed during the statistics pass")
            batches = trainer.get_train_dataloader()
            report = initialize(
                model, batches, loss_fn=loss_fn, logits_fn=policy_logits, config=config,
                tokenizer=trainer.processing_class,  # keep_knowledge: reads fisher_keep_data or generates keep data
            )  # fmt: skip
        LOG.info(report.summary())
        if trainer.accelerator.is_main_process:
            path = report.save(Path(cfg.output_dir) / REPORT_FILE)
            LOG.info(f"fisher-lora: per-layer report written to {path}")
