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

    `scores` covers the whole spectrum the selector ranked (≥ k entries), so the fraction of Fisher
    mass the first r components capture is `scores[:r].sum() / scores.sum()`.
    """

    B: Tensor  # m×k
    A: Tensor  # k×n
    scores: Tensor


class Selector(Protocol):
    def __call__(
        self, weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig
    ) -> Candidates: ...
