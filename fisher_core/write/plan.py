"""What `initialize` decides before the statistics pass, so that a refusal costs seconds, not the pass.

- `trained_layers`: layers whose adapter is no longer at its initial value (PEFT's zero `B`, or what
  fisher-lora wrote). Without `force` that is refused here; with `force` the statistics are taken on the
  model as it sits (the trained adapter on), since that is where the new adapter starts.
- `check_ranks`: a LoRA rank above `min(out, in)` of its layer cannot be filled, nor a `rank_budget` below
  one rank per layer.
- `check_policy`: `preserve` writes `W − s·B·A` into the base weight, which cannot be done to a quantized
  weight (bitsandbytes 4/8-bit, QLoRA) and is wrong wherever that weight is read by something else: a
  weight tied to another module (`lm_head` ↔ `embed_tokens` in tied Llama-3.2 / Qwen2.5 / Gemma) or a base
  shared by other adapters of the layer. So is `preserve` with `lora_dropout > 0`: in training the adapter reads
  `dropout(x)` while the base lost `s·B·A·x`, so the step-0 loss is not the original model's. `preserve` (opted
  into: the default is `zero`) on such a layer is an error that says why, raised before the statistics pass
  (every integration goes through here).
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from fisher_core.config import FisherConfig
from fisher_core.layers import base_layer, layer_kind
from fisher_core.select.ranks import check_budget
from fisher_core.sharded import Gathering
from fisher_core.write.peft import _read, is_at_init
from fisher_core.write.record import get_record

logger = logging.getLogger("fisher_core")


def trained_layers(
    peft_model: nn.Module, layers: dict[str, nn.Module], adapter_name: str, gathering: Gathering
) -> list[str]:
    """Names of the layers whose adapter `adapter_name` is no longer at its initial value (merged ones too)."""
    record = get_record(peft_model, adapter_name)
    return [
        name
        for name, module in layers.items()
        if adapter_name in getattr(module, "merged_adapters", ())
        or not _read(gathering, module, is_at_init, module, adapter_name, record, name)
    ]


def refuse_trained(trained: list[str], adapter_name: str) -> None:
    """The refusal for a trained adapter without `force` (nothing has been touched yet)."""
    if trained:
        raise RuntimeError(
            f"adapter {adapter_name!r} is no longer at its initial value (e.g. {trained[0]!r}): it looks trained. "
            "Re-initializing would discard that training; pass force=True to fold it into the base and re-initialize "
            "from the model as it is now"
        )


def check_ranks(layers: dict[str, nn.Module], adapter_name: str, config: FisherConfig) -> None:
    """Refuse a LoRA rank that exceeds `min(out, in)` of its layer, and a `rank_budget` below one per layer."""
    if config.rank_budget is not None:
        check_budget(config.rank_budget, len(layers))
    for name, module in layers.items():
        r = getattr(module, "r", {}).get(adapter_name)
        limit = min(layer_kind(module).shape(base_layer(module)))
        if r is not None and r > limit:
            raise ValueError(f"rank {r} exceeds min(out, in) = {limit} of layer {name!r}; lower the rank")


def check_policy(peft_model: nn.Module, layers: dict[str, nn.Module], adapter_name: str, config: FisherConfig) -> None:
    """Refuse `preserve` where the base cannot be written or writing it would change what another module or
    adapter computes (module docstring); where it is allowed, say once what learning rate it wants."""
    if config.policy != "preserve":
        return
    _refuse_dropout(layers, adapter_name)
    uses = Counter(id(p) for _, p in peft_model.named_parameters(remove_duplicate=False))
    for name, module in layers.items():
        weight = getattr(base_layer(module), "weight", None)
        others = sorted(a for a in getattr(module, "lora_A", {}) if a != adapter_name)
        kind = layer_kind(module)
        why = (
            f"its weight is quantized ({kind.name}) and cannot be written"
            if not kind.writable
            else "its weight is tied to another module (e.g. the input embedding)"
            if weight is not None and uses[id(weight)] > 1
            else f"its base is shared with adapter(s) {', '.join(others)}"
            if others
            else None
        )
        if why:
            raise ValueError(
                f"policy 'preserve' would change layer {name!r}'s base, and {why}; use policy='zero' (the default) "
                "or leave that layer out of target_modules"
            )
    logger.warning(
        "fisher-lora: policy 'preserve' starts from nonzero B·A at LoRA-GA's scale: on the held-out protocol its "
        "best learning rate ranged from 0.5× to 2× default LoRA's by task, and at LoRA's own lr it fell behind "
        "LoRA's mean on most tasks (BENCHMARKS.md). Tune the learning rate rather than copying it from a LoRA "
        "recipe, or use the default policy 'zero'"
    )


def _refuse_dropout(layers: dict[str, nn.Module], adapter_name: str) -> None:
    """`preserve` keeps the outputs only if the adapter reads the same `x` as the base: no LoRA dropout."""
    for name, module in layers.items():
        dropouts = getattr(module, "lora_dropout", {})
        p = getattr(dropouts[adapter_name], "p", 0.0) if adapter_name in dropouts else 0.0
        if p > 0:
            raise ValueError(
                f"policy 'preserve' with lora_dropout={p} (layer {name!r}): in training the adapter reads dropout(x) "
                "while the base lost s·B·A·x, so the step-0 loss would not be the original model's; set "
                "lora_dropout=0 or use policy='zero' (the default)"
            )
