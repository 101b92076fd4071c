"""`fwsvd`: the Fisher-norm-optimal rank-k part of W.

With `M = S_G^{1/2} W S_A^{1/2} = U Σ Vᵀ`, the rank-k matrix closest to W in the K-FAC Fisher norm
`‖S_G^{1/2} (·) S_A^{1/2}‖_F` is `S_G^{-1/2} U_k Σ_k V_kᵀ S_A^{-1/2}`, split as
`B = S_G^{-1/2} U_k √(Σ_k/s)`, `A = √(Σ_k/s) V_kᵀ S_A^{-1/2}`. PiSSA when `S = I`; CorDA-like
when `S_G = I`.
"""

from __future__ import annotations

from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats
from fisher_core.select.base import Candidates, Solver
from fisher_core.select.spectral import top_singular, whiten


def select_fwsvd(
    weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig, solver: Solver
) -> Candidates:
    g, a = solver.root(stats.grad_cov, config.damping), solver.root(stats.input_cov, config.damping)
    m = whiten(g, a, weight, 0.5)
    u, sigma, vh = top_singular(m, k, solver.svd_exact, seed=solver.seed)
    root = (sigma / scaling).sqrt()
    return Candidates(
        B=g.unwhiten(u * root),
        A=a.unwhiten((root[:, None] * vh).T).T,
        scores=sigma.square(),
        total=float(m.square().sum()),
    )
