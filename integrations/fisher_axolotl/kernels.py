"""Axolotl's fused LoRA kernels (`lora_mlp_kernel`, `lora_qkv_kernel`, `lora_o_kernel`,
`lora_embedding_kernel`) replace module methods with autograd functions that do the base and LoRA
matmuls themselves, so `nn.Linear.forward` never runs and the statistics hooks would see nothing.

`plain_lora_forward` routes every patched module back through its ordinary forward for the duration
of the statistics pass and puts the kernels back afterwards; training still uses the kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

from torch import nn

# Instance attributes axolotl.monkeypatch.lora_kernels.apply_lora_kernel_patches may set.
PATCHED_ATTRS = ("apply_qkv", "apply_o", "forward", "apply_in_proj_fused", "apply_out_proj")
_PATCH_MODULE = "axolotl.monkeypatch.lora_kernels"


def is_fused_kernel(method: object) -> bool:
    """True for a bound method that is one of Axolotl's fused LoRA kernels (not a plain fallback)."""
    if not isinstance(method, MethodType):
        return False
    func = method.__func__
    module = getattr(func, "__module__", "") or ""
    return module.startswith("axolotl.kernels") or (
        module == _PATCH_MODULE and not func.__name__.startswith("original")
    )


def _plain_method(module: nn.Module, attr: str) -> MethodType | None:
    """The unfused replacement for `attr`, or None when the class's own method takes over once the
    instance attribute is removed."""
    if hasattr(type(module), attr):
        return None
    from axolotl.monkeypatch import lora_kernels

    if attr == "apply_qkv":
        plain = lora_kernels.original_apply_qkv
        if getattr(module, "v_proj", None) is None:
            plain = lora_kernels.original_apply_qkv_optional_v
        return MethodType(plain, module)
    if attr == "apply_o":
        return MethodType(lora_kernels.original_apply_o, module)
    raise RuntimeError(
        f"fisher-lora cannot run {type(module).__name__}.{attr} without Axolotl's fused LoRA kernel, so the "
        "Fisher statistics would miss its layers; set lora_qkv_kernel: false and lora_o_kernel: false"
    )


@contextmanager
def plain_lora_forward(model: nn.Module) -> Iterator[int]:
    """Undo Axolotl's fused-LoRA-kernel patches on `model` inside the block; yields how many were undone."""
    undone: list[tuple[nn.Module, str, MethodType]] = []
    try:
        for module in model.modules():
            for attr in PATCHED_ATTRS:
                fused = module.__dict__.get(attr)
                if not is_fused_kernel(fused):
                    continue
                plain = _plain_method(module, attr)
                undone.append((module, attr, fused))
                if plain is None:
                    delattr(module, attr)
                else:
                    setattr(module, attr, plain)
        yield len(undone)
    finally:
        for module, attr, fused in reversed(undone):
            setattr(module, attr, fused)
