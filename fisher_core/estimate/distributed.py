"""Where the statistics are combined across processes (DDP, FSDP, DeepSpeed via torch.distributed).

Statistics are sums plus token counts, so every process's share is added with one all-reduce per
tensor at the end of the pass. Each process must call this the same number of times.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
Number = TypeVar("Number", int, float)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_index() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def global_sums(local: list[int]) -> list[int]:
    """Each of `local`'s counts summed over all processes (one all-reduce)."""
    if world_size() == 1:
        return list(local)
    counts = torch.tensor([float(c) for c in local], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(counts)
    return [round(c) for c in counts.tolist()]


def all_reduce_in_place(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over all processes, in place, on the device the backend reduces on (every process must
    pass the same tensors in the same order)."""
    if world_size() == 1:
        return
    device = _collective_device()
    for t in tensors:
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


def global_max(local: Number) -> Number:
    """The largest of every process's `local`, as its type (a collective)."""
    return _reduced(local, dist.ReduceOp.MAX)


def global_min(local: Number) -> Number:
    """The smallest of every process's `local`, as its type (a collective)."""
    return _reduced(local, dist.ReduceOp.MIN)


def _reduced(local: Number, op: dist.ReduceOp) -> Number:
    """`op` over every process's `local`, on the device the process group's backend reduces on (NCCL: CUDA)."""
    if world_size() == 1:
        return local
    dtype = torch.int64 if isinstance(local, int) else torch.float64
    value = torch.tensor([local], dtype=dtype, device=_collective_device())
    dist.all_reduce(value, op=op)
    return type(local)(value.item())


def is_main_process() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def in_lockstep(items: Iterable[T]) -> Iterator[T]:
    """Yield items while *every* process still has one: under `torch.distributed` one MIN all-reduce of a
    flag per item, so all processes read the same number of batches and meet at the same collectives (the
    early-stopping checks, the final all-reduce) even when their shards differ in length. A process with
    a longer shard leaves its extra items unread, with a warning."""
    if world_size() == 1:
        yield from items
        return
    device = _collective_device()
    iterator = iter(items)
    while True:
        item = next(iterator, None)
        flag = torch.tensor([0.0 if item is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if float(flag) == 0.0:
            if item is not None:
                warnings.warn(
                    f"process {dist.get_rank()} has more calibration batches than another process; every process "
                    "reads as many as the shortest shard (give every process the same number, e.g. with a "
                    "DistributedSampler)",
                    stacklevel=2,
                )
            return
        yield item
