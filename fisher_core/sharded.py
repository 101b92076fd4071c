"""Parameters sharded by FSDP: read whole, written shard by shard.

Under `fully_shard` every parameter is a DTensor: its `shape` is the full (global) shape, its data only
this process's shard. fisher-lora's statistics pass runs through FSDP's own forward/backward (which
gathers each block's weights while it runs), the `natural` selector needs only shapes, and the writer
lays every whole tensor it writes out like the parameter it goes into. Every process computes the same
whole tensors, so each simply keeps its own shard of them (no communication). FSDP1's flat parameters
are made whole around selection and writing instead (`whole_parameters`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch without DTensor: nothing is ever sharded
    DTensor = None


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def whole(t: Tensor) -> Tensor:
    """The full tensor (all-gathered if sharded: a collective, every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def laid_out_like(value: Tensor, param: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The whole tensor `value` on `param`'s device and (if sharded) placement, in `dtype` (default: `param`'s)."""
    dtype = dtype or param.dtype
    if is_sharded(param):
        return distribute_tensor(value.to(param.to_local().device, dtype), param.device_mesh, param.placements)
    return value.to(param.device, dtype)


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Inside: FSDP1 (`FullyShardedDataParallel`) parameters are whole, and what is written to them is
    kept (`summon_full_params(writeback=True)`, a collective). A no-op for any other model; FSDP2's
    DTensors need no summoning (see `whole` and `laid_out_like`)."""
    if not has_flat_shards(model):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, writeback=True):
        yield


def has_flat_shards(model: nn.Module) -> bool:
    """Whether FSDP1 wraps part of `model` (its parameters are then flat shards outside forward)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
