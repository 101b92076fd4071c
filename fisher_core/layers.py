"""One small adapter per supported layer kind: how to read its weight as `W` (m×n) and whether it can
be written. Everything else in the library talks to layers only through `LayerKind`.

Supported: `torch.nn.Linear`, transformers' `Conv1D` (weight stored n×m, fan_in_fan_out) and
bitsandbytes 4/8-bit linears (readable by dequantization, never written). PEFT's LoRA wrappers are
seen through to their base layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisher_core.sharded import laid_out_like

PEFT_PREFIX = "base_model.model."
FSDP1_SEGMENT = "_fsdp_wrapped_module."  # FullyShardedDataParallel's wrapper, once per wrapped unit


@dataclass(frozen=True)
class LayerKind:
    """How one supported base layer stores `W` (m×n, `y = W x + b`)."""

    name: str
    transposed: bool
    writable: bool

    def weight(self, layer: nn.Module) -> Tensor:
        """`W` as an m×n fp32 tensor (dequantized for quantized layers)."""
        if self.name.startswith("bnb"):
            from peft.utils.integrations import dequantize_module_weight

            w = dequantize_module_weight(layer)
        else:
            w = layer.weight.detach()
        w = w.float()
        return w.T if self.transposed else w

    def subtract(self, layer: nn.Module, delta: Tensor) -> None:
        """`W ← W − delta` in place, in the weight's own dtype (delta is m×n)."""
        if not self.writable:
            raise TypeError(f"{self.name} weights cannot be written; use policy='zero'")
        w = layer.weight
        d = laid_out_like(delta.T if self.transposed else delta, w, torch.float32)  # sharded like W under FSDP
        with torch.no_grad():
            if w.dtype == torch.float32:
                w.sub_(d)  # the same rounding as below, without an m×n temporary
            else:
                w.copy_((w.float() - d).to(w.dtype))

    def shape(self, layer: nn.Module) -> tuple[int, int]:
        """(m, n) = (out_features, in_features)."""
        if self.name.startswith("bnb") or self.name == "linear":
            return layer.out_features, layer.in_features
        n, m = layer.weight.shape
        return m, n


_LINEAR = LayerKind("linear", transposed=False, writable=True)
_CONV1D = LayerKind("conv1d", transposed=True, writable=True)
_BNB4 = LayerKind("bnb-4bit", transposed=False, writable=False)
_BNB8 = LayerKind("bnb-8bit", transposed=False, writable=False)


def base_layer(module: nn.Module) -> nn.Module:
    """The layer that holds the weight: PEFT's wrapper's base layer, or the module itself."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The `LayerKind` of a (possibly PEFT-wrapped) module, or None if unsupported."""
    layer = base_layer(module)
    cls = type(layer).__name__
    if cls == "Linear4bit":
        return _BNB4
    if cls == "Linear8bitLt":
        return _BNB8
    if isinstance(layer, nn.Linear):
        return _LINEAR
    if cls == "Conv1D" and hasattr(layer, "nf"):
        return _CONV1D
    return None


def canonical_name(name: str) -> str:
    """A module name without PEFT's wrapper prefix and FSDP1's wrapper segments, so a plain, a PEFT and an
    FSDP-wrapped model agree on keys."""
    name = name.replace(FSDP1_SEGMENT, "")
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def supported(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules of a supported kind; the others are skipped with a warning that names them."""
    import warnings

    keep = {n: m for n, m in modules.items() if layer_kind(m) is not None}
    skipped = [f"{n} ({type(base_layer(m)).__name__})" for n, m in modules.items() if n not in keep]
    if skipped:
        warnings.warn(f"fisher-lora skips unsupported layers: {', '.join(skipped)}", stacklevel=3)
    if not keep:
        raise ValueError("no adapted layer is of a supported kind (nn.Linear, Conv1D, bitsandbytes Linear)")
    return keep


def find_targets(model: nn.Module, target_modules: str | list[str] | set[str]) -> dict[str, nn.Module]:
    """Modules to adapt, keyed by canonical name, with PEFT's matching rules.

    `target_modules` is a regex (full match, as in PEFT), a list of name suffixes, or `"all-linear"`.
    Unsupported layer kinds among the matches are skipped with a warning; no match at all is an error.
    """
    found = {
        canonical_name(raw): module
        for raw, module in model.named_modules()
        if ".base_layer" not in raw and ".lora_" not in raw and _matches(canonical_name(raw), module, target_modules)
    }
    if not found:
        raise ValueError(
            f"target_modules={target_modules!r} matches no layer; "
            "pass module name suffixes such as ['q_proj', 'v_proj'] or 'all-linear'"
        )
    return supported(found)


def _matches(name: str, module: nn.Module, targets: str | list[str] | set[str]) -> bool:
    if targets == "all-linear":
        return layer_kind(module) is not None and not name.endswith(("lm_head", "score", "classifier"))
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
