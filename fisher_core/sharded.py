"""Parameters sharded by FSDP2 (`torch.distributed.tensor.DTensor`): read whole, written shard by shard.

Under `fully_shard` every parameter is a DTensor: its `shape` is the full (global) shape, its data only
this process's shard. fisher-lora's statistics pass runs through FSDP's own forward/backward (which
gathers each block's weights while it runs), the `natural` selector needs only shapes, and the writer
lays every whole tensor it writes out like the parameter it goes into. Every process computes the same
whole tensors, so each simply keeps its own shard of them (no communication).
"""

from __future__ import annotations

import torch
from torch import Tensor

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
