"""`natural`: the directions of the best rank-k natural-gradient step.

With `S_G^{-1/2} Ḡ S_A^{-1/2} = U Σ Vᵀ` (Ḡ the mean gradient), the natural-gradient step
`S_G^{-1} Ḡ S_A^{-1}` restricted to rank k in the Fisher norm lives in `B ∝ S_G^{-1/2} U_k`,
`A ∝ V_kᵀ S_A^{-1/2}`. The factors carry no scale of their own: each column of B and row of A gets
LoRA-GA's norm `d_out^{1/4}/√γ`. LoRA-GA's directions when `S = I`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import LayerStats
from fisher_core.select.base import Candidates
from fisher_core.select.linalg import damped, data_scale, sqrt_and_inv_sqrt, with_norm


def select_natural(weight: Tensor, stats: LayerStats, k: int, scaling: float, config: FisherConfig) -> Candidates:
    if stats.mean_grad is None:
        raise ValueError("selector 'natural' needs the mean gradient: estimate with selector='natural'")
    _, g_inv_root = sqrt_and_inv_sqrt(damped(stats.grad_cov, config.damping))
    _, a_inv_root = sqrt_and_inv_sqrt(damped(stats.input_cov, config.damping))
    u, sigma, vh = torch.linalg.svd(g_inv_root @ stats.mean_grad @ a_inv_root, full_matrices=False)
    b, a = with_norm(g_inv_root @ u[:, :k], vh[:k] @ a_inv_root, data_scale(weight.shape[0], config.stable_gamma))
    return Candidates(B=b, A=a, scores=sigma.square())
