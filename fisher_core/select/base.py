"""What every selector returns: the top-k candidate components of one layer, best first."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import Factor, LayerStats
from fisher_core.select.spectral import Root, Spectrum, cholesky, spectrum


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
    """How much of each spectrum to compute: all of it (`sketch=None`) or the top `sketch`.

    `spectra` memoizes decompositions for one `select` call, so a factor shared by several layers
    (S_A of q/k/v, gate/up) is decomposed once.
    """

    sketch: int | None
    seed: int = 0
    svd_exact: bool = True  # full SVD of the whitened matrix, or randomized top-k
    spectra: dict[tuple, Root] = field(default_factory=dict, compare=False)

    @property
    def exact(self) -> bool:
        return self.sketch is None

    def spectrum(self, factor: Factor, damping: float, k: int | None = None) -> Spectrum:
        """The damped spectrum of `factor` (top `k`, or as the solver says), computed once per factor."""
        k = self.sketch if k is None else k
        key = (id(factor), damping, k)
        if key not in self.spectra:
            self.spectra[key] = spectrum(factor, damping, k, seed=self.seed + factor.shape[0])
        return self.spectra[key]

    def root(self, factor: Factor, damping: float) -> Root:
        """A square root of the damped factor for whitening: Cholesky when exact and dense, else its spectrum."""
        if self.exact and isinstance(factor, Tensor):
            key = (id(factor), damping, "cholesky")
            if key not in self.spectra:
                self.spectra[key] = cholesky(factor, damping) or self.spectrum(factor, damping)
            return self.spectra[key]
        return self.spectrum(factor, damping)


class Selector(Protocol):
    def __call__(
        self, weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig, solver: Solver
    ) -> Candidates: ...
