"""Hook plumbing: record layer inputs `x_t` and output gradients `g_t` without weight gradients.

Forward hooks add `x_tᵀ x_t` of the kept positions to the layer's input sum at once (nothing is
stored, except `x` for Ḡ when a selector needs it); a tensor hook on the layer output adds
`g_tᵀ g_t` when the backward reaches it. The graph is kept alive by making the input embeddings'
output require grad; no parameter's `requires_grad` is touched. Every change to the model is undone
when the context exits, also on an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fisher_core.estimate.factors import StatsAccumulator
from fisher_core.sharded import sharding


@dataclass
class PassState:
    """What the hooks need to know about the current forward/backward."""

    mask: Tensor | None = None  # [B, T] bool: positions that count as samples
    record_input: bool = True
    grad_weight: float = 1.0  # weight of g gᵀ in this backward (1/mc_samples for `true`)
    record_grad_cov: bool = True
    record_mean_grad: bool = False
    saved_inputs: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # x (and x·Ω) for Ḡ
    seen_inputs: dict[int, tuple[str, Tensor]] = field(default_factory=dict)
    grouped: bool = False  # input groups are fixed after the first forward
    unmasked: set[str] = field(default_factory=set)  # layers whose shapes did not match the mask
    leaves: list[Tensor] = field(default_factory=list)  # what the input-gradient backward targets
    supervised: int = 0  # supervised units seen (tokens or sequences); 0 at the end is an error


def _rows(t: Tensor, state: PassState, name: str) -> Tensor:
    """Flatten `[..., d]` to `[k, d]`, keeping only the masked positions when shapes line up."""
    mask = state.mask
    if mask is not None and t.dim() >= 2 and t.shape[:-1] == mask.shape:
        return t[mask]
    if mask is not None and t.dim() > 2:  # a [B, d] input (e.g. a pooler) has one row per sequence: no mask
        state.unmasked.add(name)
    return t.reshape(-1, t.shape[-1])


@contextlib.contextmanager
def recording(
    model: nn.Module, modules: Mapping[str, nn.Module], acc: StatsAccumulator, state: PassState
) -> Iterator[None]:
    """Attach the recording hooks for the duration of the context; always detach them."""
    handles = [m.register_forward_hook(_forward_hook(name, acc, state)) for name, m in modules.items()]
    embeddings = input_embeddings(model)
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(_require_grad(state)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        state.saved_inputs.clear()


def _forward_hook(name: str, acc: StatsAccumulator, state: PassState):
    layer = acc.layers[name]

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return  # e.g. a reference forward under no_grad: not part of the objective's graph
        x = args[0] if args else None
        if x is None:
            return
        if not state.grouped:  # the same tensor object read by several layers (q/k/v; gate/up)
            layer.input_group = state.seen_inputs.setdefault(id(x), (name, x))[0]
        rows = _rows(x.detach(), state, name)  # masked once, for both uses below
        projected = None  # x·Ω of a sketched input factor, reused by the layer's sketch of Ḡ
        if state.record_input:
            layer.tokens += rows.shape[0]
            if layer.input_group == name:
                projected = layer.input_sum.add_outer(rows)
        if state.record_mean_grad:
            state.saved_inputs[name] = (rows, projected)
        output.register_hook(_grad_hook(name, acc, state))

    return hook


def _grad_hook(name: str, acc: StatsAccumulator, state: PassState):
    layer = acc.layers[name]

    def hook(grad: Tensor) -> None:
        g = _rows(grad.detach(), state, name)
        projected = None  # g·Ω_G of a sketched gradient factor
        if state.record_grad_cov:
            projected = layer.grad_sum.add_outer(g, weight=state.grad_weight)
        if state.record_mean_grad:
            x, x_projected = state.saved_inputs.pop(name)
            layer.mean_grad_sum.add_outer(g, other=x, rows_projected=projected, other_projected=x_projected)

    return hook


def _require_grad(state: PassState):
    """Make the embeddings' output the root of the graph, and the target of the backward."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return output
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        state.leaves.append(output)
        return output

    return hook


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embedding module, if it has one."""
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except NotImplementedError:
        return None


@contextlib.contextmanager
def estimation_mode(model: nn.Module) -> Iterator[None]:
    """eval mode (no dropout) and gradient checkpointing off; both restored exactly on exit.

    Checkpointing re-runs forwards during the backward, which would record inputs twice.
    """
    modes = {m: m.training for m in model.modules()}
    checkpointing = {m: m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    try:
        model.eval()
        for m in checkpointing:
            m.gradient_checkpointing = False
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, flag in checkpointing.items():
            m.gradient_checkpointing = flag


@contextlib.contextmanager
def zero_adapters_bypassed(model: nn.Module) -> Iterator[None]:
    """Skip the LoRA branch of the model's layers whose adapters are all still zero (`B = 0`), restored on exit.

    Their output is the base layer's, exactly; computing `B·A·x` only to add zeros costs a rank-r matmul,
    a scale and an add of the full output per layer (≈ 10 % of the pass at Llama-3-8B width). Only
    unmerged, variant-free (plain LoRA) layers are bypassed, through PEFT's own `disable_adapters` flag.
    """
    if sharding(model) in ("FSDP1", "ZeRO-3"):  # B is this process's shard here: "is it zero" is not a global answer
        yield
        return
    bypassed = [
        m
        for m in model.modules()
        if hasattr(m, "_disable_adapters")
        and not m._disable_adapters
        and not getattr(m, "merged", False)
        and not getattr(m, "lora_variant", None)
        and isinstance(getattr(m, "lora_B", None), nn.ModuleDict)
        and not any(bool(b.weight.detach().any()) for b in m.lora_B.values())
    ]
    try:
        for m in bypassed:
            m._disable_adapters = True
        yield
    finally:
        for m in bypassed:
            m._disable_adapters = False
