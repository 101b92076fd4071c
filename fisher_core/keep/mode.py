"""Whether a run whitens by the keep data's factors: `keep_knowledge` as set, or what `auto` resolves to.

`auto` turns keep mode on where it was measured and can run without more input (docs/design.md §7): a chat
model — the tokenizer has a chat template and the model generates, so its own answers to the shipped
instructions can be made — whose base is not quantized (keep mode is untested on bitsandbytes: greedy
generation on a 4-bit base failed inside bitsandbytes' CPU kernel in our tests), or whenever the user gave
`keep_data`. Under FSDP1, FSDP2 and ZeRO-3 it writes what the whole model writes given the same answers
(tests/distributed). Anywhere else the task's own factors are used, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn

from fisher_core.config import FisherConfig
from fisher_core.estimate.objective import can_generate, unwrapped
from fisher_core.layers import layer_kind


class KeepMode(NamedTuple):
    """The resolved switch and, for `auto`, why (one clause, for the log)."""

    on: bool
    why: str = ""


def keep_mode(
    config: FisherConfig, tokenizer: Any | None, model: nn.Module, layers: Mapping[str, nn.Module]
) -> KeepMode:
    """`config.keep_knowledge` when it is a bool; for `auto` the first rule that applies, in this order: a selector
    other than `natural` → off; `keep_data` given → on; a quantized base (among the adapted `layers`) → off; no
    tokenizer, or one without a chat template → off; a model that cannot generate → off; else on (a chat model
    keeps its own answers; whole or sharded parameters alike)."""
    if config.keep_knowledge != "auto":
        return KeepMode(bool(config.keep_knowledge))
    if config.selector != "natural":
        return KeepMode(False, f"selector {config.selector!r} reads no mean gradient")
    if config.keep_data is not None:
        return KeepMode(True, "keep_data given")
    quantized = sorted({layer_kind(m).name for m in layers.values() if not layer_kind(m).writable})
    if quantized:
        return KeepMode(False, f"untested on a {quantized[0]} base; set keep_knowledge=True to use it there")
    if tokenizer is None:
        return KeepMode(False, "no tokenizer to make keep data with; pass tokenizer=... to keep a chat model's answers")
    if not getattr(tokenizer, "chat_template", None):
        return KeepMode(False, "not a chat model (its tokenizer has no chat template)")
    if not can_generate(model):
        return KeepMode(False, f"{type(unwrapped(model)).__name__} cannot generate its own answers")
    return KeepMode(True, "a chat model: keeps its own answers to the shipped instructions")
