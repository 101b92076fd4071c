"""`select`: the singular triplets of W with the largest Fisher sensitivity.

With `W = Σ σ_i u_i v_iᵀ`, the K-FAC Fisher cost of removing component i is
`κ_i = σ_i² (u_iᵀ S_G u_i)(v_iᵀ S_A v_i)`; the top-k by κ become the adapter, PiSSA-style:
`B = U_k √(Σ_k/s)`, `A = √(Σ_k/s) V_kᵀ`. With `S_G = S_A = I` this is PiSSA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats
from fisher_core.select.base import Candidates
from fisher_core.select.linalg import damped


def select_sensitive(weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig) -> Candidates:
    u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    s_g = damped(stats.grad_cov, config.damping)
    s_a = damped(stats.input_cov, config.damping)
    g_quad = (u * (s_g @ u)).sum(dim=0)  # u_iᵀ S_G u_i
    a_quad = (vh.T * (s_a @ vh.T)).sum(dim=0)  # v_iᵀ S_A v_i
    kappa = sigma.square() * g_quad * a_quad
    order = torch.argsort(kappa, descending=True, stable=True)
    top = order[:k]
    root = (sigma[top] / scaling).sqrt()
    return Candidates(B=u[:, top] * root, A=root[:, None] * vh[top], scores=kappa[order])
