"""torchrun worker: for each kind (sft, dpo) build a tiny trainer with FisherInitCallback, train one step, and
save what each rank's adapter and statistics were when training began (`{kind}-rank{N}.pt` in OUT). The SFT run
(`preserve`: handed back on the original base when training ends) then trains once more and saves each rank's
adapter after it (`sft-rank{N}-again.pt`).

    torchrun --nproc_per_node 2 tests/distributed/trl_ddp_worker.py sft,dpo MODEL_DIR OUT BATCH NUM_BATCHES
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "tiny"))


class SaveInitialState(TrainerCallback):
    """Runs after the Fisher callback at on_train_begin: records the adapter and the statistics."""

    def __init__(self, trainer, fisher, path: Path) -> None:
        self.trainer, self.fisher, self.path = trainer, fisher, path
        trainer.add_callback(self)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path.exists():  # a second train(): the state when the first began is kept
            return
        lora = lora_state(self.trainer.model)
        stats = {
            n: {"input_cov": s.input_cov, "grad_cov": s.grad_cov, "mean_grad": s.mean_grad, "tokens": s.num_tokens}
            for n, s in self.fisher.report.stats.items()
        }
        world = dist.get_world_size() if dist.is_initialized() else 1
        torch.save({"lora": lora, "stats": stats, "world": world}, self.path)


def run(kind: str, model_dir: str, out: Path, batch_size: int, num_batches: int) -> None:
    import trl_tiny

    fisher = {"num_batches": num_batches, "progress": False, "policy": "zero" if kind == "dpo" else "preserve"}
    trainer, callback = trl_tiny.build(
        kind, model_dir, out / "run", fisher=fisher, steps=1, batch_size=batch_size, bf16=False
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    SaveInitialState(trainer, callback, out / f"{kind}-rank{rank}.pt")
    trainer.train()
    if kind == "sft":
        handed_back = lora_state(trainer.model)
        trainer.train()
        torch.save({"handed_back": handed_back, "again": lora_state(trainer.model)}, out / f"sft-rank{rank}-again.pt")


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


if __name__ == "__main__":
    kinds, model_dir, out, batch_size, num_batches = sys.argv[1:6]
    for kind in kinds.split(","):
        run(kind, model_dir, Path(out), int(batch_size), int(num_batches))
