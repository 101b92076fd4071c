"""Per-layer curvature statistics: running sums while streaming, averages when done.

For a linear layer `y = W x` and sample positions `t = 1..N`:

    S_A = (1/N) Σ_t x_t x_tᵀ        (n×n, the K-FAC input factor)
    S_G = (1/N) Σ_t g_t g_tᵀ        (m×m, the K-FAC output-gradient factor), g_t = ∂L/∂y_t
    Ḡ   = (1/N) Σ_t g_t x_tᵀ        (m×n, the mean gradient; only when a selector needs it)

with `L` the *sum* of the supervised losses of a sequence. Everything is kept as fp32 sums plus a
token count, so combining shards (processes, cache files) is one addition.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisher_core.estimate.distributed import all_reduce_in_place, global_sums
from fisher_core.estimate.sums import (
    CrossSketch,
    DenseSum,
    FactorSketch,
    LowRank,
    PsdSketch,
    RunningSum,
    SketchMatrices,
)

Factor = Tensor | FactorSketch


def group_of(input_group: str, name: str) -> str:
    """The layer whose input layer `name` reads (`name` itself unless it shares, e.g. k/v reading q's x)."""
    return input_group or name


def shares_input(input_group: str, name: str) -> bool:
    """True when layer `name` reads another layer's input: its `S_A` is that layer's (held once)."""
    return group_of(input_group, name) != name


@dataclass
class LayerStats:
    """Averaged statistics of one adapted layer. `input_cov` may be shared with sibling layers.

    Factors are dense fp32 tensors, or `FactorSketch`es when a memory budget asked for them; the
    mean gradient is dense or `LowRank`.
    """

    input_cov: Factor
    grad_cov: Factor
    num_tokens: int
    mean_grad: Tensor | LowRank | None = None
    input_group: str = ""

    @property
    def in_features(self) -> int:
        return self.input_cov.shape[0]

    @property
    def out_features(self) -> int:
        return self.grad_cov.shape[0]


@dataclass
class FisherStats(Mapping[str, LayerStats]):
    """Statistics of every adapted layer, keyed by module name (without PEFT's wrapper prefixes)."""

    layers: dict[str, LayerStats]
    fisher_type: str
    num_batches: int
    meta: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_tokens(self) -> int:
        return max((s.num_tokens for s in self.layers.values()), default=0)


@dataclass
class LayerAccumulator:
    """Running sums for one layer while batches stream through the model."""

    in_features: int
    out_features: int
    input_sum: RunningSum
    grad_sum: RunningSum
    mean_grad_sum: RunningSum | None = None
    input_group: str = ""
    tokens: int = 0


class StatsAccumulator:
    """Collects sums for a set of layers; `finalize` all-reduces (if distributed) and averages.

    `sketched[name]` lists which of the layer's statistics ("input", "grad", "mean_grad") are kept as
    rank-`sketch_rank` sketches instead of dense matrices (see `fisher_core.estimate.plan`).
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        with_mean_grad: bool,
        sketched: Mapping[str, set[str]],
        sketch_rank: int,
        seed: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.sketch_rank = sketch_rank
        self.matrices = SketchMatrices(seed, device or torch.device("cpu"))  # every sketch's test matrices
        self.layers = {}
        for name, (m, n) in shapes.items():
            layer = LayerAccumulator(
                n,
                m,
                input_sum=self._new_sum("input", m, n, "input" in sketched.get(name, ())),
                grad_sum=self._new_sum("grad", m, n, "grad" in sketched.get(name, ())),
            )
            if with_mean_grad:
                layer.mean_grad_sum = self._new_sum("mean_grad", m, n, "mean_grad" in sketched.get(name, ()))
            self.layers[name] = layer

    def _new_sum(self, what: str, m: int, n: int, sketch: bool) -> RunningSum:
        """An empty sum for statistic `what` of an m×n layer: dense, or a rank-`sketch_rank` sketch."""
        if not sketch:
            return DenseSum({"input": (n, n), "grad": (m, m), "mean_grad": (m, n)}[what])
        if what == "mean_grad":
            return CrossSketch(m, n, self.sketch_rank, self.matrices)
        dim = n if what == "input" else m
        return PsdSketch(self.matrices(what, dim, min(self.sketch_rank, dim)))

    def sketch_more(self, sketched: Mapping[str, set[str]]) -> None:
        """Keep the statistics `sketched` names as sketches from now on, each starting from what its dense sum
        holds (exact: a sketch is linear in the sum, so it equals the one streamed from the first batch)."""
        for name, whats in sketched.items():
            layer = self.layers[name]
            for what in sorted(whats, key=("input", "grad", "mean_grad").index):
                attr = {"input": "input_sum", "grad": "grad_sum", "mean_grad": "mean_grad_sum"}[what]
                dense = getattr(layer, attr)
                unread = what == "input" and shares_input(layer.input_group, name)  # another layer's sum is its
                if not isinstance(dense, DenseSum) or unread:
                    continue
                sketch = self._new_sum(what, layer.out_features, layer.in_features, True)
                if dense.total is not None:
                    sketch.absorb(dense.total)
                setattr(layer, attr, sketch)

    def drop_input(self, name: str) -> None:
        """Free the input sum of a layer that reads another layer's input (q/k/v, gate/up): that layer's sum is
        its. Called as soon as the first forward shows it, so the sum is never held beside the batch's pass."""
        layer = self.layers[name]
        layer.input_sum = DenseSum((layer.in_features, layer.in_features))

    def finalize(self, fisher_type: str, num_batches: int) -> FisherStats:
        """Average the sums: S = Σ/N. Layers sharing an input share one `input_cov`."""
        self._all_reduce()
        shared: dict[str, Factor] = {}
        out: dict[str, LayerStats] = {}
        for name, acc in self.layers.items():
            if acc.tokens == 0:
                raise RuntimeError(
                    f"layer {name!r} saw no tokens: its forward never ran with gradients enabled "
                    "or every position was masked out"
                )
            group = group_of(acc.input_group, name)
            if group not in shared:
                leader = self.layers[group]
                shared[group] = leader.input_sum.mean(leader.tokens)
            mean_grad = None
            if acc.mean_grad_sum is not None:
                mean_grad = acc.mean_grad_sum.mean(acc.tokens)
            out[name] = LayerStats(
                input_cov=shared[group],
                grad_cov=acc.grad_sum.mean(acc.tokens),
                num_tokens=acc.tokens,
                mean_grad=mean_grad,
                input_group=group,
            )
        return FisherStats(out, fisher_type=fisher_type, num_batches=num_batches)

    def _all_reduce(self) -> None:
        """Every process's token counts and sums added (in place); a shared input sum is another layer's."""
        counts = global_sums([acc.tokens for acc in self.layers.values()])
        sums: list[RunningSum] = []
        for (name, acc), count in zip(self.layers.items(), counts, strict=True):
            acc.tokens = count
            own_input = [] if shares_input(acc.input_group, name) else [acc.input_sum]
            sums += [*own_input, acc.grad_sum, *([acc.mean_grad_sum] if acc.mean_grad_sum is not None else [])]
        all_reduce_in_place(t for s in sums for t in s.tensors())
