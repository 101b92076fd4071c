"""Trainer glue shared by the Axolotl plugin and the TRL callback (both drive a `transformers.Trainer`).

It lives once, here, because both frameworks hand fisher-lora the same things — a `Trainer`, its model,
its dataloader and its `compute_loss` — and every decision about them (which step-0 policy an objective
allows, how its loss becomes a sum, what the statistics pass must leave untouched, what a checkpoint
carries, how a run resumes and exports) must not differ between them. Each integration only maps its
framework's hooks onto these functions.
"""

from fisher_trainer.glue import (
    OriginalBaseAtTrainEnd,
    RecordInCheckpoints,
    add_save_callbacks,
    check_objective,
    check_step0_policy,
    policy_logits,
    reference_is_adapter_disabled,
    resume,
    summed_loss_fn,
    trainer_state_preserved,
)
from fisher_trainer.run import check_before_work, check_train_set, initialize_in_trainer, trainer_adapter

__all__ = [
    "OriginalBaseAtTrainEnd",
    "RecordInCheckpoints",
    "add_save_callbacks",
    "check_before_work",
    "check_objective",
    "check_step0_policy",
    "check_train_set",
    "initialize_in_trainer",
    "policy_logits",
    "reference_is_adapter_disabled",
    "resume",
    "summed_loss_fn",
    "trainer_adapter",
    "trainer_state_preserved",
]
