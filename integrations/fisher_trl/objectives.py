"""The trainer's own objective as a `fisher_core` loss, and the policy's predictive distribution.

- `summed_trainer_loss`: `Trainer`/`SFTTrainer` — the trainer's `compute_loss` with
  `num_items_in_batch=1`, so the model reduces its token losses by a sum instead of a mean (undoing
  the `average_tokens_across_devices` factor under DDP).
- `summed_pair_loss`: `DPOTrainer` — its `compute_loss` (a mean over the pairs of the batch) times
  the number of pairs, i.e. the DPO loss summed over pairs.
- `policy_logits`: the causal LM's logits at completion positions (`labels != -100` for SFT batches,
  `completion_mask` for preference batches) with the data's next tokens, for `fisher_type='true'`.
- `trainer_bookkeeping`: `compute_loss` appends to the trainer's metrics and counts tokens; the
  context puts them back as they were.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import Tensor, nn
from transformers import Trainer

from fisher_core.estimate.objective import IGNORE_INDEX, Batch, LossFn

NON_MODEL_KEYS = frozenset({"labels", "completion_mask", "ref_chosen_logps", "ref_rejected_logps", "assistant_masks"})


def is_preference_trainer(trainer: Trainer) -> bool:
    """DPO: batches of [chosen; rejected] rows with a `completion_mask`, a loss averaged over pairs."""
    from trl import DPOTrainer

    return isinstance(trainer, DPOTrainer)


def reference_is_adapter_disabled(trainer: Trainer) -> bool:
    """True when the trainer computes its reference on the fly from this model with the adapter off (or the
    'ref' adapter), so changing the base weights would change the reference."""
    if not hasattr(trainer, "ref_model"):
        return False
    return trainer.ref_model is None and not getattr(trainer, "precompute_ref_logps", False)


def trainer_loss_fn(trainer: Trainer) -> LossFn:
    """The summed training objective of `trainer` for `fisher_core.estimate` (see module docstring)."""
    if is_preference_trainer(trainer):
        return lambda model, batch: summed_pair_loss(trainer, model, batch)
    if not (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None):
        raise ValueError(
            f"{type(trainer).__name__}'s model does not take num_items_in_batch, so its loss is a mean that cannot be "
            "turned into a sum; pass FisherInitCallback(loss_fn=...) returning the summed loss of a batch"
        )
    return lambda model, batch: summed_trainer_loss(trainer, model, batch)


def summed_trainer_loss(trainer: Trainer, model: nn.Module, batch: Batch) -> Tensor:
    """Σ of the supervised token losses of `batch` under `trainer.compute_loss`."""
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=1)
    return loss / _loss_scale(trainer)


def summed_pair_loss(trainer: Trainer, model: nn.Module, batch: Batch) -> Tensor:
    """The preference loss summed over the pairs of `batch` (rows are [chosen; rejected])."""
    pairs = batch["input_ids"].shape[0] // 2
    return trainer.compute_loss(model, dict(batch)) * pairs


def _loss_scale(trainer: Trainer) -> int:
    """The factor `Trainer.compute_loss` multiplies a `num_items_in_batch`-reduced loss by (DDP token averaging)."""
    if not trainer.args.average_tokens_across_devices:
        return 1
    if trainer.args.n_gpu > 1:
        return trainer.args.n_gpu
    scale = trainer.accelerator.num_processes
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    return scale // parallelism.tp_size if parallelism is not None else scale


def policy_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(logits [K, V], next tokens [K]) of a causal LM at the K completion positions of `batch`."""
    if "labels" in batch:
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
    elif "completion_mask" in batch:
        targets = batch["input_ids"][:, 1:]
        keep = batch["completion_mask"][:, 1:].bool()
    else:
        raise ValueError("the batch has neither 'labels' nor 'completion_mask'; pass FisherInitCallback(logits_fn=...)")
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    return logits[keep], targets[keep]


@contextlib.contextmanager
def trainer_bookkeeping(trainer: Trainer) -> Iterator[None]:
    """Restore the metrics and token counters that `compute_loss` updates (TRL's `_metrics`, `_total_train_tokens`)."""
    names = [n for n in ("_metrics", "_total_train_tokens") if hasattr(trainer, n)]
    saved = {n: copy.deepcopy(getattr(trainer, n)) for n in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)
