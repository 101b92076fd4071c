"""Parameters sharded by FSDP or DeepSpeed ZeRO-3: read whole, written whole or shard by shard.

Under `fully_shard` (FSDP2) every parameter is a DTensor: its `shape` is the full (global) shape, its
data only this process's shard. fisher-lora's statistics pass runs through FSDP's own forward/backward
(which gathers each block's weights while it runs), the `natural` selector needs only shapes, and the
writer lays every whole tensor it writes out like the parameter it goes into. Every process computes the
same whole tensors, so each simply keeps its own shard of them (no communication).

FSDP1's flat parameters and ZeRO-3's partitioned ones (outside DeepSpeed's forward a ZeRO-3 parameter is
an empty placeholder) are made whole one adapted layer at a time, only where values are read or written
(`Gathering.layer`; `whole_parameters` yields the `Gathering` that callers hand down): under FSDP1 the
unit that holds the layer (one decoder block when blocks are wrapped, as accelerate's transformer wrap
policy does), under ZeRO-3 the layer's own parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

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
def root_whole(model: nn.Module) -> Iterator[None]:
    """Inside: the parameters that FSDP keeps in `model`'s own (root) unit are whole — the embeddings, final norm
    and head, which the root's forward hook would gather but `generate` never calls the root's forward. The
    inner units (blocks) gather their own in their forward, as always. A collective; a no-op when `model` is not
    an FSDP root (whole parameters, ZeRO-3: DeepSpeed hooks every module)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    elif isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield
    else:
        yield


@dataclass
class _Fsdp1Region:
    """FSDP1 inside `whole_parameters`: each module → the unit whose flat parameter holds it (None: whole
    throughout), and the one inner unit now whole (kept whole until a layer of another unit is asked
    for, so consecutive layers of a block share one all-gather)."""

    units: dict[nn.Module, nn.Module | None]
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    whole_unit: nn.Module | None = None

    def make_whole(self, unit: nn.Module) -> None:
        if unit is self.whole_unit:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        self.held.close()  # the previous unit sharded again, what was written to it kept
        self.whole_unit = None
        self.held.enter_context(FullyShardedDataParallel.summon_full_params(unit, recurse=True, writeback=True))
        self.whole_unit = unit


class Gathering:
    """How one adapted layer's parameters are made whole where they are read or written, handed to everything
    that reads or writes them: DeepSpeed ZeRO-3 gathers the layer's own parameters; FSDP1 (made by
    `whole_parameters`) makes whole the unit holding the layer and keeps it whole across that unit's layers;
    FSDP2's DTensors and whole models need nothing (`whole`, `laid_out_like`)."""

    def __init__(self, fsdp1: _Fsdp1Region | None = None) -> None:
        self.fsdp1 = fsdp1

    def layer(self, layer: nn.Module, write: bool = False, recurse: bool = True) -> contextlib.AbstractContextManager:
        """Inside: `layer`'s parameters (base weight, bias, LoRA factors) are whole. ZeRO-3: gathered; with
        `write`, process 0's values are re-partitioned on exit (every process writes the same values). FSDP1:
        the unit holding the layer is made whole (with the units inside it) and stays whole after the context,
        until another unit is asked for; written values are kept. A collective in both cases (every process
        enters, layer by layer in the same order); else a no-op. `recurse=False`: only `layer`'s own
        parameters (ZeRO-3), not its submodules'."""
        if self.fsdp1 is not None:
            unit = self.fsdp1.units.get(layer)
            if unit is not None:
                self.fsdp1.make_whole(unit)
            return contextlib.nullcontext()
        params = [p for p in layer.parameters(recurse=recurse) if is_partitioned(p)]
        if not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if write else None)

    def by_layer(self, layer: nn.Module) -> bool:
        """Whether `layer`'s parameters are whole only inside `layer(...)` (elsewhere: placeholders or shards
        whose shape is not the layer's): ZeRO-3, or an FSDP1 inner unit (a block) holds the layer."""
        if self.fsdp1 is not None and self.fsdp1.units.get(layer) is not None:
            return True
        return any(is_partitioned(p) for p in layer.parameters())

    def in_flat_shards(self, layer: nn.Module) -> bool:
        """Whether FSDP1 holds `layer` in a flat parameter: its modules cannot be replaced."""
        return self.fsdp1 is not None and layer in self.fsdp1.units


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[Gathering]:
    """The region where layers are read and written whole, one unit at a time; yields the `Gathering` to hand
    to whatever reads or writes them. FSDP1 (`FullyShardedDataParallel`): the outermost units' own parameters
    (embeddings, head, and everything when nothing is wrapped inside) are whole throughout; a unit wrapped
    inside (a decoder block) is made whole when `Gathering.layer` asks for a layer it holds, and stays whole
    until a layer of another unit is asked for (so at most one inner unit is whole). Written values are kept
    (`writeback=True`). A collective: every process enters, and asks for the same layers in the same order.
    Any other model: nothing to enter (ZeRO-3 gathers a layer's parameters in `Gathering.layer`)."""
    if sharding(model) != "FSDP1":
        yield Gathering()
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    units, roots = _fsdp1_units(model)
    region = _Fsdp1Region({m: None if unit in roots else unit for m, unit in units.items()})
    with contextlib.ExitStack() as stack:
        for root in roots:  # the root first: FSDP1's lazy initialization must start there
            stack.enter_context(FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=True))
        stack.enter_context(region.held)  # closed before the roots: inner units first
        yield Gathering(region)


def _fsdp1_units(model: nn.Module) -> tuple[dict[nn.Module, nn.Module | None], list[nn.Module]]:
    """Each module of `model` → the innermost `FullyShardedDataParallel` that is it or contains it; and the
    outermost units (those inside no other)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units: dict[nn.Module, nn.Module | None] = {}
    roots: list[nn.Module] = []
    stack: list[tuple[nn.Module, nn.Module | None]] = [(model, None)]
    while stack:
        module, outer = stack.pop()
        unit = outer
        if isinstance(module, FullyShardedDataParallel):
            unit = module
            if outer is None:
                roots.append(module)
        units[module] = unit
        stack.extend((child, unit) for child in module.children())
    return units, roots


def has_flat_shards(model: nn.Module) -> bool:
    """Whether FSDP1 wraps part of `model` (its parameters are then flat shards outside forward)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
