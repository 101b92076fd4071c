"""torchrun worker: resuming a `preserve` run (base offsets recorded in the checkpoint) with the record on every
process's disk, and with it on process 0's only (a checkpoint saved on one node's local disk).

Usage: torchrun --nproc_per_node 2 resume_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

from fisher_trainer.glue import resume

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from allreduce_worker import TARGETS, global_batches
from tiny import tiny_llama

from fisher_core import FisherConfig, initialize
from fisher_core.write import get_record, save_record


def fresh() -> torch.nn.Module:
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    trained = fresh()
    config = FisherConfig(progress=False, policy="preserve", num_batches=2, stop_tol=None, keep_knowledge=False)
    initialize(trained, global_batches()[rank::2], config=config)
    everywhere, on_zero = out / f"everywhere-{rank}", out / f"on-zero-{rank}"
    everywhere.mkdir(), on_zero.mkdir()
    save_record(get_record(trained, "default"), everywhere)
    if rank == 0:
        save_record(get_record(trained, "default"), on_zero)
    said = {"everywhere": resume(fresh(), everywhere)}
    try:
        said["on_zero"] = resume(fresh(), on_zero)
    except FileNotFoundError as e:
        said["on_zero"] = f"raised: {e}"
    torch.save(said, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
