"""fisher-lora for TRL: `FisherInitCallback(...).attach(trainer)` Fisher-initializes the LoRA adapter of an
`SFTTrainer`, `DPOTrainer` or plain `transformers.Trainer` with a PEFT model when training begins."""

from fisher_trl.callback import FisherInitCallback

__all__ = ["FisherInitCallback"]
