"""`FisherLoRAPlugin`: `lora_init: fisher` in an Axolotl YAML (docs/axolotl.md).

Where each step happens in Axolotl's flow:

- `pre_lora_load`: seed, so two fresh runs build the same PEFT model.
- `get_lora_config_kwargs`: when resuming, the checkpoint's `rank_pattern` (a `fisher_rank_budget`
  run has per-layer ranks the YAML alone does not give).
- `post_trainer_create`: the PeftModel, the trainer's train dataloader (its real collator) and its
  own loss exist, the optimizer does not yet. First the refusals that need no statistics
  (`fisher_trainer.check_before_work`). Fresh run: `fisher_trainer.initialize_in_trainer` on the model's
  active adapter, with Axolotl's fused LoRA kernels routed around (see `kernels`), then the JSON report
  goes to `output_dir`. Resumed run: no initialization; the checkpoint's base offsets are restored.
- checkpoints: each `checkpoint-N/` keeps the raw adapter and gets `fisher_init.safetensors`.
- when training ends (before Axolotl's final save): where the base was changed (policy `preserve`), the
  model becomes the original base plus an adapter for it, so `output_dir` gets an adapter that loads with
  plain PEFT on the original base (`fisher_trainer.OriginalBaseAtTrainEnd`).
- `post_lora_merge` (Axolotl >= 0.21, after `axolotl merge-lora`): a merged adapter whose base fisher-lora
  changed is not the trained model; the command is stopped with what to run instead.

Every decision (which objectives allow policy `preserve`, opted into — not DPO/IPO without
`rl_adapter_ref_model`, whose reference is the adapter-disabled model; KTO/ORPO/SimPO are refused —,
the summed loss, what the pass leaves untouched, checkpoint records, resume) is the shared trainer
glue's (`fisher_trainer`), the same as the TRL callback's; this module maps Axolotl's hooks onto it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger
from transformers import set_seed

from fisher_axolotl.args import fisher_config
from fisher_axolotl.kernels import plain_lora_forward
from fisher_core.write import load_record
from fisher_trainer import (
    add_save_callbacks,
    check_before_work,
    initialize_in_trainer,
    resume,
    trainer_adapter,
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
        config = fisher_config(cfg)
        check_before_work(trainer, config)
        model = trainer.model
        adapter = trainer_adapter(model)
        add_save_callbacks(trainer, lambda: model, adapter)
        checkpoint = resume_checkpoint(cfg)
        if checkpoint is not None:
            LOG.info(f"fisher-lora: {resume(model, checkpoint, adapter, policy=config.policy)}")
            return
        with plain_lora_forward(model) as undone:
            if undone:
                LOG.info(f"fisher-lora: {undone} fused LoRA kernels bypassed during the statistics pass")
            report = initialize_in_trainer(trainer, model, config, adapter)
        if report is None:
            return
        LOG.info(report.summary())
        if trainer.accelerator.is_main_process:
            path = report.save(Path(cfg.output_dir) / REPORT_FILE)
            LOG.info(f"fisher-lora: per-layer report written to {path}")

    def post_lora_merge(self, cfg, adapter_path, output_path):
        """Axolotl >= 0.21 calls this after `axolotl merge-lora` saved the merge. A raw adapter trained on a base
        fisher-lora changed (a `checkpoint-N/` of a `preserve` run, or a sharded run's `output_dir`: its
        `fisher_init.safetensors` records base offsets) merged onto the original base is NOT the trained model:
        stop the command, saying so and what to run instead. Axolotl 0.19 has no such hook."""
        if not enabled(cfg):
            return
        record = load_record(Path(adapter_path))
        if record is not None and record.changes_base:
            raise ValueError(
                f"fisher-lora: {adapter_path} was trained on a changed base (its fisher_init.safetensors records "
                f"base offsets), so the merge in {output_path} is not the trained model; delete it, run "
                f"`fisher-lora export --model {cfg.get('base_model')} --adapter {adapter_path} --out DIR` and merge "
                "DIR (an adapter for the original base) instead"
            )
