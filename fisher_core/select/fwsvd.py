"""`fwsvd`: the Fisher-norm-optimal rank-k part of W.

With `M = S_G^{1/2} W S_A^{1/2} = U Σ Vᵀ`, the rank-k matrix closest to W in the K-FAC Fisher norm
`‖S_G^{1/2} (·) S_A^{1/2}‖_F` is `S_G^{-1/2} U_k Σ_k V_kᵀ S_A^{-1/2}`, split as
`B = S_G^{-1/2} U_k √(Σ_k/s)`, `A = √(Σ_k/s) V_kᵀ S_A^{-1/2}`. PiSSA when `S = I`; CorDA-like
when `S_G = I`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats
from fisher_core.select.base import Candidates
from fisher_core.select.linalg import damped, sqrt_and_inv_sqrt


def select_fwsvd(weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig) -> Candidates:
    g_root, g_inv_root = sqrt_and_inv_sqrt(damped(stats.grad_cov, config.damping))
    a_root, a_inv_root = sqrt_and_inv_sqrt(damped(stats.input_cov, config.damping))
    u, sigma, vh = torch.linalg.svd(g_root @ weight @ a_root, full_matrices=False)
    root = (sigma[:k] / scaling).sqrt()
    return Candidates(
        B=g_inv_root @ (u[:, :k] * root),
        A=(root[:, None] * vh[:k]) @ a_inv_root,
        scores=sigma.square(),
    )
