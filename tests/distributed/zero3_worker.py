"""torchrun worker: Fisher init of a PEFT model partitioned by DeepSpeed ZeRO-3 vs the same model whole, and
keep mode generating the model's own answers on the partitioned model vs those answers given to the whole one.

Usage: DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 zero3_worker.py OUT_DIR
Both runs see the same per-process batches; rank 0 saves statistics, LoRA factors and base weights of both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import deepspeed.ops as deepspeed_ops
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fsdp_worker import TARGETS, my_batches, own_answers_of_the_whole_model, save_and_finish, weights
from tiny import tiny_llama, train_tokenizer

from fisher_core import FisherConfig, estimate, export_adapter, initialize, select
from fisher_core.keep import keep_mode

# DeepSpeed compiles an optional shared-memory all-reduce for CPU at its first collective; gloo is enough
# here, and a machine without a C++ toolchain could not build it
deepspeed_ops.__compatible_ops__["deepspeed_shm_comm"] = False

ZERO3 = {  # every parameter partitioned, however small (the default keeps parameters under 1e5 elements whole)
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
}


def partitioned(model: torch.nn.Module) -> torch.nn.Module:
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ZERO3
    )
    return engine.module


def run(selector: str, zero3: bool, batches: list[dict], out: Path) -> dict:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model = partitioned(model) if zero3 else model
    config = FisherConfig(progress=False, policy="preserve", num_batches=len(batches), stop_tol=None, selector=selector)
    # the statistics cache fingerprints whole weights: the whole model's run writes it, the partitioned one reuses it
    cache = config.model_copy(update={"cache_path": out / f"{selector}.safetensors"})
    reused = bool(estimate(model, batches, target_modules=TARGETS, config=cache).meta.get("cache"))
    dist.barrier()  # written (by rank 0) before any process reads it
    report = initialize(model, batches, config=config)
    stats = {n: (s.input_cov, s.grad_cov, s.num_tokens) for n, s in report.stats.items()}
    # `select` called directly on the model after the init: ZeRO-3 layers gathered one at a time if read
    direct = {n: (d.B, d.A) for n, d in select(report.stats, model, config=config).items()}
    result: dict = {"cache_reused": reused, "stats": stats, "direct": direct}
    result["keep_auto"] = keep_mode(FisherConfig(), train_tokenizer(), model, {}).why  # the default with a chat model
    result["held"] = int(report.stats.meta["held_peak_bytes"])
    result["mean_grads"] = {n: s.mean_grad for n, s in report.stats.items()}
    with deepspeed.zero.GatheredParameters(list(model.parameters())) if zero3 else torch.no_grad():
        result["weights"] = weights(model)
    if zero3:
        placeholder = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        result["partitioned"] = placeholder.numel() == 0  # outside a gather the weight is not whole here
        try:
            export_adapter(model, Path(f"/nonexistent/export-{dist.get_rank()}"))
        except ValueError as e:
            result["export_error"] = str(e)
    return result


def keep_run(zero3: bool, batches: list[dict], keep_data: list[dict] | None = None) -> dict[str, torch.Tensor]:
    """Keep mode, its whole weights: the model's own answers generated on partitioned parameters (every forward
    a collective), or `keep_data` given to the whole model."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model = partitioned(model) if zero3 else model
    config = FisherConfig(progress=False, num_batches=len(batches), stop_tol=None, keep_knowledge=True,
                          keep_data=keep_data)  # fmt: skip
    initialize(model, batches, config=config, tokenizer=train_tokenizer())
    with deepspeed.zero.GatheredParameters(list(model.parameters())) if zero3 else torch.no_grad():
        return {n: v.clone() for n, v in weights(model).items()}


def checkpointed(batches: list[dict]) -> dict:
    """Statistics of the partitioned model with gradient checkpointing on (kept on for the pass)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = FisherConfig(progress=False, policy="preserve", num_batches=len(batches), stop_tol=None)
    stats = estimate(partitioned(model), batches, target_modules=TARGETS, config=config)
    return {
        "stats": {n: (s.input_cov, s.grad_cov, s.num_tokens) for n, s in stats.items()},
        "mean_grads": {n: s.mean_grad for n, s in stats.items()},
        "held": int(stats.meta["held_peak_bytes"]),
    }


def main(out: Path) -> None:
    deepspeed.init_distributed("gloo")
    mine = my_batches()
    result = {f"{s}/{z}": run(s, z, mine, out) for s in ("natural", "fwsvd") for z in (False, True)}
    result["natural/True-ckpt"] = checkpointed(mine)
    result["keep/whole"] = keep_run(False, mine, own_answers_of_the_whole_model(mine))
    result["keep/zero3"] = keep_run(True, mine)
    save_and_finish(result, out / "zero3.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
