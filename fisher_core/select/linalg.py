"""Small helpers shared by the selectors (pure functions on tensors)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fisher_core.estimate.sums import FactorSketch

# PEFT's default `lora_A` (kaiming-uniform, a=√5) has rows of expected norm 1/√3; data-independent
# factors under the `zero` policy get the same norm so training dynamics match default LoRA's.
DEFAULT_ROW_NORM = 1.0 / math.sqrt(3.0)


def activation_matched(a: Tensor, input_cov: Tensor | FactorSketch) -> Tensor:
    """`a` times the one scalar `c` with `tr(c·A S_A c·Aᵀ) = r·tr(S_A)/(3n)`: E‖A x‖² of PEFT's Kaiming-uniform A
    (entries of variance 1/(3n)) on inputs of second moment `S_A` (n×n, dense or a sketch: then
    `S_A ≈ U Λ Uᵀ + ρ (I − U Uᵀ)`, `ρ` the mean of the eigenvalues the sketch does not hold, from its trace)."""
    r, n = a.shape
    if isinstance(input_cov, FactorSketch):  # the complement of its top-k as one value, as `spectral` models it
        values, vectors = input_cov.eigenpairs()
        on_top = (a @ vectors).pow(2)
        rest = max(input_cov.trace - float(values.sum()), 0.0) / max(n - values.numel(), 1)
        energy = float((values * on_top).sum()) + rest * float(a.pow(2).sum() - on_top.sum())
        trace = input_cov.trace
    else:
        energy, trace = float(((a @ input_cov) * a).sum()), float(input_cov.diagonal().sum())
    target = r * trace / (3.0 * n)
    return a if energy <= 0.0 or target <= 0.0 else a * math.sqrt(target / energy)


def fix_signs(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Flip component i of (B[:, i], A[i]) together so that A[i]'s largest-magnitude entry is > 0."""
    idx = a.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(a.gather(1, idx)).squeeze(1)
    sign[sign == 0] = 1.0
    return b * sign, a * sign[:, None]


def with_norm(b: Tensor, a: Tensor, norm: float) -> tuple[Tensor, Tensor]:
    """Scale every column of B and every row of A to the given Euclidean norm."""
    b = b / b.norm(dim=0, keepdim=True).clamp_min(1e-30) * norm
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30) * norm
    return b, a


def data_scale(out_features: int, stable_gamma: float) -> float:
    """LoRA-GA's factor norm for data-only directions: d_out^{1/4}/√γ."""
    return out_features**0.25 / math.sqrt(stable_gamma)
