"""The model during the statistics pass: eval mode, checkpointed blocks, and the root of the backward.

`estimation_mode` puts the model in eval mode and keeps gradient checkpointing on where the model uses it
(transformers' checkpointed layers, run non-reentrant for the pass): a block's forward is then replayed
inside the backward, and `Ḡ = Σ g xᵀ` of a layer in a checkpointed block takes `x` from the replay, which
comes right before or after that layer's `g`, so only one block's inputs are held at a time instead of
every layer's for the whole batch. `rooted` makes a tensor the leaf the input-gradient backward targets.
Every change to the model is undone when the context exits, also on an exception.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping

from torch import Tensor, nn

from fisher_core.sharded import sharding


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
def estimation_mode(model: nn.Module, checkpoint_all: bool = False) -> Iterator[set[nn.Module]]:
    """eval mode (no dropout); every change restored exactly on exit. Yields the checkpointed blocks.
    `checkpoint_all`: checkpoint every transformers block for the pass, whatever the model's setting (a
    memory budget: the pass then holds one block's inputs for Ḡ at a time; no statistic changes).

    transformers' checkpointed layers (`GradientCheckpointingLayer` with checkpointing on) stay
    checkpointed: they alone are put in training mode (their flag gates checkpointing and drops the KV
    cache), but their own forward, and its replay, run in eval mode (no functional dropout written in
    the block, e.g. BART's `dropout(..., training=self.training)`), with torch's non-reentrant checkpoint
    (a reentrant one does not support the input-gradient `autograd.grad`), replaying the whole block (no
    early stop, so every adapted layer's hook sees the replay). Under DeepSpeed ZeRO-3 the replay skips torch's
    metadata check: ZeRO-3 releases the frozen weights the replay saved by reference (shape [0] at
    check time) and gathers them again before each module's backward, so the values used are whole
    (tested equal to the unpartitioned model). Other checkpointing flags (older transformers models
    that checkpoint from the model's own loop) are turned off for the pass.
    """
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    modes = {m: m.training for m in model.modules()}
    flags = {m: m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    check = "none" if sharding(model) == "ZeRO-3" else "default"  # see the docstring
    blocks = {m for m, on in flags.items() if (on or checkpoint_all) and _is_checkpointing_layer(m)}
    funcs = {m: m.__dict__.get("_gradient_checkpointing_func") for m in blocks}
    try:
        model.eval()
        for m in flags:
            m.gradient_checkpointing = m in blocks
        for m in blocks:
            m.training = True
            m._gradient_checkpointing_func = _checkpoint_in_eval(
                m, functools.partial(checkpoint, use_reentrant=False, determinism_check=check)
            )
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


def _checkpoint_in_eval(block: nn.Module, checkpoint: Callable) -> Callable:
    """`checkpoint(fn, *args)` whose `fn` (the block's forward, and its replay in the backward) runs with the
    block in eval mode; the training flag that routed the call here is back when it returns."""

    def run(fn: Callable, *args: object) -> object:
        def in_eval(*inner: object) -> object:
            block.training = False
            try:
                return fn(*inner)
            finally:
                block.training = True

        return checkpoint(in_eval, *args)

    return run


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
