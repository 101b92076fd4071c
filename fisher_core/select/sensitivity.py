"""`select`: the singular triplets of W with the largest Fisher sensitivity.

With `W = Σ σ_i u_i v_iᵀ`, the K-FAC Fisher cost of removing component i is
`κ_i = σ_i² (u_iᵀ S_G u_i)(v_iᵀ S_A v_i)`; the top-k by κ become the adapter, PiSSA-style:
`B = U_k √(Σ_k/s)`, `A = √(Σ_k/s) V_kᵀ`. With `S_G = S_A = I` this is PiSSA. With a low-rank
solver the candidates are W's top `sketch` triplets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats
from fisher_core.estimate.sums import FactorSketch
from fisher_core.select.base import Candidates, Solver
from fisher_core.select.spectral import damping_shift, spectrum, top_singular


def select_sensitive(
    weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig, solver: Solver
) -> Candidates:
    pool = min(weight.shape) if solver.exact else max(k, solver.sketch)
    u, sigma, vh = top_singular(weight, pool, solver.exact, seed=solver.seed)
    g_quad = _quadratic(stats.grad_cov, u, config.damping)
    a_quad = _quadratic(stats.input_cov, vh.T, config.damping)
    kappa = sigma.square() * g_quad * a_quad
    order = torch.argsort(kappa, descending=True, stable=True)
    top = order[:k]
    root = (sigma[top] / scaling).sqrt()
    return Candidates(B=u[:, top] * root, A=root[:, None] * vh[top], scores=kappa[order], total=float(kappa.sum()))


def _quadratic(s: Tensor | FactorSketch, vecs: Tensor, damping: float) -> Tensor:
    """`v_iᵀ (S + λ·mean(diag S)·I) v_i` for every column v_i."""
    if isinstance(s, FactorSketch):
        return (vecs * spectrum(s, damping).apply(vecs, 1.0)).sum(dim=0)
    delta = damping_shift(float(s.diagonal().sum()), s.shape[0], damping)
    return (vecs * (s @ vecs)).sum(dim=0) + delta * vecs.square().sum(dim=0)
