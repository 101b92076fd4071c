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
- `trainer.save_model()` (the final, non-internal save): the raw adapter moves to `fisher_raw/` and an
  adapter for the ORIGINAL base (`fisher_core.export_adapter`) takes its place; a sharded model keeps
  the raw adapter and its record, and the log names the offline `fisher-lora export` command.

DPO: its reference is the adapter-disabled model, which `preserve` would change; unless the trainer has
a separate `ref_model` or precomputed reference log-probs, the policy becomes `zero` (logged), and an
explicit `policy='preserve'` is refused.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fisher_core import FisherConfig, InitReport, initialize
from fisher_core.estimate.objective import LogitsFn, LossFn
from fisher_core.write import get_record, load_record, restore_offsets, save_record
from fisher_core.write.export import replace_with_export
from fisher_trl.objectives import policy_logits, reference_is_adapter_disabled, trainer_bookkeeping, trainer_loss_fn

logger = logging.getLogger("fisher_trl")


class FisherInitCallback(TrainerCallback):
    """Initialize LoRA adapter `adapter_name` from Fisher statistics of the trainer's own data and objective.

    Keywords: any `FisherConfig` field (`num_batches=32`, `selector='natural'`, `fisher_type='true'`, …),
    plus `loss_fn`/`logits_fn` to override the objective (contracts in `fisher_core.estimate.objective`)
    and `report_path` to write the `InitReport` as JSON. Use `FisherInitCallback(...).attach(trainer)`.
    """

    def __init__(
        self,
        *,
        adapter_name: str = "default",
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
        """Give the callback its trainer, register it, and make the final `save_model` export for the original base."""
        self.trainer = trainer
        trainer.add_callback(self)
        save_model = trainer.save_model

        def save_and_export(output_dir: str | None = None, _internal_call: bool = False) -> None:
            save_model(output_dir, _internal_call)
            if not _internal_call:
                self.export_final(Path(output_dir or trainer.args.output_dir))

        trainer.save_model = save_and_export
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
            self._resume(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", state.global_step)
            return
        trainer = self._trainer()
        config = self._config_for(trainer)
        loss_fn = self.loss_fn or (trainer_loss_fn(trainer) if config.fisher_type == "empirical" else None)
        with rng_preserved(), trainer_bookkeeping(trainer), trainer.compute_loss_context_manager():
            self.report = initialize(
                self.model,
                trainer.get_train_dataloader(),
                loss_fn=loss_fn,
                logits_fn=self.logits_fn or policy_logits,
                config=config,
                adapter_name=self.adapter_name,
            )
        refresh_master_weights(trainer)
        if self.report_path is not None and state.is_world_process_zero:
            self.report.save(self.report_path)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        record = get_record(self.model, self.adapter_name)
        if record is not None and record.changes_base and state.is_world_process_zero:
            save_record(record, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def export_final(self, output_dir: Path) -> None:
        """Put an adapter for the original base in `output_dir`; the raw adapter and the record go to fisher_raw/
        (`fisher_core.write.export.replace_with_export`)."""
        if self._trainer().args.should_save:
            replace_with_export(self.model, output_dir, self.adapter_name)

    def _resume(self, checkpoint: Path, step: int) -> None:
        record = load_record(checkpoint) if checkpoint.is_dir() else None
        if record is not None and record.changes_base:
            restore_offsets(self.model, record, self.adapter_name)
            what = (
                f"restored the base offsets of {sum(1 for o in record.offsets.values() if o)} layers from {checkpoint}"
            )
        elif checkpoint.is_dir():
            what = f"{checkpoint} records no base offsets (policy zero), nothing to restore"
        else:
            raise FileNotFoundError(
                f"resumed at step {step} but {checkpoint} does not exist: fisher-lora needs the checkpoint's "
                "fisher_init.safetensors; resume from a checkpoint under args.output_dir"
            )
        logger.info("fisher-lora: resumed at step %d, not re-initializing; %s", step, what)

    def _config_for(self, trainer: Trainer) -> FisherConfig:
        config = self.config
        if config.policy != "preserve" or not reference_is_adapter_disabled(trainer):
            return config
        if "policy" in config.model_fields_set:
            raise ValueError(
                f"{type(trainer).__name__} computes its reference with the adapter disabled; policy='preserve' would "
                "change that reference. Use policy='zero', pass a separate ref_model, or set "
                "precompute_ref_log_probs=True"
            )
        logger.warning(
            "fisher-lora: %s uses the adapter-disabled model as its reference, which policy 'preserve' would change; "
            "using policy 'zero'",
            type(trainer).__name__,
        )
        return config.model_copy(update={"policy": "zero"})

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


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Run without consuming the training run's randomness (python, numpy, torch CPU and CUDA)."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
