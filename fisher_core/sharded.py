"""Parameters sharded by FSDP or DeepSpeed ZeRO-3: read whole, written whole or shard by shard.

Under `fully_shard` (FSDP2) every parameter is a DTensor: its `shape` is the full (global) shape, its
data only this process's shard. fisher-lora's statistics pass runs through FSDP's own forward/backward
(which gathers each block's weights while it runs), the `natural` selector needs only shapes, and the
writer lays every whole tensor it writes out like the parameter it goes into. Every process computes the
same whole tensors, so each simply keeps its own shard of them (no communication).

FSDP1's flat parameters are made whole around selection and writing instead (`whole_parameters`, the
whole model); ZeRO-3's partitioned ones (outside DeepSpeed's forward a ZeRO-3 parameter is an empty
placeholder) one adapted layer at a time, only where values are read or written (`whole_layer`).
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
    """An FSDP2 (DTensor) parameter."""
    return DTensor is not None and isinstance(t, DTensor)


def is_partitioned(t: Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (DeepSpeed tags each one with a `ds_id`)."""
    return hasattr(t, "ds_id")


def whole(t: Tensor) -> Tensor:
    """The full tensor (all-gathered if sharded: a collective, every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def laid_out_like(value: Tensor, param: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The whole tensor `value` on `param`'s device and (if sharded) placement, in `dtype` (default: `param`'s)."""
    dtype = dtype or param.dtype
    if is_sharded(param):
        return distribute_tensor(value.to(param.to_local().device, dtype), param.device_mesh, param.placements)
    return value.to(param.device, dtype)


def sharding(model: nn.Module) -> str | None:
    """How `model`'s parameters are split over processes: "FSDP2", "FSDP1", "ZeRO-3", or None (whole)."""
    params = list(model.parameters())
    if any(is_sharded(p) for p in params):
        return "FSDP2"
    if has_flat_shards(model):
        return "FSDP1"
    if any(is_partitioned(p) for p in params):
        return "ZeRO-3"
    return None


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Inside: FSDP1 (`FullyShardedDataParallel`) parameters are whole, and what is written to them is
    kept (`summon_full_params(writeback=True)`, a collective: every process enters). A no-op for any other
    model: FSDP2's DTensors need no gathering (`whole`, `laid_out_like`), ZeRO-3 gathers one layer at a
    time (`whole_layer`)."""
    if sharding(model) != "FSDP1":
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, writeback=True):
        yield


def whole_layer(layer: nn.Module, write: bool = False) -> contextlib.AbstractContextManager:
    """Inside: a DeepSpeed ZeRO-3 layer's parameters (base weight, bias, LoRA factors) are whole; with
    `write`, process 0's values are re-partitioned on exit (every process writes the same values).
    A collective for ZeRO-3 (every process enters, layer by layer in the same order); else a no-op."""
    params = [p for p in layer.parameters() if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if write else None)


def has_flat_shards(model: nn.Module) -> bool:
    """Whether FSDP1 wraps part of `model` (its parameters are then flat shards outside forward)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
