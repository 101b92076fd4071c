"""torchrun worker: Fisher init of a PEFT model sharded with FSDP2 (`fully_shard`) or FSDP1 vs the same model unsharded,
and keep mode generating the model's own answers on the sharded model (shared out over the processes) vs those
answers made by the whole model and given.

Usage: torchrun --nproc_per_node 2 fsdp_worker.py OUT_DIR
Both runs see the same per-process batches; rank 0 saves the whole LoRA factors and base weights of both.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from allreduce_worker import global_batches
from tiny import tiny_llama, train_tokenizer

from fisher_core import FisherConfig, export_adapter, initialize
from fisher_core.keep import keep_mode
from fisher_core.keep.answers import BATCH_SIZE, instructions, own_answer_batches, prompt_ids
from fisher_core.layers import canonical_name
from fisher_core.sharded import whole

TARGETS = ["q_proj", "v_proj", "down_proj"]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA factor and adapted base weight, whole (a collective under FSDP)."""
    return {
        n: whole(p.detach()).clone()
        for n, p in model.named_parameters()
        if "lora_" in n or any(f"{t}.base_layer.weight" in n for t in TARGETS)
    }


def sharded_model(shard: str) -> torch.nn.Module:
    """The tiny PEFT Llama, `shard`: "" (not sharded), "fsdp2" (`fully_shard` per block and root), "fsdp1"
    (FullyShardedDataParallel, one unit) or "fsdp1-blocks" (a unit per block); a "-ckpt" suffix: the blocks use
    gradient checkpointing, kept on for the statistics pass."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    if shard.endswith("-ckpt"):
        shard = shard.removesuffix("-ckpt")
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if shard == "fsdp2":
        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
    elif shard == "fsdp1":
        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    elif shard == "fsdp1-blocks":
        model = fsdp1_per_block(model)
    return model


def whole_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`weights` by canonical name, FSDP1 units summoned whole."""
    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model):
            return {canonical_name(n): v for n, v in weights(model).items()}
    return {canonical_name(n): v for n, v in weights(model).items()}


def run(selector: str, shard: str, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The init on a `sharded_model(shard)`, its whole weights, and what the default's keep mode would do there."""
    model = sharded_model(shard)
    config = FisherConfig(progress=False, policy="preserve", num_batches=len(batches), stop_tol=None, selector=selector)
    chat = keep_mode(FisherConfig(), train_tokenizer(), model, {})  # what the default does with a chat model here
    with counting_whole_units(model) as whole_at_once:
        initialize(model, batches, config=config)
    out = whole_weights(model)
    out["keep_auto"] = f"{'on' if chat.on else 'off'}: {chat.why}"
    if shard.startswith("fsdp1"):
        out["whole_at_once"] = torch.tensor(whole_at_once)
    if shard == "fsdp2":  # exporting for the original base needs whole weights: refused with what to do instead
        try:
            export_adapter(model, Path(f"/nonexistent/export-{dist.get_rank()}"))
        except ValueError as e:
            out["export_error"] = str(e)
    return out


def keep_run(shard: str, batches: list[dict], keep_data: list[dict] | None = None) -> dict[str, torch.Tensor]:
    """Keep mode on a `sharded_model(shard)`: the model's own answers generated there (the processes share the
    prompts out, each `generate` step a collective), or `keep_data` given."""
    model = sharded_model(shard)
    config = FisherConfig(progress=False, num_batches=len(batches), stop_tol=None, keep_knowledge=True,
                          keep_data=keep_data)  # fmt: skip
    initialize(model, batches, config=config, tokenizer=train_tokenizer())
    return whole_weights(model)


def own_answers_of_the_whole_model(batches: list[dict]) -> list[dict]:
    """This process's keep batches in a sharded run (`8 · len(batches) · processes` instructions shared out by
    whole batches), made by the whole model outside any collective: the oracle for generation under sharding."""
    tokenizer = train_tokenizer()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    prompts = [prompt_ids(tokenizer, i) for i in instructions()[: BATCH_SIZE * len(batches) * dist.get_world_size()]]
    return own_answer_batches(model, tokenizer, prompts, shared=True)


@contextlib.contextmanager
def counting_whole_units(root: torch.nn.Module) -> Iterator[list[int]]:
    """Yields [most inner FSDP1 units whole at once, times the whole model was made whole, times an inner
    unit was made whole]: a call-through wrapper of `summon_full_params` that only counts."""
    summon = FullyShardedDataParallel.summon_full_params
    live, counts = [0], [0, 0, 0]

    @contextlib.contextmanager
    def counted(module: torch.nn.Module, *args, **kwargs) -> Iterator[None]:
        whole_model = module is root and kwargs.get("recurse", True)
        with summon(module, *args, **kwargs):
            live[0] += module is not root
            counts[0], counts[1] = max(counts[0], live[0]), counts[1] + whole_model
            counts[2] += module is not root
            try:
                yield
            finally:
                live[0] -= module is not root

    FullyShardedDataParallel.summon_full_params = staticmethod(counted)
    try:
        yield counts
    finally:
        FullyShardedDataParallel.summon_full_params = staticmethod(summon)


def my_batches() -> list[dict]:
    """This process's share of the global batches."""
    return global_batches()[dist.get_rank() :: dist.get_world_size()]


def save_and_finish(result: dict, path: Path) -> None:
    """Process 0 saves `result`; every process then leaves the process group."""
    if dist.get_rank() == 0:
        torch.save(result, path)
    dist.barrier()
    dist.destroy_process_group()


def fsdp1_per_block(model: torch.nn.Module) -> FullyShardedDataParallel:
    """FSDP1 with one unit per decoder block, as accelerate's transformer wrap policy makes."""
    blocks = ModuleWrapPolicy({type(model.base_model.model.model.layers[0])})
    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=blocks)


def rank_budget_refusal(batches: list[dict]) -> str:
    """The error `rank_budget` gets on an FSDP1 model with a unit per block (it would replace LoRA modules
    inside FSDP1's flat parameters)."""
    model = fsdp1_per_block(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    config = FisherConfig(
        progress=False, policy="preserve", num_batches=len(batches), stop_tol=None, rank_budget=4 * 3 * 2
    )
    try:
        initialize(model, batches, config=config)
    except ValueError as e:
        return str(e)
    return ""


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    mine = my_batches()
    runs = [(selector, shard) for selector in ("natural", "fwsvd") for shard in ("", "fsdp2", "fsdp1", "fsdp1-blocks")]
    runs += [("natural", "fsdp2-ckpt"), ("natural", "fsdp1-ckpt")]
    result = {f"{selector}/{shard}": run(selector, shard, mine) for selector, shard in runs}
    result["rank_budget_refusal"] = rank_budget_refusal(mine)
    given = own_answers_of_the_whole_model(mine)
    result["keep/"] = keep_run("", mine, given)
    result |= {f"keep/{shard}": keep_run(shard, mine) for shard in ("fsdp2", "fsdp1", "fsdp1-blocks")}
    save_and_finish(result, out / "fsdp.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
