"""`FisherInitCallback`: Fisher-initialize the LoRA adapter of a `transformers.Trainer` (TRL's `SFTTrainer`,
`DPOTrainer`, or a plain `Trainer` with a PEFT model) when training begins.

What runs where:
- `on_train_begin` (fresh run): `fisher_core.initialize` on the trainer's PEFT model (unwrapped; the root
  wrapper under FSDP1), over
  `trainer.get_train_dataloader()` batches, with the trainer's own objective made a sum (`empirical`) or
  the policy's logits at completion positions (`true`). The optimizer already holds the LoRA
  Parameters; `apply` copies into them in place, so training starts from the written values. Under
  DDP every rank runs the same pass: statistics are all-reduced, selection is deterministic, so all
  ranks write the same adapter. DeepSpeed's fp32 master copies are refreshed from the written adapter.
  Random states, the trainer's metrics and `.grad` are left as they were.
- `on_train_begin` (resumed run, `global_step > 0`): no re-initialization; the base offsets saved in
  the checkpoint (`fisher_init.safetensors`) are subtracted from the freshly loaded original base.
- `on_save`: the offsets record goes next to each checkpoint's raw adapter.
- `on_train_end` (under `preserve` only): the model becomes the ORIGINAL base plus an adapter for it
  (rank ≤ 2r, scale 1), so `trainer.save_model()` afterwards ships an adapter for the original base; a
  sharded model keeps the raw adapter, its record goes to `output_dir`, and the log names the offline
  `fisher-lora export` command. No method of the trainer's is replaced.

The decisions (policy per objective, the summed loss, what the pass leaves untouched, checkpoints, resume,
export) are the shared trainer glue's (`fisher_trainer`), the same as Axolotl's; this module maps TRL's
hooks onto them. Policy `preserve` (opted into; the default is `zero`) is refused for DPO/IPO without a
separate `ref_model` (their reference is the adapter-disabled model); KTO, ORPO, CPO and the online
trainers are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fisher_core import FisherConfig, InitReport
from fisher_core.estimate.objective import LogitsFn, LossFn
from fisher_trainer import (
    add_save_callbacks,
    check_before_work,
    initialize_in_trainer,
    resume,
    trainer_adapter,
)

logger = logging.getLogger("fisher_trl")


class FisherInitCallback(TrainerCallback):
    """Initialize LoRA adapter `adapter_name` from Fisher statistics of the trainer's own data and objective.

    Keywords: any `FisherConfig` field (`num_batches=32`, `selector='natural'`, `fisher_type='true'`, …),
    plus `loss_fn`/`logits_fn` to override the objective (contracts in `fisher_core.estimate.objective`)
    and `report_path` to write the `InitReport` as JSON. `adapter_name` defaults to the PEFT model's active
    adapter. Use `FisherInitCallback(...).attach(trainer)`.
    """

    def __init__(
        self,
        *,
        adapter_name: str | None = None,
        loss_fn: LossFn | None = None,
        logits_fn: LogitsFn | None = None,
        report_path: str | Path | None = None,
        **fisher_options,
    ) -> None:
        self.config = FisherConfig(**fisher_options)
        if self.config.rank_budget is not None:
            raise ValueError(
                "rank_budget resizes LoRA layers, but when training begins the optimizer (and DDP) already hold "
                "them. Initialize before building the trainer: fisher_core.initialize(peft_model, batches, "
                "config=FisherConfig(rank_budget=...)), then pass that PeftModel to the trainer without the callback"
            )
        self.adapter_name = adapter_name
        self.loss_fn, self.logits_fn = loss_fn, logits_fn
        self.report_path = Path(report_path) if report_path is not None else None
        self.trainer: Trainer | None = None
        self.report: InitReport | None = None

    def attach(self, trainer: Trainer) -> FisherInitCallback:
        """Give the callback its trainer and register it: checkpoints carry the base offsets, and where the init
        changed the base (`preserve`, `force`), the model is handed back on the original base when training
        ends (`fisher_trainer.OriginalBaseAtTrainEnd`). Nothing of the trainer's is replaced. What can be refused
        without statistics is refused here (`fisher_trainer.check_before_work`), before `train()`."""
        check_before_work(trainer, self.config, objective_replaced=self.loss_fn is not None)
        self.trainer = trainer
        self.adapter_name = self.adapter_name or trainer_adapter(self.model)
        trainer.add_callback(self)
        add_save_callbacks(trainer, lambda: self.model, self.adapter_name)
        return self

    @property
    def model(self) -> nn.Module:
        """The PEFT model `initialize` runs on: the unwrapped one (DDP, DeepSpeed, FSDP2 shard in place),
        except under FSDP1, whose passes must go through the root `FullyShardedDataParallel` wrapper."""
        trainer = self._trainer()
        if isinstance(trainer.model_wrapped, FullyShardedDataParallel):
            return trainer.model_wrapped
        return trainer.accelerator.unwrap_model(trainer.model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if state.global_step > 0:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            done = resume(
                self.model, checkpoint, self.adapter_name, policy=self.config.policy, log_history=state.log_history
            )
            logger.info("fisher-lora: %s", done)
            return
        trainer = self._trainer()
        report = initialize_in_trainer(
            trainer, self.model, self.config, self.adapter_name, loss_fn=self.loss_fn, logits_fn=self.logits_fn
        )
        if report is None:  # a second train() continues from the trained adapter
            return
        self.report = report
        refresh_master_weights(trainer)
        if self.report_path is not None and state.is_world_process_zero:
            self.report.save(self.report_path)

    def _trainer(self) -> Trainer:
        if self.trainer is None:
            raise RuntimeError(
                "FisherInitCallback has no trainer: register it with FisherInitCallback(...).attach(trainer)"
            )
        return self.trainer


def refresh_master_weights(trainer: Trainer) -> None:
    """DeepSpeed's optimizers keep fp32 master copies of the trainable parameters (ZeRO stages 1-3, bf16/fp16)
    and write them back into the model at every step: copy the adapter just written into them, or the first
    step would restore the adapter it replaced."""
    optimizer = getattr(trainer.model_wrapped, "optimizer", None) if trainer.is_deepspeed_enabled else None
    if optimizer is not None and hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()
