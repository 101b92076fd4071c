"""One process: a tiny SFT trainer with FisherInitCallback, whole or under DeepSpeed ZeRO-3 (every parameter
partitioned), trains one step at learning rate 0 and saves; `OUT/{mode}.pt` holds the adapter as written at
on_train_begin and after the step, and the files of the final save.

    DS_ACCELERATOR=cpu python tests/distributed/trl_zero3_worker.py {whole|zero3} MODEL_DIR OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed.ops as deepspeed_ops
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "tiny"))

# DeepSpeed compiles an optional shared-memory all-reduce for CPU at its first collective; gloo is enough
# here, and a machine without a C++ toolchain could not build it
deepspeed_ops.__compatible_ops__["deepspeed_shm_comm"] = False

ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors, whole (gathered under ZeRO-3)."""
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}


class RecordInit(TrainerCallback):
    """Runs after the Fisher callback at on_train_begin: what it wrote, whole."""

    def __init__(self, trainer) -> None:
        self.trainer, self.written = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.written = lora(self.trainer.accelerator.unwrap_model(self.trainer.model))


def main(mode: str, model_dir: str, out: Path) -> None:
    import trl_tiny

    extra = {"deepspeed": ZERO3, "use_cpu": False} if mode == "zero3" else {}
    # the same init with and without ZeRO-3, keep mode on: the own answers generated on partitioned parameters
    fisher = {"num_batches": 2, "progress": False, "policy": "preserve", "keep_knowledge": True}
    trainer, _ = trl_tiny.build(
        "sft", model_dir, out / mode, fisher=fisher, steps=1, batch_size=2, bf16=False, learning_rate=0.0, **extra
    )
    record = RecordInit(trainer)
    trainer.add_callback(record)
    trainer.train()
    stepped = lora(trainer.accelerator.unwrap_model(trainer.model))
    trainer.save_model()
    saved = sorted(str(p.relative_to(out / mode)) for p in (out / mode).rglob("*") if p.is_file())
    torch.save({"written": record.written, "stepped": stepped, "saved": saved}, out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
