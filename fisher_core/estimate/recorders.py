"""Recording `x_t` and `g_t` of every adapted layer: one `LayerRecorder` per layer, owned by `Recorders`.

A layer's forward hook adds `x_tᵀ x_t` of the kept positions to its input sum at once (nothing is stored,
except `x` for `Ḡ` when a selector needs it); a tensor hook on its output adds `g_tᵀ g_t` and `g_t x_tᵀ`
when the backward reaches it. What a backward records (which sums, with which weight) is a `Record` the
driver hands to `Recorders.backward` for that one backward; a forward that runs while a backward does is
a checkpointing replay. Each `LayerRecorder` owns what it holds: its input rows for `Ḡ` until its gradient
arrives and, in a checkpointed block, the half of the (x, g) pair that came first (docs/design.md §4).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fisher_core.estimate.factors import StatsAccumulator
from fisher_core.estimate.hooks import input_embeddings, rooted
from fisher_core.estimate.objective import DECODER, INPUT, is_encoder_decoder, subsample


@dataclass(frozen=True)
class Record:
    """What one backward adds: `weight · g gᵀ` to `S_G` (`grad_cov`), and `g xᵀ` to `Ḡ` (`mean_grad`)."""

    grad_cov: bool
    mean_grad: bool
    weight: float = 1.0


class InputRows:
    """The batch's sample positions, and the layer inputs seen in its forward: each input tensor's rows
    are masked once for every layer that reads it (q/k/v, gate/up), and so is their projection `x·Ω` by the
    input factors' test matrix (one per width, `sums.SketchMatrices`); its first reader names the group
    whose `S_A` those layers share (fixed after the first batch).

    Positions are counted per sequence (`objective.INPUT`, and an encoder–decoder model's `DECODER`): a
    tensor `[..., T, d]` whose leading shape is its sequence's mask takes that mask. `position_fraction < 1`
    keeps each position with that probability, one draw per (sequence, leading shape) and batch, shared by
    `x` and `g` — also where the batch has no mask (pixel inputs: the patch positions)."""

    def __init__(self, fraction: float = 1.0, generator: torch.Generator | None = None) -> None:
        self.fraction, self.generator = fraction, generator
        self.counted: Mapping[str, Tensor | None] = {}  # per sequence, [B, T] bool: the positions that count
        self.grouped = False
        self.unmasked: set[str] = set()  # layers whose input shape did not match their sequence's mask
        self._drawn: dict[tuple[str, torch.Size], Tensor | None] = {}  # this batch's masks, as drawn
        self._last: tuple[weakref.ref, Tensor, str, Tensor | None] | None = None  # x, its rows, reader, rows·Ω
        self._seen: dict[int, tuple[str, weakref.ref]] = {}

    def begin(self, counted: Mapping[str, Tensor | None]) -> None:
        """This batch's counted positions per sequence (None: every position)."""
        self.counted, self._drawn = counted, {}

    def rows(self, x: Tensor, name: str, sequence: str = INPUT) -> Tensor:
        """`x` as `[k, d]` rows at the kept positions, computed once for consecutive readers of `x`."""
        last = self._last
        if last is not None and last[0]() is x:
            if last[2] in self.unmasked:
                self.unmasked.add(name)
            return last[1]
        rows = self.of(x.detach(), name, sequence)
        self._last = (weakref.ref(x), rows, name, None)
        return rows

    def keep_projection(self, rows: Tensor, projected: Tensor | None) -> None:
        """`rows·Ω` as the group's leader computed it (None: its input factor is dense), kept with the rows."""
        if self._last is not None and self._last[1] is rows:
            self._last = (*self._last[:3], projected)

    def projection(self, rows: Tensor) -> Tensor | None:
        """The leader's `rows·Ω` for the same rows object, else None."""
        last = self._last
        return last[3] if last is not None and last[1] is rows else None

    def of(self, t: Tensor, name: str, sequence: str = INPUT) -> Tensor:
        """Flatten `[..., d]` to `[k, d]`, keeping only the sampled positions (a `[B, d]` input, e.g. a pooler's,
        has one row per sequence: all kept)."""
        if t.dim() <= 2:
            return t.reshape(-1, t.shape[-1])
        counted = self.counted.get(sequence)
        if counted is not None and t.shape[:-1] != counted.shape:
            self.unmasked.add(name)
        mask = self._mask(sequence, t.shape[:-1])
        return t.reshape(-1, t.shape[-1]) if mask is None else t[mask]

    def _mask(self, sequence: str, shape: torch.Size) -> Tensor | None:
        """The batch's mask of `sequence` for inputs of leading `shape`, subsampled once (None: every row)."""
        key = (sequence, shape)
        if key not in self._drawn:
            counted = self.counted.get(sequence)
            mask = counted if counted is not None and counted.shape == shape else None
            if self.fraction < 1.0:
                mask = subsample(mask, shape, self.fraction, self.generator)
            self._drawn[key] = None if mask is None or bool(mask.all()) else mask  # all: no indexing
        return self._drawn[key]

    def first_reader(self, x: Tensor, name: str) -> str:
        """The first layer that read the tensor `x` in this forward (`name` if none did). Held by weak
        reference: keeping every layer's input alive until the batch ends would cost a whole forward's
        activations (a dead entry's id may be reused by a new tensor, which then starts a new group)."""
        seen = self._seen.get(id(x))
        if seen is None or seen[1]() is not x:
            self._seen[id(x)] = seen = (name, weakref.ref(x))
        return seen[0]

    def end_batch(self) -> None:
        self.grouped = True
        self._seen.clear()
        self._last, self._drawn = None, {}


Held = tuple[Tensor, Tensor | None]  # rows, and their projection by a sketched factor's test matrix (or None)


class LayerRecorder:
    """One adapted layer's hooks and what they hold between its forward and its gradient."""

    def __init__(self, name: str, acc: StatsAccumulator, recorders: Recorders, replayed: bool) -> None:
        self.name, self.acc, self.layer = name, acc, acc.layers[name]  # the layer's sums
        self.recorders, self.replayed = recorders, replayed  # replayed: inside a checkpointed block
        self.inputs: list[list[Held]] = []  # per call: x for Ḡ until its g arrives (a block not checkpointed)
        self.half: tuple[Tensor | None, Held | None] | None = None  # (x, g) of a replayed layer, the first to come
        self.sequence: str | None = None  # whose positions its rows are (objective.INPUT or DECODER), on first call
        self.entry = -1  # the checkpointed block's forward it was last called in (Recorders.entries)

    def forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return  # e.g. a reference forward under no_grad: not part of the objective's graph
        x = args[0] if args else None
        if x is None:
            return
        rows = self.recorders.inputs
        record = self.recorders.record
        if record is not None:  # a forward inside a backward: a checkpointing replay, counted already but Ḡ's x
            if record.mean_grad and self.replayed:
                self._meet(x=rows.rows(x, self.name, self.sequence))
            return
        if self.sequence is None:
            self.sequence = self.recorders.sequence_of(self.name, x)
        if self.replayed:
            self._check_once_per_block()
        if not rows.grouped:  # the same tensor object read by several layers (q/k/v; gate/up)
            self.layer.input_group = rows.first_reader(x, self.name)
            if self.layer.input_group != self.name:
                self.acc.drop_input(self.name)
        x_rows = rows.rows(x, self.name, self.sequence)  # masked once, for both uses below and the layers sharing x
        self.layer.tokens += x_rows.shape[0]
        if self.layer.input_group == self.name:
            projected = self.layer.input_sum.add_outer(x_rows)
            rows.keep_projection(x_rows, projected)
        else:  # the group leader's x·Ω: the same test matrix as this layer's Ḡ sketch
            projected = rows.projection(x_rows)
        held: list[Held] = []  # this call's input, handed to its own gradient's hook (which empties it)
        if self.recorders.holds_inputs and not self.replayed:
            held.append((x_rows, projected))  # projected: x·Ω of a sketched input factor, reused by Ḡ's sketch
            self.inputs.append(held)
            self.recorders.holding.add(self)
        # the hook carries this call's input: a layer called twice in one forward pairs each g with its own x
        output.register_hook(lambda grad: self.backward(grad, held))

    def backward(self, grad: Tensor, held: list[Held]) -> None:
        record = self.recorders.record
        if record is None:  # a backward the pass did not run records nothing
            return
        g = self.recorders.inputs.of(grad.detach(), self.name, self.sequence)
        projected = self.layer.grad_sum.add_outer(g, weight=record.weight) if record.grad_cov else None
        if not record.mean_grad:
            return
        if self.replayed:
            self._meet(g=(g, projected))
            return
        x, x_projected = held.pop()  # freed here, not when the graph goes
        self.inputs = [box for box in self.inputs if box]
        if not self.inputs:
            self.recorders.holding.discard(self)
        self.layer.mean_grad_sum.add_outer(g, other=x, rows_projected=projected, other_projected=x_projected)

    def _check_once_per_block(self) -> None:
        """The replay gives a block's inputs in call order, its gradients come in reverse: one (x, g) slot pairs
        them only for a layer called once per block forward."""
        if self.entry == self.recorders.entries:
            raise RuntimeError(
                f"layer {self.name!r} is called twice inside one checkpointed block, whose replay cannot pair its "
                "inputs with their gradients; turn gradient checkpointing off for the statistics "
                "(model.gradient_checkpointing_disable()) and leave memory_budget unset"
            )
        self.entry = self.recorders.entries

    def _meet(self, x: Tensor | None = None, g: Held | None = None) -> None:
        """Ḡ += g xᵀ for a layer in a checkpointed block, once both halves arrived (in either order)."""
        if self.half is None:
            self.half = (x, g)
            self.recorders.holding.add(self)
            self.recorders.note_held()  # a checkpointed block's peak comes during the backward, in its replay
            return
        (x_first, g_first), self.half = self.half, None
        self.recorders.holding.discard(self)
        g_rows, g_projected = g if g is not None else g_first
        self.layer.mean_grad_sum.add_outer(g_rows, other=x if x is not None else x_first, rows_projected=g_projected)

    def held(self) -> Iterator[Tensor]:
        """The tensors this layer holds for Ḡ now."""
        for box in self.inputs:
            yield from (t for held in box for t in held if t is not None)
        if self.half is not None:
            x, g = self.half
            yield from (t for t in (x, g[0] if g is not None else None) if t is not None)


class Recorders:
    """Every adapted layer's `LayerRecorder`, the roots the backward targets, and the `Record` of the backward
    now running (None between backwards; set only by `backward`)."""

    def __init__(
        self, acc: StatsAccumulator, modules: Mapping[str, nn.Module], replayed: frozenset[str], holds_inputs: bool,
        inputs: InputRows | None = None,
    ) -> None:  # fmt: skip
        self.modules, self.holds_inputs = modules, holds_inputs
        self.layers = {name: LayerRecorder(name, acc, self, name in replayed) for name in modules}
        self.inputs = inputs or InputRows()
        self.decoder: frozenset[str] = frozenset()  # layers inside an encoder–decoder model's decoder
        self._encoder_output: weakref.ref | None = None  # that model's encoder output in this forward
        self.record: Record | None = None
        self.leaves: list[Tensor] = []  # what the input-gradient backward targets
        self.held_peak = 0  # the most bytes held for Ḡ at once (this process, any batch)
        self.holding: set[LayerRecorder] = set()  # the layers holding something for Ḡ now
        self.entries = 0  # checkpointed block forwards so far (not their replays)

    @contextlib.contextmanager
    def attached(self, model: nn.Module, blocks: Iterable[nn.Module] = ()) -> Iterator[Recorders]:
        """The layers' forward hooks (and the embeddings' root hooks, the checkpointed `blocks`' entry count) for
        the duration; always removed."""
        handles = [m.register_forward_hook(self.layers[name].forward) for name, m in self.modules.items()]
        handles += [block.register_forward_pre_hook(self._entered) for block in blocks]
        stacks = [model]
        if is_encoder_decoder(model):  # each stack may embed with its own module (tied weights, not one module)
            encoder, decoder = model.get_encoder(), model.get_decoder()
            stacks += [encoder, decoder]
            inside = {id(m) for m in decoder.modules()}
            self.decoder = frozenset(name for name, m in self.modules.items() if id(m) in inside)
            handles.append(encoder.register_forward_hook(self._encoded))
        embeddings = {id(e): e for e in map(input_embeddings, stacks) if e is not None}
        handles += [e.register_forward_hook(self._root) for e in embeddings.values()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._release()

    def begin_batch(self, counted: Mapping[str, Tensor | None], leaves: list[Tensor]) -> None:
        """Per sequence, the positions that count (`objective.position_masks`); the float inputs rooted."""
        self.inputs.begin(counted)
        self.leaves = leaves

    def sequence_of(self, name: str, x: Tensor) -> str:
        """Whose positions a layer's rows are: an encoder–decoder model's decoder layers read decoder positions,
        except those reading the encoder's output (cross-attention keys and values); every other layer, input
        positions. Decided by the module and the tensor, not by a shape two sequences may share."""
        encoded = self._encoder_output() if self._encoder_output is not None else None
        return DECODER if name in self.decoder and x is not encoded else INPUT

    def _entered(self, module: nn.Module, args: tuple) -> None:
        if self.record is None:  # a block's forward, not its replay inside a backward
            self.entries += 1

    def _encoded(self, module: nn.Module, args: tuple, output: object) -> None:
        hidden = output if isinstance(output, Tensor) else output[0]
        self._encoder_output = weakref.ref(hidden) if isinstance(hidden, Tensor) else None

    def end_batch(self) -> None:
        """Input groups are fixed after the first batch; what identified this batch's inputs is dropped, and
        so is what a layer held for a gradient that never came (a loss that does not reach it)."""
        self.note_held()
        self.inputs.end_batch()
        self._release()

    def _release(self) -> None:
        for layer in self.layers.values():
            for box in layer.inputs:
                box.clear()  # the gradient hook holding it lives until the graph goes
            layer.inputs, layer.half = [], None
        self.holding.clear()

    def backward(self, loss: Tensor, record: Record, retain: bool) -> None:
        """One input-gradient backward of `loss` recording `record`: no parameter gets a `.grad`."""
        self.record = record
        self.note_held()  # after the forward, before any gradient: the peak of a pass that does not checkpoint
        try:
            torch.autograd.grad(loss, self.leaves, retain_graph=retain, allow_unused=True)
        finally:
            self.record = None

    def unpaired(self) -> list[str]:
        """Replayed layers whose input and output gradient never met (Ḡ would miss them)."""
        return sorted(name for name, layer in self.layers.items() if layer.half is not None)

    def note_held(self) -> None:
        """Update `held_peak` with the bytes now kept for Ḡ (a storage shared by layers counted once); it reads
        only the layers holding something, so calling it per replayed layer costs O(one block), not O(model)."""
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for layer in self.holding for t in layer.held()
        }
        self.held_peak = max(self.held_peak, sum(storages.values()))

    def _root(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Make the embeddings' output the root of the graph, and the target of the backward."""
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return output
        if output.requires_grad:
            self.leaves.append(output)
            return output
        return rooted(output, self.leaves)
