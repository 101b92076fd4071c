"""`subspace`: the LoRA subspace carrying the most Fisher mass under K-FAC.

`B` = top-k eigenvectors of `S_G`, `A` = top-k eigenvectors of `S_A` (as rows); component i scores
`λ_i(S_G)·λ_i(S_A)`, the K-FAC Fisher mass of the pair. EVA's `A` when `B = 0`. Factors get
LoRA-GA's norm `d_out^{1/4}/√γ`.
"""

from __future__ import annotations

from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats
from fisher_core.select.base import Candidates
from fisher_core.select.linalg import data_scale, sym_eigh, with_norm


def select_subspace(weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig) -> Candidates:
    g_vals, g_vecs = sym_eigh(stats.grad_cov)
    a_vals, a_vecs = sym_eigh(stats.input_cov)
    pairs = min(g_vals.numel(), a_vals.numel())
    b, a = with_norm(g_vecs[:, :k], a_vecs[:, :k].T, data_scale(weight.shape[0], config.stable_gamma))
    return Candidates(B=b, A=a, scores=g_vals[:pairs] * a_vals[:pairs])
