"""The trainer's own objective as a fisher-lora `loss_fn`: the SUM of the batch's losses.

Trainers whose loss honours `num_items_in_batch` (transformers' causal-LM loss, Axolotl's SFT
trainer) are called with `num_items_in_batch=1`, which turns their token mean into a sum; the
`average_tokens_across_devices` factor (× number of processes) that transformers multiplies in is
divided out again. Trainers that return a mean (TRL's DPO: over preference pairs) are multiplied by
the number of units the mean ran over. Whatever the trainer appends to its metrics while computing
the loss is removed afterwards, so the statistics pass leaves no trace in the training logs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from fisher_core.estimate.objective import IGNORE_INDEX, Batch, LossFn

# Trainer attributes that compute_loss appends metrics to (transformers, Axolotl, TRL).
METRIC_ATTRS = ("_metrics", "_stored_metrics", "_total_train_tokens")


def trainer_loss_fn(trainer: Any) -> LossFn:
    """`loss_fn(model, batch)` returning the summed loss of `trainer.compute_loss`."""
    sums_via_kwargs = bool(trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None)
    device_factor = 1.0
    if sums_via_kwargs and trainer.args.average_tokens_across_devices:
        device_factor = float(trainer.accelerator.num_processes if trainer.args.n_gpu <= 1 else trainer.args.n_gpu)

    def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
        batch = dict(batch)  # compute_loss may pop keys
        if sums_via_kwargs:
            return trainer.compute_loss(model, batch, num_items_in_batch=1) / device_factor
        units = mean_units(trainer, batch)
        return trainer.compute_loss(model, batch) * units

    return loss_fn


def mean_units(trainer: Any, batch: Batch) -> int:
    """How many units a mean-reducing trainer's loss averages over for this batch."""
    if any(cls.__name__ == "DPOTrainer" for cls in type(trainer).__mro__):
        return batch["input_ids"].shape[0] // 2  # chosen and rejected rows are concatenated
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.dim() == 2:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    raise ValueError(
        f"{type(trainer).__name__}.compute_loss returns a mean over units fisher-lora cannot count in this batch "
        f"(keys {sorted(batch)}); use a trainer whose loss accepts num_items_in_batch"
    )


@contextmanager
def metrics_restored(trainer: Any) -> Iterator[None]:
    """Put the trainer's metric stores back as they were when the block exits."""
    saved = {a: copy.deepcopy(getattr(trainer, a)) for a in METRIC_ATTRS if hasattr(trainer, a)}
    tokens = copy.deepcopy(getattr(trainer.state, "tokens", None))
    had_tokens = hasattr(trainer.state, "tokens")
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(trainer, attr, value)
        if had_tokens:
            trainer.state.tokens = tokens
        elif hasattr(trainer.state, "tokens"):
            del trainer.state.tokens
