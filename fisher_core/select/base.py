"""What every selector returns: the top-k candidate components of one layer, best first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats


@dataclass
class Candidates:
    """k components `s·B[:, i]·A[i]`, ordered by `scores` (descending).

    `total` is the layer's whole scored mass (the sum over every component, including those not
    computed), so the first r components capture `scores[:r].sum() / total` of it.
    """

    B: Tensor  # m×k
    A: Tensor  # k×n
    scores: Tensor
    total: float


@dataclass(frozen=True)
class Solver:
    """How much of each spectrum to compute: all of it (`sketch=None`) or the top `sketch`."""

    sketch: int | None
    seed: int = 0

    @property
    def exact(self) -> bool:
        return self.sketch is None


class Selector(Protocol):
    def __call__(
        self, weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig, solver: Solver
    ) -> Candidates: ...
