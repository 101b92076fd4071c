"""The trainer glue (see the package docstring): policy, objective, state protection, checkpoints, export.

- `check_step0_policy`: `preserve` (opted into; the default is `zero`) changes the base weights
  (W ← W − s·B·A). That is refused, with what to change, where the trainer's reference IS the base — a
  preference trainer whose reference model is this model with its adapter disabled (DPO/IPO without a
  separate `ref_model` or precomputed reference log-probs): there `preserve` would move the reference.
  (A base that cannot be written, quantized layers, is `fisher_core.initialize`'s refusal, before its pass.)
- `check_objective`: objectives fisher-lora cannot turn into a per-batch sum (KTO, ORPO, CPO/SimPO,
  GRPO, RLOO, reward models) are refused before any work, with what to change.
- `summed_loss_fn`: the trainer's own `compute_loss`, made a SUM over the batch's units — token losses
  via `num_items_in_batch=1` (the data-parallel averaging factor divided out), DPO's pair mean times the
  number of pairs, or a mean over supervised tokens times their count.
- `trainer_state_preserved`: the statistics pass leaves the trainer's metric stores, token counters and
  every random state (python, numpy, torch CPU and CUDA) as they were.
- `RecordInCheckpoints`, `resume`, `OriginalBaseAtTrainEnd`: each checkpoint carries the base offsets; a
  resumed run restores them instead of re-initializing; when training ends the model becomes the ORIGINAL
  base plus an adapter for it, so the final save needs nothing of ours. `add_save_callbacks` registers the
  two callbacks ahead of the trainer's own (its reporters), so what they upload is already right.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from fisher_core import FisherConfig
from fisher_core.estimate.distributed import global_max, global_min
from fisher_core.estimate.objective import IGNORE_INDEX, Batch, LossFn
from fisher_core.sharded import sharding
from fisher_core.write import get_record, load_record, restore_offsets, save_record, to_original_base
from fisher_core.write.export import record_for_offline_export
from fisher_core.write.record import InitRecord

logger = logging.getLogger("fisher_trainer")
# Trainer attributes that `compute_loss` appends metrics or token counts to (transformers, Axolotl, TRL).
METRIC_ATTRS = ("_metrics", "_stored_metrics", "_total_train_tokens")
# Batch keys that are not model inputs (labels and the preference trainers' bookkeeping).
NON_MODEL_KEYS = frozenset({"labels", "completion_mask", "ref_chosen_logps", "ref_rejected_logps", "assistant_masks"})
# Objectives whose loss is not a sum of per-batch terms fisher-lora can form, by trainer class name.
UNSUPPORTED = {
    "KTOTrainer": "KTO",
    "ORPOTrainer": "ORPO",
    "CPOTrainer": "CPO/SimPO",
    "GRPOTrainer": "GRPO",
    "RLOOTrainer": "RLOO",
    "OnlineDPOTrainer": "online DPO",
    "RewardTrainer": "reward modelling",
    "PRMTrainer": "process reward modelling",
}


def _classes(trainer: Any) -> set[str]:
    return {cls.__name__ for cls in type(trainer).__mro__}


def is_pair_trainer(trainer: Any) -> bool:
    """DPO (and IPO, its `loss_type`): batches of [chosen; rejected] rows, a loss averaged over pairs."""
    return "DPOTrainer" in _classes(trainer) and "OnlineDPOTrainer" not in _classes(trainer)


def check_objective(trainer: Any) -> None:
    """Refuse, with what to change, a trainer whose objective fisher-lora does not support."""
    found = sorted(UNSUPPORTED[name] for name in _classes(trainer) & set(UNSUPPORTED))
    if found:
        raise ValueError(
            f"fisher-lora does not support {found[0]} ({type(trainer).__name__}): its loss is not a sum of per-example "
            "terms the statistics can be taken of. Supported: SFT / causal-LM losses and DPO/IPO; for this run leave "
            "the LoRA init at PEFT's default"
        )


def reference_is_adapter_disabled(trainer: Any) -> bool:
    """True when the trainer's reference model is this model with the adapter disabled (no separate `ref_model`,
    no precomputed reference log-probs), so writing the base would move the reference."""
    if not hasattr(trainer, "ref_model"):
        return False
    precomputed = getattr(trainer, "precompute_ref_logps", None)
    if precomputed is None:
        precomputed = getattr(getattr(trainer, "args", None), "precompute_ref_log_probs", False)
    return trainer.ref_model is None and not precomputed


def check_step0_policy(config: FisherConfig, trainer: Any) -> None:
    """Refuse a `preserve` policy whose base write would move this trainer's reference (module docstring)."""
    if config.policy == "preserve" and reference_is_adapter_disabled(trainer):
        raise ValueError(
            f"fisher-lora: {type(trainer).__name__} computes its reference with the adapter disabled, and policy "
            "'preserve' would change that reference; use policy 'zero', pass a separate reference model, or "
            "precompute the reference log-probs"
        )


def summed_loss_fn(trainer: Any) -> LossFn:
    """`loss_fn(model, batch)`: the trainer's `compute_loss` made a sum over the batch (module docstring). The
    objective is assumed supported (`check_objective`, which `run.check_before_work` calls once)."""
    if is_pair_trainer(trainer):
        return lambda model, batch: trainer.compute_loss(model, dict(batch)) * (batch["input_ids"].shape[0] // 2)
    if trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None:
        scale = loss_scale(trainer)
        return lambda model, batch: trainer.compute_loss(model, dict(batch), num_items_in_batch=1) / scale
    return lambda model, batch: trainer.compute_loss(model, dict(batch)) * supervised_tokens(trainer, batch)


def loss_scale(trainer: Any) -> int:
    """The factor `Trainer.compute_loss` multiplies a `num_items_in_batch`-reduced loss by: the number of
    data-parallel processes when tokens are averaged across devices (tensor-parallel ranks share a batch)."""
    if not trainer.args.average_tokens_across_devices:
        return 1
    if trainer.args.n_gpu > 1:
        return trainer.args.n_gpu
    scale = trainer.accelerator.num_processes
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    tp_size = getattr(parallelism, "tp_size", 1) if parallelism is not None else 1
    return scale // max(1, tp_size or 1)


def supervised_tokens(trainer: Any, batch: Batch) -> int:
    """How many next-token losses a mean-reducing causal-LM loss averages over in this batch."""
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.dim() == 2:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    raise ValueError(
        f"{type(trainer).__name__}.compute_loss returns a mean over units fisher-lora cannot count in this batch "
        f"(keys {sorted(batch)}); use a trainer whose loss accepts num_items_in_batch, or pass loss_fn=..."
    )


def policy_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(logits [K, V], next tokens [K]) of a causal LM at the K completion positions of `batch`
    (`labels != -100` for SFT batches, `completion_mask` for preference batches): `fisher_type='true'`."""
    if "labels" in batch:
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
    elif "completion_mask" in batch:
        targets = batch["input_ids"][:, 1:]
        keep = batch["completion_mask"][:, 1:].bool()
    else:
        raise ValueError("the batch has neither 'labels' nor 'completion_mask'; pass logits_fn=...")
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    return logits[keep], targets[keep]


@contextlib.contextmanager
def trainer_state_preserved(trainer: Any) -> Iterator[None]:
    """Inside the block, the trainer's metric stores and token counters and every random state (python, numpy,
    torch CPU and CUDA) may change; on exit they are what they were on entry."""
    saved = {a: copy.deepcopy(getattr(trainer, a)) for a in METRIC_ATTRS if hasattr(trainer, a)}
    had_tokens = hasattr(trainer.state, "tokens")
    tokens = copy.deepcopy(getattr(trainer.state, "tokens", None))
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        for attr, value in saved.items():
            setattr(trainer, attr, value)
        if had_tokens:
            trainer.state.tokens = tokens
        elif hasattr(trainer.state, "tokens"):
            del trainer.state.tokens


class RecordInCheckpoints(TrainerCallback):
    """Writes the base-offset record (`fisher_init.safetensors`) into every checkpoint, for resuming."""

    def __init__(self, model: Callable[[], nn.Module], adapter_name: str = "default") -> None:
        self.model, self.adapter_name = model, adapter_name

    def on_save(self, args, state, control, **kwargs):
        record = get_record(self.model(), self.adapter_name)
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # wherever the trainer writes the checkpoint (`save_on_each_node`: each node's first process), not only
        # on the world's first process: a resume on another node's disk must find the record too
        if args.should_save and record is not None and record.changes_base and checkpoint.is_dir():
            save_record(record, checkpoint)
        return control


def add_save_callbacks(trainer: Any, model: Callable[[], nn.Module], adapter_name: str = "default") -> None:
    """Register `RecordInCheckpoints` and `OriginalBaseAtTrainEnd` AHEAD of every callback the trainer already
    has: `report_to`'s trackers upload a checkpoint in their `on_save` and save the model in their
    `on_train_end` (W&B with `WANDB_LOG_MODEL`); run after ours, they upload the checkpoint with its record
    and, when training ends, the adapter for the original base rather than the raw one."""
    callbacks = trainer.callback_handler.callbacks
    for callback in (OriginalBaseAtTrainEnd(trainer, model, adapter_name), RecordInCheckpoints(model, adapter_name)):
        trainer.add_callback(callback)  # the handler's own duplicate check, then to the front
        callbacks.insert(0, callbacks.pop(callbacks.index(callback)))


def resume(
    model: nn.Module,
    checkpoint: Path,
    adapter_name: str = "default",
    *,
    policy: str = "zero",
    log_history: list[dict] | None = None,
) -> str:
    """A resumed run: subtract the checkpoint's recorded base offsets from the freshly loaded original base
    (no re-initialization). Every process decides alike (one all-reduce), or all of them raise: a checkpoint or
    record on some nodes' disks only would give the processes different bases (or hang a sharded restore). A
    `preserve` run's checkpoint without its record is refused: its adapter was trained against a changed base,
    and on the original one it would silently train a different model. `log_history`, the resumed trainer
    state's, where the caller only guessed `checkpoint` (a callback is not told which one the Trainer resumed):
    a checkpoint whose `trainer_state.json` logged otherwise is another run's, refused. Returns what was done,
    for the log."""
    record, found = _found(checkpoint, log_history)
    least = global_min(found)
    if least == -2:
        raise FileNotFoundError(
            f"fisher-lora: {checkpoint} is not the checkpoint this run resumed (its trainer_state.json logged "
            "another run), and fisher-lora reads its fisher_init.safetensors from there: resume from a "
            "checkpoint under the run's output_dir"
        )
    if least == -1:
        raise FileNotFoundError(
            f"fisher-lora: resuming from {checkpoint}, which does not exist on every process; fisher-lora needs the "
            "checkpoint's fisher_init.safetensors: resume from a checkpoint under the run's output_dir"
        )
    if least != global_max(found):
        raise FileNotFoundError(
            f"fisher-lora: resuming from {checkpoint}: its fisher_init.safetensors (the base offsets) is on some "
            "processes' disks and not on others'; copy it into that checkpoint on every node"
        )
    if not found and policy == "preserve":
        raise FileNotFoundError(
            f"fisher-lora: resuming a `preserve` run from {checkpoint}, which has no fisher_init.safetensors (the "
            "base offsets its adapter was trained against): restore that file into the checkpoint, or resume with "
            "policy zero if the checkpoint comes from a policy-zero run"
        )
    if not found:
        return f"resuming from {checkpoint}, not re-initializing: it records no base offsets (policy zero)"
    restore_offsets(model, record, adapter_name)
    layers = sum(1 for o in record.offsets.values() if o)
    return f"resuming from {checkpoint}, not re-initializing: base offsets of {layers} layers restored"


def _found(checkpoint: Path, log_history: list[dict] | None) -> tuple[InitRecord | None, int]:
    """The checkpoint's record and what this process found: -2 another run's checkpoint (its logged history is
    not `log_history`), -1 no checkpoint, 0 no base offsets, 1 base offsets."""
    if not checkpoint.is_dir():
        return None, -1
    state = checkpoint / TRAINER_STATE_NAME
    if (
        log_history is not None
        and state.is_file()
        and TrainerState.load_from_json(str(state)).log_history != log_history
    ):
        return None, -2
    record = load_record(checkpoint)
    return record, int(record is not None and record.changes_base)


class OriginalBaseAtTrainEnd(TrainerCallback):
    """When training ends, the model whose base the init changed (`preserve`, `force`) becomes the original base
    plus an adapter for it (`fisher_core.to_original_base`): every save after that — `trainer.save_model`,
    `save_pretrained`, `push_to_hub` — ships an adapter that loads on the original base, and nothing of the
    trainer's is replaced. The trainer's optimizer, scheduler and data-parallel wrapper are dropped (they hold
    the reshaped adapter's old Parameters), so a later `train()` builds fresh ones. A sharded model (FSDP,
    ZeRO-3) cannot be reshaped: its record goes to `output_dir` beside the adapter the trainer saves there,
    and the log names the `fisher-lora export` command."""

    def __init__(self, trainer: Any, model: Callable[[], nn.Module], adapter_name: str = "default") -> None:
        self.trainer, self.model, self.adapter_name = trainer, model, adapter_name

    def on_train_end(self, args, state, control, **kwargs):
        model = self.model()
        record = get_record(model, self.adapter_name)
        if record is None or not record.changes_base:
            return control
        if sharding(model) is not None:
            if args.should_save:  # where the trainer saves the adapter
                record_for_offline_export(model, Path(args.output_dir), self.adapter_name)
            return control
        layers = to_original_base(model, self.adapter_name)
        # the optimizer, the scheduler and a DDP/DeepSpeed wrapper hold the reshaped adapter's old Parameters: a
        # later `train()` builds and wraps afresh (how transformers itself resets its wrapping)
        self.trainer.optimizer, self.trainer.lr_scheduler = None, None
        self.trainer.model_wrapped = self.trainer.model
        logger.info(
            "fisher-lora: the model is now the ORIGINAL base plus an adapter for it (%d layers, rank <= 2r, "
            "scale 1): any save of it loads with plain PeftModel.from_pretrained",
            layers,
        )
        return control
