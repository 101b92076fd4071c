"""`apply`: write directions into a live PEFT LoRA model, in place (docs/design.md §3).

For each layer: `lora_A ← A`, `lora_B ← B` (copied into the existing Parameters, so an optimizer that
already holds them keeps training them), and under `preserve` `W_base ← W_base − s·B·A` in the base
weight's dtype, with `B, A` as stored (cast) so the step-0 outputs are unchanged. An adapter that is
no longer at its initial value is refused unless `force=True`; forced, its current product is first
folded into the base, so nothing trained is lost. An interruption mid-write undoes the layers
already written.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from fisher_core.layers import base_layer, canonical_name, layer_kind
from fisher_core.select import Directions, LayerDirections
from fisher_core.sharded import Gathering, is_partitioned, is_sharded, laid_out_like, whole, whole_parameters
from fisher_core.write.record import InitRecord, Offset, get_record, set_record, total_delta

logger = logging.getLogger("fisher_core")
T = TypeVar("T")


def lora_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """The LoRA-wrapped layers that carry `adapter_name`, by canonical name."""
    check_peft_model(model, adapter_name)
    found = {
        canonical_name(n): m
        for n, m in model.named_modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and adapter_name in m.lora_A
    }
    if not found:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layers; check LoraConfig(target_modules=...)")
    return found


def check_peft_model(model: nn.Module, adapter_name: str) -> None:
    """Raise with what to pass when `model` is not a PEFT model carrying `adapter_name`."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        raise TypeError(
            f"expected a PeftModel, got {type(model).__name__}; wrap it first: "
            "peft.get_peft_model(model, LoraConfig(...))"
        )
    if adapter_name not in configs:
        raise KeyError(f"the model has no adapter {adapter_name!r}; it has {sorted(configs)}: pass adapter_name=...")


def is_at_init(module: nn.Module, adapter_name: str, record: InitRecord | None, name: str) -> bool:
    """True when the adapter's product is still zero, or still what fisher-lora wrote."""
    b = whole(module.lora_B[adapter_name].weight.detach())
    if record is not None and name in record.initial:
        b0, a0 = record.initial[name]
        a = whole(module.lora_A[adapter_name].weight.detach())
        return torch.equal(b.cpu(), b0) and torch.equal(a.cpu(), a0)
    return not bool(b.any())


def apply(
    peft_model: nn.Module,
    directions: Directions,
    adapter_name: str = "default",
    *,
    force: bool = False,
    gathering: Gathering | None = None,
) -> None:
    """Write `directions` into the LoRA layers of `adapter_name` (and the base, under `preserve`). `gathering`:
    that of an enclosing `whole_parameters(peft_model)` region (`initialize` hands its own); None enters one."""
    region = whole_parameters(peft_model) if gathering is None else contextlib.nullcontext(gathering)
    with region as gathering:  # FSDP1: one unit whole at a time
        layers = lora_layers(peft_model, adapter_name)
        record = get_record(peft_model, adapter_name) or InitRecord()
        missing = [n for n in directions if n not in layers]
        if missing:
            raise KeyError(f"no LoRA layer for {missing[:3]} under adapter {adapter_name!r}; estimate on this model")
        trained = [
            n for n in directions if not _read(gathering, layers[n], is_at_init, layers[n], adapter_name, record, n)
        ]
        if trained and not force:
            raise RuntimeError(
                f"adapter {adapter_name!r} is no longer at its initial value (e.g. {trained[0]!r}): it looks "
                "trained. Re-initializing would discard that training; pass force=True to fold it into the base and "
                "re-initialize"
            )
        for name, d in directions.items():
            kind = layer_kind(layers[name])
            needs_write = d.policy == "preserve" or _read(
                gathering, layers[name], _has_product, layers[name], adapter_name
            )
            if needs_write and not kind.writable:
                raise TypeError(f"layer {name!r} ({kind.name}) cannot be written: use policy='zero' on quantized bases")
        resized = {n: d.rank for n, d in directions.items() if d.rank != layers[n].r[adapter_name]}
        done: list[_Undo] = []
        try:
            for name, d in directions.items():
                with gathering.layer(layers[name], write=True):  # ZeRO-3: one layer gathered at a time
                    undo = _Undo(name, layers[name], adapter_name, record, gathering)
                    done.append(undo)
                    _write_layer(undo, d, directions.alpha_pattern.get(name))
        except BaseException:
            for undo in reversed(done):
                with gathering.layer(undo.module, write=True):
                    undo.revert()
            raise
        set_record(peft_model, adapter_name, record)
        ranks = {**directions.rank_pattern, **resized}
        if ranks:  # PEFT rebuilds layers from its config: a saved adapter must say each resized layer's rank
            cfg = peft_model.peft_config[adapter_name]
            alphas = {n: float(layers[n].lora_alpha[adapter_name]) for n in ranks}
            cfg.rank_pattern = {**cfg.rank_pattern, **ranks}
            cfg.alpha_pattern = {**cfg.alpha_pattern, **alphas}


def _read(gathering: Gathering, layer: nn.Module, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` with `layer`'s parameters whole (ZeRO-3: gathered for the call)."""
    with gathering.layer(layer):
        return fn(*args)


def _has_product(module: nn.Module, adapter_name: str) -> bool:
    return bool(whole(module.lora_B[adapter_name].weight.detach()).any())


class _Undo:
    """Everything needed to put one layer back as it was before `_write_layer` touched it."""

    def __init__(
        self, name: str, module: nn.Module, adapter_name: str, record: InitRecord, gathering: Gathering
    ) -> None:
        self.name, self.module, self.adapter_name, self.record = name, module, adapter_name, record
        self.gathering = gathering
        self.old_b = whole(module.lora_B[adapter_name].weight.detach()).clone()  # whole, also under FSDP
        self.old_a = whole(module.lora_A[adapter_name].weight.detach()).clone()
        self.old_initial = record.initial.get(name)
        self.added: list[Offset] = []  # set once these offsets have left the base weight

    def revert(self) -> None:
        if self.added:
            layer_kind(self.module).subtract(base_layer(self.module), total_delta(self.added).neg_())
            del self.record.offsets[self.name][-len(self.added) :]
        lora_a, lora_b = self.module.lora_A[self.adapter_name], self.module.lora_B[self.adapter_name]
        if lora_a.weight.shape != self.old_a.shape:
            resize_adapter(self.module, self.adapter_name, self.old_a.shape[0], None, self.gathering)
            lora_a, lora_b = self.module.lora_A[self.adapter_name], self.module.lora_B[self.adapter_name]
        with torch.no_grad():
            lora_a.weight.copy_(laid_out_like(self.old_a, lora_a.weight))
            lora_b.weight.copy_(laid_out_like(self.old_b, lora_b.weight))
        if self.old_initial is None:
            self.record.initial.pop(self.name, None)
        else:
            self.record.initial[self.name] = self.old_initial


def _write_layer(undo: _Undo, d: LayerDirections, alpha: float | None) -> None:
    module, adapter_name = undo.module, undo.adapter_name
    offsets: list[Offset] = []
    if undo.old_b.any():  # fold the current adapter into the base: outputs stay exactly the same
        offsets.append(Offset(-undo.old_b.float().cpu(), undo.old_a.float().cpu(), module.scaling[adapter_name]))
    if d.rank != undo.old_a.shape[0]:
        resize_adapter(module, adapter_name, d.rank, alpha, undo.gathering)
    lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
    with torch.no_grad():
        lora_a.weight.copy_(laid_out_like(d.A, lora_a.weight))
        lora_b.weight.copy_(laid_out_like(d.B, lora_b.weight))
    stored_b = whole(lora_b.weight.detach()).cpu().clone()  # as stored (cast to the adapter's dtype)
    stored_a = whole(lora_a.weight.detach()).cpu().clone()
    if d.policy == "preserve":
        offsets.append(Offset(stored_b.float(), stored_a.float(), module.scaling[adapter_name]))
    if offsets:
        layer_kind(module).subtract(base_layer(module), total_delta(offsets))
        undo.added = offsets
        undo.record.offsets.setdefault(undo.name, []).extend(offsets)
    undo.record.initial[undo.name] = (stored_b, stored_a)


def resize_adapter(
    module: nn.Module, adapter_name: str, r: int, alpha: float | None, gathering: Gathering | None = None
) -> None:
    """Give the adapter rank r; the scale s is kept unless `alpha` says otherwise (s = α/r)."""
    old_a, old_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
    flat = gathering is not None and gathering.in_flat_shards(module)
    if is_sharded(old_a.weight) or is_partitioned(old_a.weight) or flat:
        raise ValueError(
            "rank_budget resizes LoRA layers, which FSDP or DeepSpeed ZeRO-3 has already sharded: drop rank_budget, "
            "or initialize before the model is sharded (fully_shard, deepspeed.initialize)"
        )
    scaling = module.scaling[adapter_name]
    new_a = nn.Linear(old_a.in_features, r, bias=False, device=old_a.weight.device, dtype=old_a.weight.dtype)
    new_b = nn.Linear(r, old_b.out_features, bias=False, device=old_b.weight.device, dtype=old_b.weight.dtype)
    new_a.weight.requires_grad_(old_a.weight.requires_grad)
    new_b.weight.requires_grad_(old_b.weight.requires_grad)
    module.lora_A[adapter_name], module.lora_B[adapter_name] = new_a, new_b
    old_r = module.r[adapter_name]
    rslora = not math.isclose(scaling, module.lora_alpha[adapter_name] / old_r)
    module.r[adapter_name] = r
    module.lora_alpha[adapter_name] = alpha if alpha is not None else scaling * (math.sqrt(r) if rslora else r)
    module.scaling[adapter_name] = scaling


def restore_offsets(peft_model: nn.Module, record: InitRecord, adapter_name: str = "default") -> None:
    """Resume: make a freshly loaded *original* base match the one training ran on.

    Subtracts the recorded offsets (saved with `save_record` next to the checkpoint) from the base
    weights and re-attaches the record, so a later `export_adapter` still targets the original base.
    """
    layers = lora_layers(peft_model, adapter_name)
    if get_record(peft_model, adapter_name) is not None:
        raise RuntimeError(f"adapter {adapter_name!r} already carries a fisher-lora record; offsets were applied")
    missing = [name for name in record.offsets if name not in layers]
    if missing:
        raise KeyError(f"the saved record names layer {missing[0]!r}, which adapter {adapter_name!r} does not have")
    with whole_parameters(peft_model) as gathering:  # FSDP1 and ZeRO-3: one layer's weights whole at a time
        for name, offsets in record.offsets.items():
            if offsets:
                module = layers[name]
                with gathering.layer(module, write=True):
                    layer_kind(module).subtract(base_layer(module), total_delta(offsets))
    set_record(peft_model, adapter_name, record)
