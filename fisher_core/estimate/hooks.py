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
import logging
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from fisher_core.sharded import sharding

logger = logging.getLogger("fisher_core")


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
    that checkpoint from the model's own loop), and every flag when this transformers no longer routes its
    blocks' checkpointing as `_block_checkpointing` expects, are turned off for the pass.
    """
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    modes = {m: m.training for m in model.modules()}
    flags = {m: m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    inherited = {m for m in flags if "gradient_checkpointing" not in vars(m)}
    wanted = {m for m, on in flags.items() if (on or checkpoint_all) and _is_checkpointing_layer(m)}
    blocks = wanted if not wanted or block_checkpointing_routed() else set()
    if wanted and not blocks:
        logger.warning(
            "fisher-lora: this transformers does not checkpoint its blocks through `%s`: the statistics pass runs "
            "without checkpointing (it holds every adapted layer's input for Ḡ until its gradient arrives)",
            _PRIVATE_FUNC,
        )
    check = "none" if sharding(model) == "ZeRO-3" else "default"  # see the docstring
    func = functools.partial(checkpoint, use_reentrant=False, determinism_check=check)
    try:
        model.eval()
        for m in flags:
            m.gradient_checkpointing = m in blocks
        for m in blocks:
            m.training = True
        with _block_checkpointing(blocks, func), set_checkpoint_early_stop(False):
            yield blocks
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, flag in flags.items():
            if m in inherited:  # the class's default: no instance attribute left behind
                delattr(m, "gradient_checkpointing")
            else:
                m.gradient_checkpointing = flag


# transformers' checkpointed block calls `self._gradient_checkpointing_func(forward, *args)`; it has no public way
# to set that function for a while and put the user's back (its `activation_checkpointing_enable`, formerly
# `gradient_checkpointing_enable`, replaces it for good and changes the input embeddings' hooks), so this name
# is read and written in `_block_checkpointing` only, after `block_checkpointing_routed` checked it is still used.
_PRIVATE_FUNC = "_gradient_checkpointing_func"


@functools.cache
def block_checkpointing_routed() -> bool:
    """Whether transformers' `GradientCheckpointingLayer`, checkpointing in training mode, calls its block through
    `_PRIVATE_FUNC` (run once on a one-line layer, not read from transformers' source)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False

    class Probe(GradientCheckpointingLayer):
        def forward(self, x: Tensor) -> Tensor:
            return x

    calls: list[bool] = []
    probe = Probe()
    probe.gradient_checkpointing = True
    setattr(probe, _PRIVATE_FUNC, lambda fn, *args: calls.append(True) or fn(*args))
    with torch.enable_grad():
        probe(torch.zeros(1, requires_grad=True))
    return bool(calls)


@contextlib.contextmanager
def _block_checkpointing(blocks: set[nn.Module], checkpoint: Callable) -> Iterator[None]:
    """Each block's `_PRIVATE_FUNC` is `checkpoint` run in eval mode (`_checkpoint_in_eval`) for the duration;
    the block's own function (or none) is back on exit."""
    saved = {m: m.__dict__.get(_PRIVATE_FUNC) for m in blocks}
    try:
        for m in blocks:
            setattr(m, _PRIVATE_FUNC, _checkpoint_in_eval(m, checkpoint))
        yield
    finally:
        for m, func in saved.items():
            if func is None:
                m.__dict__.pop(_PRIVATE_FUNC, None)
            else:
                setattr(m, _PRIVATE_FUNC, func)


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
