"""`natural`: the directions of the best rank-k natural-gradient step.

With `S_G^{-1/2} Ḡ S_A^{-1/2} = U Σ Vᵀ` (Ḡ the mean gradient), the natural-gradient step
`S_G^{-1} Ḡ S_A^{-1}` restricted to rank k in the Fisher norm lives in `B ∝ S_G^{-1/2} U_k`,
`A ∝ V_kᵀ S_A^{-1/2}`. The factors carry no scale of their own: each column of B and row of A gets
LoRA-GA's norm `d_out^{1/4}/√γ`. LoRA-GA's directions when `S = I`.
"""

from __future__ import annotations

from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats
from fisher_core.estimate.sums import LowRank
from fisher_core.select.base import Candidates, Solver
from fisher_core.select.linalg import data_scale, with_norm
from fisher_core.select.spectral import top_singular, whiten


def select_natural(
    weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig, solver: Solver
) -> Candidates:
    if stats.mean_grad is None:
        raise ValueError("selector 'natural' needs the mean gradient: estimate with selector='natural'")
    held = min(stats.mean_grad.left.shape) if isinstance(stats.mean_grad, LowRank) else k
    if held < k:
        raise ValueError(
            f"the sketched mean gradient holds rank {held}, fewer than the {k} directions asked for: "
            f"raise sketch_rank to at least {2 * k} (or lower the LoRA rank)"
        )
    g, a = solver.root(stats.grad_cov, config.damping), solver.root(stats.input_cov, config.damping)
    m = whiten(g, a, stats.mean_grad, -0.5)
    u, sigma, vh = top_singular(m, k, solver.svd_exact, seed=solver.seed)
    b, a_rows = with_norm(g.unwhiten(u), a.unwhiten(vh.T).T, data_scale(weight.shape[0], config.stable_gamma))
    total = m.squared_norm() if isinstance(m, LowRank) else float(m.square().sum())
    return Candidates(B=b, A=a_rows, scores=sigma.square(), total=total)
