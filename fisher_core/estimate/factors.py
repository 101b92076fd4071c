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


@dataclass
class LayerStats:
    """Averaged statistics of one adapted layer. `input_cov` may be shared with sibling layers."""

    input_cov: Tensor
    grad_cov: Tensor
    num_tokens: int
    mean_grad: Tensor | None = None
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


class _Sum:
    """A fp32 running sum of outer products and how many rows went into it."""

    def __init__(self) -> None:
        self.total: Tensor | None = None

    def add_outer(self, rows: Tensor, weight: float = 1.0, other: Tensor | None = None) -> None:
        """total += weight · rowsᵀ · other (other defaults to rows); rows: [k, d]."""
        rows = rows.float()
        right = rows if other is None else other.float()
        with torch.autocast(rows.device.type, enabled=False):  # hooks run inside the model's autocast region
            update = rows.T @ right
        if weight != 1.0:
            update.mul_(weight)
        self.total = update if self.total is None else self.total.add_(update)


@dataclass
class LayerAccumulator:
    """Running sums for one layer while batches stream through the model."""

    in_features: int
    out_features: int
    input_sum: _Sum = field(default_factory=_Sum)
    grad_sum: _Sum = field(default_factory=_Sum)
    mean_grad_sum: _Sum | None = None
    input_group: str = ""
    tokens: int = 0


class StatsAccumulator:
    """Collects sums for a set of layers; `finalize` all-reduces (if distributed) and averages."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], with_mean_grad: bool) -> None:
        self.layers = {
            name: LayerAccumulator(n, m, mean_grad_sum=_Sum() if with_mean_grad else None)
            for name, (m, n) in shapes.items()
        }

    def finalize(self, fisher_type: str, num_batches: int) -> FisherStats:
        """Average the sums: S = Σ/N. Layers sharing an input share one `input_cov` tensor."""
        from fisher_core.estimate.distributed import all_reduce_sums

        all_reduce_sums(self.layers)
        shared: dict[str, Tensor] = {}
        out: dict[str, LayerStats] = {}
        for name, acc in self.layers.items():
            if acc.tokens == 0:
                raise RuntimeError(
                    f"layer {name!r} saw no tokens: its forward never ran with gradients enabled "
                    "or every position was masked out"
                )
            group = acc.input_group or name
            if group not in shared:
                leader = self.layers[group]
                shared[group] = _mean(leader.input_sum, leader.tokens, leader.in_features)
            mean_grad = None
            if acc.mean_grad_sum is not None:
                mean_grad = _mean(acc.mean_grad_sum, acc.tokens, acc.in_features, rows=acc.out_features)
            out[name] = LayerStats(
                input_cov=shared[group],
                grad_cov=_mean(acc.grad_sum, acc.tokens, acc.out_features),
                num_tokens=acc.tokens,
                mean_grad=mean_grad,
                input_group=group,
            )
        return FisherStats(out, fisher_type=fisher_type, num_batches=num_batches)


def _mean(s: _Sum, tokens: int, cols: int, rows: int | None = None) -> Tensor:
    if s.total is None:
        return torch.zeros(rows or cols, cols)
    return s.total / tokens
