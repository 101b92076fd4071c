"""Where the statistics are combined across processes (DDP, FSDP, DeepSpeed via torch.distributed).

Statistics are sums plus token counts, so every process's share is added with one all-reduce per
tensor at the end of the pass. Each process must call this the same number of times.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from fisher_core.estimate.factors import LayerAccumulator


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sums(layers: Mapping[str, LayerAccumulator]) -> None:
    """Sum every layer's running sums and token counts over all processes, in place."""
    if world_size() == 1:
        return
    device = _collective_device()
    counts = torch.tensor([float(acc.tokens) for acc in layers.values()], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    for (name, acc), count in zip(layers.items(), counts.tolist(), strict=True):
        acc.tokens = round(count)
        shares_input = acc.input_group not in ("", name)
        for s, shape in (
            (None if shares_input else acc.input_sum, (acc.in_features, acc.in_features)),
            (acc.grad_sum, (acc.out_features, acc.out_features)),
            (acc.mean_grad_sum, (acc.out_features, acc.in_features)),
        ):
            if s is None:
                continue
            for t in s.tensors(shape, torch.device("cpu")):
                reduced = t.to(device)
                dist.all_reduce(reduced)
                t.copy_(reduced)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_fingerprint(local: str) -> str:
    """One fingerprint for every process's data: the per-process fingerprints gathered and hashed."""
    if world_size() == 1:
        return local
    import hashlib

    gathered: list[str | None] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    return hashlib.sha256("".join(str(g) for g in gathered).encode()).hexdigest()


def is_main_process() -> bool:
    return world_size() == 1 or dist.get_rank() == 0
