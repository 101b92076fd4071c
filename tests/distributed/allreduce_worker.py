"""torchrun worker: each rank estimates on its share of the global batches; rank 0 saves the result.

Usage: torchrun --nproc_per_node N allreduce_worker.py OUT_DIR
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiny import tiny_llama

from fisher_core import FisherConfig, estimate, select
from fisher_core.estimate.plan import planned_bytes
from fisher_core.layers import base_layer, find_targets, layer_kind

TARGETS = ["q_proj", "v_proj", "down_proj"]


def global_batches() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 384, (8, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2], "labels": labels[i : i + 2]}
        for i in range(0, 8, 2)
    ]


DRAWN = {"fisher_type": "true", "position_fraction": 0.5}  # a pass that draws labels and positions


def planted_failure(natural, failing):
    """The `natural` selector, raising `ValueError("planted")` on the layer whose statistics are `failing` (one
    process solves it; every process must raise)."""

    def selector(weight, layer_stats, *args):
        if layer_stats is failing:
            raise ValueError("planted")
        return natural(weight, layer_stats, *args)

    return selector


def drawn_and_node_local(model: torch.nn.Module, mine: list[dict], out: Path) -> dict:
    """The `DRAWN` statistics of this rank's batches, and a cached rerun where only rank 0 finds the cache file
    (as on another node's local disk): every rank must recompute rather than one return while the other passes."""
    drawn = FisherConfig(progress=False, policy="preserve", num_batches=len(mine), **DRAWN)
    stats = estimate(model, mine, target_modules=TARGETS, config=drawn)
    local = out / ("stats.safetensors" if dist.get_rank() == 0 else "rank1-local/stats.safetensors")
    plain = FisherConfig(progress=False, policy="preserve", num_batches=len(mine), selector="natural")
    rerun = estimate(model, mine, target_modules=TARGETS, config=plain.model_copy(update={"cache_path": local}))
    return {
        "drawn": {n: (s.input_cov, s.grad_cov, s.num_tokens) for n, s in stats.items()},
        "node_local": (rerun.meta.get("cache"), {n: s.grad_cov for n, s in rerun.items()}),
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = global_batches()[rank::world]
    cfg = FisherConfig(progress=False, policy="preserve", num_batches=len(mine), selector="natural")
    model = tiny_llama()
    stats = estimate(model, mine, target_modules=TARGETS, config=cfg)
    cached_cfg = cfg.model_copy(update={"cache_path": out / "stats.safetensors"})
    estimate(model, mine, target_modules=TARGETS, config=cached_cfg)  # rank 0 writes the global statistics
    dist.barrier()
    reused = estimate(model, mine, target_modules=TARGETS, config=cached_cfg)  # every rank reads them back
    assert reused.meta.get("cache") and all(torch.equal(reused[n].grad_cov, stats[n].grad_cov) for n in stats)
    solved: list[str] = []  # the layers this rank solves: our own selector, wrapped to say which
    selection = importlib.import_module("fisher_core.select")  # the package (`fisher_core.select` is the function)
    natural = selection.SELECTORS["natural"]

    def counted(weight, layer_stats, *args):
        solved.append(next(n for n, s in stats.items() if s is layer_stats))
        return natural(weight, layer_stats, *args)

    selection.SELECTORS["natural"] = counted
    directions = select(stats, model, rank=4, config=cfg)
    selection.SELECTORS["natural"] = planted_failure(natural, stats["model.layers.1.mlp.down_proj"])
    try:
        select(stats, model, rank=4, config=cfg)
        raised = ""
    except ValueError as e:
        raised = str(e)
    selection.SELECTORS["natural"] = natural
    # shards of different lengths (1 and 3 batches), default config (early stopping on): no hang,
    # every process reads as many batches as the shortest shard
    uneven = global_batches()[:1] if rank == 0 else global_batches()[1:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = estimate(model, uneven, target_modules=TARGETS, config=FisherConfig(progress=False))
    # a budget the held inputs for Ḡ overflow (one block's, the budgeted pass checkpoints): rank 1's batches have
    # no padding, so it holds more (a view of x, not a masked copy); the tightened plan must be the same on both
    # ranks or the all-reduce would not match
    targets = find_targets(model, TARGETS)
    shapes = {n: layer_kind(m).shape(base_layer(m)) for n, m in targets.items()}
    dense = planned_bytes(shapes, True, {}, 8, [n for n, s in stats.items() if s.input_group != n])
    held = mine if rank == 0 else [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in mine]
    budgeted = estimate(
        model,
        held,
        target_modules=TARGETS,
        config=cfg.model_copy(update={"memory_budget": dense + 1, "sketch_rank": 8}),
    )
    extra = drawn_and_node_local(model, mine, out)
    torch.save(
        {
            **extra,
            "raised": raised,
            "budgeted": (
                {n: [type(t).__name__ for t in (s.input_cov, s.grad_cov, s.mean_grad)] for n, s in budgeted.items()},
                budgeted.meta["held_peak_bytes"],
            ),
            "uneven": (short.num_batches, short.num_tokens, [str(w.message) for w in caught]),
            "stats": {n: (s.input_cov, s.grad_cov, s.mean_grad, s.num_tokens) for n, s in stats.items()},
            "directions": {n: (d.B, d.A) for n, d in directions.items()},
            "solved": solved,
        },
        out / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
