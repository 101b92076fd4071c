"""`subspace`: the LoRA subspace carrying the most Fisher mass under K-FAC.

`B` = top-k eigenvectors of `S_G`, `A` = top-k eigenvectors of `S_A` (as rows); component i scores
`λ_i(S_G)·λ_i(S_A)`, the K-FAC Fisher mass of the pair (of total `tr S_G · tr S_A`). EVA's `A` when
`B = 0`. Factors get LoRA-GA's norm `d_out^{1/4}/√γ`.
"""

from __future__ import annotations

from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats
from fisher_core.select.base import Candidates, Solver
from fisher_core.select.linalg import data_scale, with_norm


def select_subspace(
    weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig, solver: Solver
) -> Candidates:
    top = None if solver.exact else max(k, solver.sketch)
    g, a = solver.spectrum(stats.grad_cov, 0.0, top), solver.spectrum(stats.input_cov, 0.0, top)
    pairs = min(g.vals.numel(), a.vals.numel())
    b, a_rows = with_norm(g.vecs[:, :k], a.vecs[:, :k].T, data_scale(weight.shape[0], config.stable_gamma))
    return Candidates(B=b, A=a_rows, scores=g.vals[:pairs] * a.vals[:pairs], total=g.trace * a.trace)
