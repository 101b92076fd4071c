"""Hook plumbing: record layer inputs `x_t` and output gradients `g_t` without weight gradients.

Forward hooks add `x_tᵀ x_t` of the kept positions to the layer's input sum at once (nothing is
stored, except `x` for Ḡ when a selector needs it); a tensor hook on the layer output adds
`g_tᵀ g_t` when the backward reaches it. The graph is kept alive by making the input embeddings'
output require grad; no parameter's `requires_grad` is touched. Every change to the model is undone
when the context exits, also on an exception.

Gradient checkpointing stays on where the model uses it (transformers' checkpointed layers, run
non-reentrant for the pass): a block's forward is then replayed inside the backward, and the hooks
ignore replays (no statistic is counted twice) — except that `Ḡ = Σ g xᵀ` of a layer in a checkpointed
block takes `x` from the replay, which comes right before or after that layer's `g`, so only one
block's inputs are held at a time instead of every layer's for the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fisher_core.estimate.factors import LayerAccumulator, StatsAccumulator
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
    replayed: frozenset[str] = frozenset()  # layers in checkpointed blocks: Ḡ pairs g with the replay's x
    halves: dict[str, tuple[Tensor | None, tuple[Tensor, Tensor | None] | None]] = field(default_factory=dict)
    last_input: tuple[weakref.ref, Tensor, str] | None = None  # the last input's rows (q/k/v read one x)
    held_peak: int = 0  # the most bytes held for Ḡ at once (this process, any batch)
    seen_inputs: dict[int, tuple[str, weakref.ref]] = field(default_factory=dict)  # id(x) → first reader, x
    grouped: bool = False  # input groups are fixed after the first forward
    unmasked: set[str] = field(default_factory=set)  # layers whose shapes did not match the mask
    leaves: list[Tensor] = field(default_factory=list)  # what the input-gradient backward targets
    supervised: int = 0  # supervised units seen (tokens or sequences); 0 at the end is an error

    def rows_of(self, x: Tensor, name: str) -> Tensor:
        """`_rows` of a layer input, computed once for consecutive layers that read the same tensor."""
        last = self.last_input
        if last is not None and last[0]() is x:
            if last[2] in self.unmasked:
                self.unmasked.add(name)
            return last[1]
        rows = _rows(x.detach(), self, name)
        self.last_input = (weakref.ref(x), rows, name)
        return rows

    def first_reader(self, x: Tensor, name: str) -> str:
        """The first layer that read the tensor `x` in this forward (`name` if none did). Held by weak
        reference: keeping every layer's input alive until the batch ends would cost a whole forward's
        activations (a dead entry's id may be reused by a new tensor, which then starts a new group)."""
        seen = self.seen_inputs.get(id(x))
        if seen is None or seen[1]() is not x:
            self.seen_inputs[id(x)] = seen = (name, weakref.ref(x))
        return seen[0]

    def end_batch(self) -> None:
        """Input groups are fixed after the first batch; what identified this batch's inputs is dropped."""
        self.grouped = True
        self.seen_inputs.clear()
        self.last_input = None

    def note_held(self) -> None:
        """Update `held_peak` with the bytes now kept for Ḡ (a storage shared by layers counted once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._held()}
        self.held_peak = max(self.held_peak, sum(storages.values()))

    def _held(self) -> Iterator[Tensor]:
        for x, xp in self.saved_inputs.values():
            yield from (t for t in (x, xp) if t is not None)
        for x, g in self.halves.values():
            yield from (t for t in (x, g[0] if g is not None else None) if t is not None)


def in_backward() -> bool:
    """Whether autograd is running a backward now (a checkpointed block's forward is then a replay)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


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
        state.halves.clear()
        state.last_input = None


def _forward_hook(name: str, acc: StatsAccumulator, state: PassState):
    layer = acc.layers[name]

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return  # e.g. a reference forward under no_grad: not part of the objective's graph
        x = args[0] if args else None
        if x is None:
            return
        if in_backward():  # a checkpointing replay: counted in the forward already, except Ḡ's x
            if state.record_mean_grad and name in state.replayed:
                _meet(layer, state, name, x=state.rows_of(x, name))
            return
        if not state.grouped:  # the same tensor object read by several layers (q/k/v; gate/up)
            layer.input_group = state.first_reader(x, name)
            if layer.input_group != name:
                acc.drop_input(name)
        rows = state.rows_of(x, name)  # masked once, for both uses below and the layers sharing x
        projected = None  # x·Ω of a sketched input factor, reused by the layer's sketch of Ḡ
        if state.record_input:
            layer.tokens += rows.shape[0]
            if layer.input_group == name:
                projected = layer.input_sum.add_outer(rows)
        if state.record_mean_grad and name not in state.replayed:
            state.saved_inputs[name] = (rows, projected)
            state.note_held()
        output.register_hook(_grad_hook(name, acc, state))

    return hook


def _grad_hook(name: str, acc: StatsAccumulator, state: PassState):
    layer = acc.layers[name]

    def hook(grad: Tensor) -> None:
        g = _rows(grad.detach(), state, name)
        projected = None  # g·Ω_G of a sketched gradient factor
        if state.record_grad_cov:
            projected = layer.grad_sum.add_outer(g, weight=state.grad_weight)
        if not state.record_mean_grad:
            return
        if name in state.replayed:
            _meet(layer, state, name, g=(g, projected))
            return
        x, x_projected = state.saved_inputs.pop(name)
        layer.mean_grad_sum.add_outer(g, other=x, rows_projected=projected, other_projected=x_projected)

    return hook


def _meet(
    layer: LayerAccumulator,
    state: PassState,
    name: str,
    x: Tensor | None = None,
    g: tuple[Tensor, Tensor | None] | None = None,
) -> None:
    """Ḡ += g xᵀ for a layer in a checkpointed block, once both halves arrived (in either order)."""
    waiting = state.halves.pop(name, None)
    if waiting is None:
        state.halves[name] = (x, g)
        state.note_held()
        return
    x = x if x is not None else waiting[0]
    (g_rows, g_projected) = g if g is not None else waiting[1]
    layer.mean_grad_sum.add_outer(g_rows, other=x, rows_projected=g_projected)


def _require_grad(state: PassState):
    """Make the embeddings' output the root of the graph, and the target of the backward."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return output
        if output.requires_grad:
            state.leaves.append(output)
            return output
        return rooted(output, state.leaves)

    return hook


def rooted(t: Tensor, leaves: list[Tensor]) -> Tensor:
    """A view of `t` as a new leaf that requires grad (the leaf appended to `leaves`, which the backward
    targets). The model reads the view, not the leaf: FSDP1 hooks a frozen unit's inputs with a multi-grad
    hook, which cannot take a leaf inside `autograd.grad` (torch's "A leaf node was passed …" error)."""
    leaf = t.detach().requires_grad_(True)
    leaves.append(leaf)
    return leaf.view_as(leaf)


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
def estimation_mode(model: nn.Module) -> Iterator[set[nn.Module]]:
    """eval mode (no dropout); every change restored exactly on exit. Yields the checkpointed blocks.

    transformers' checkpointed layers (`GradientCheckpointingLayer` with checkpointing on) stay
    checkpointed: they alone are put in training mode (their flag gates checkpointing; the modules
    inside stay in eval), and run torch's non-reentrant checkpoint for the pass (a reentrant one does
    not support the input-gradient `autograd.grad`), replaying the whole block (no early stop, so
    every adapted layer's hook sees the replay). Under DeepSpeed ZeRO-3 the replay skips torch's
    metadata check: ZeRO-3 releases the frozen weights the replay saved by reference (shape [0] at
    check time) and gathers them again before each module's backward, so the values used are whole
    (tested equal to the unpartitioned model). Other checkpointing flags (older transformers models
    that checkpoint from the model's own loop) are turned off for the pass.
    """
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    modes = {m: m.training for m in model.modules()}
    flags = {m: m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    check = "none" if sharding(model) == "ZeRO-3" else "default"  # see the docstring
    blocks = {m for m, on in flags.items() if on and _is_checkpointing_layer(m)}
    funcs = {m: m.__dict__.get("_gradient_checkpointing_func") for m in blocks}
    try:
        model.eval()
        for m in flags:
            m.gradient_checkpointing = m in blocks
        for m in blocks:
            m.training = True
            m._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False, determinism_check=check)
        with set_checkpoint_early_stop(False):
            yield blocks
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, flag in flags.items():
            m.gradient_checkpointing = flag
        for m, func in funcs.items():
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


def replayed_layers(modules: Mapping[str, nn.Module], blocks: set[nn.Module]) -> frozenset[str]:
    """The adapted layers inside checkpointed blocks."""
    inside = {id(sub) for block in blocks for sub in block.modules()}
    return frozenset(name for name, m in modules.items() if id(m) in inside)


def _is_checkpointing_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: its models checkpoint from their own loop
        return False
    return isinstance(module, GradientCheckpointingLayer)
