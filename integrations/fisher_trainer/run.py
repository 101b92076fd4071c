"""The Fisher init inside a `transformers.Trainer`, one behaviour for both integrations.

- `check_before_work`: every refusal that needs no statistics (the objective, an empty training set, a
  step-0 policy the trainer's reference cannot hold), at the earliest hook each framework offers (TRL's
  `attach`, Axolotl's `post_trainer_create`), so a bad run stops before a batch is read. A quantized base
  under `preserve` is refused by `fisher_core.initialize` itself, before its statistics pass.
- `trainer_adapter`: the adapter a trainer trains is the PEFT model's active one, whatever its name.
- `initialize_in_trainer`: `fisher_core.initialize` over the trainer's own dataloader and objective, under
  the mixed-precision autocast training runs in (`Accelerator.autocast`, plus the trainer's own
  `compute_loss_context_manager`), with the trainer's state preserved; once per model and adapter (a
  second `train()` continues from the trained adapter).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from fisher_core import FisherConfig, InitReport, initialize
from fisher_core.estimate.objective import LogitsFn, LossFn
from fisher_core.write import get_record
from fisher_trainer.glue import (
    check_objective,
    check_step0_policy,
    policy_logits,
    summed_loss_fn,
    trainer_state_preserved,
)

logger = logging.getLogger("fisher_trainer")


def trainer_adapter(model: nn.Module) -> str:
    """The name of the PEFT model's one active adapter (what the trainer trains)."""
    active = getattr(model, "active_adapter", None)
    names = [active] if isinstance(active, str) else list(active or [])
    if len(names) != 1:
        raise ValueError(
            f"fisher-lora needs one active LoRA adapter to initialize, and the model has {names or 'none'}; "
            "activate one with model.set_adapter(name) or pass adapter_name=..."
        )
    return names[0]


def check_train_set(trainer: Any) -> None:
    """Refuse a training set with no rows (what the framework's preprocessing left), before any batch is drawn."""
    dataset = trainer.train_dataset
    if dataset is not None and hasattr(dataset, "__len__") and not len(dataset):
        raise ValueError(
            "fisher-lora: the training set is empty after preprocessing (rows longer than the maximum sequence "
            "length and rows without a trainable token are dropped); raise the sequence length (Axolotl's "
            "sequence_len, TRL's max_length) or check the dataset's fields"
        )


def check_before_work(trainer: Any, config: FisherConfig, *, objective_replaced: bool = False) -> None:
    """The refusals that need no statistics, once: the trainer's objective (unless a `loss_fn` replaces it), an
    empty training set, and the step-0 policy against the trainer's reference (`glue.check_step0_policy`)."""
    if not objective_replaced:
        check_objective(trainer)
    check_train_set(trainer)
    check_step0_policy(config, trainer)


def initialize_in_trainer(
    trainer: Any,
    model: nn.Module,
    config: FisherConfig,
    adapter_name: str,
    *,
    loss_fn: LossFn | None = None,
    logits_fn: LogitsFn | None = None,
) -> InitReport | None:
    """Fisher-initialize `adapter_name` of `model` from `trainer.get_train_dataloader()` and the trainer's objective
    (`glue.summed_loss_fn` for `empirical`, `glue.policy_logits` for `true`, unless given), under the trainer's
    mixed-precision autocast, leaving the trainer's state as it was. Returns None, and does nothing, when
    fisher-lora already initialized this adapter of this model (a second `train()`)."""
    if get_record(model, adapter_name) is not None:
        logger.info(
            "fisher-lora: adapter %r was initialized when training first began; not re-initializing", adapter_name
        )
        return None
    if loss_fn is None and config.fisher_type == "empirical":
        loss_fn = summed_loss_fn(trainer)
    with trainer_state_preserved(trainer), trainer.accelerator.autocast(), trainer.compute_loss_context_manager():
        return initialize(
            model,
            trainer.get_train_dataloader(),
            loss_fn=loss_fn,
            logits_fn=logits_fn or policy_logits,
            config=config,
            adapter_name=adapter_name,
            tokenizer=trainer.processing_class,  # keep_knowledge: reads keep_data or generates keep data
        )
