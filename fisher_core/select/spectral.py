"""Spectra of the K-FAC factors, exact or top-k, as the selectors consume them.

A damped factor is represented as `S + δI ≈ Q diag(λ) Qᵀ + ρ (I − Q Qᵀ)`: its top-k eigenpairs plus
one value `ρ` for the complement (the mean of the remaining eigenvalues, from the trace), damping
`δ = damping·mean(diag S)` included in both. Exact (`k = d`, full `eigh`) for small factors; for
large ones the top-k come from randomized subspace iteration (Halko, Martinsson & Tropp 2011,
Alg. 4.4), costing O(d²k) instead of O(d³). Functions of the factor (`S^{±1/2}`) are applied to
matrices without ever forming them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisher_core.estimate.sums import FactorSketch, LowRank


@dataclass
class Spectrum:
    """`Q diag(vals) Qᵀ + rest·(I − QQᵀ)` with `vals` descending (damping included)."""

    vecs: Tensor  # d×k, orthonormal columns
    vals: Tensor  # k
    rest: float  # eigenvalue of the complement (unused when k = d)
    trace: float  # trace of the damped factor

    @property
    def exact(self) -> bool:
        return self.vecs.shape[1] == self.vecs.shape[0]

    def apply(self, x: Tensor, power: float) -> Tensor:
        """`S^power @ x` for x of shape d×c."""
        proj = self.vecs.T @ x
        out = self.vecs @ (self.vals.pow(power)[:, None] * proj)
        if not self.exact:
            out = out + self.rest**power * (x - self.vecs @ proj)
        return out

    def whiten(self, x: Tensor, power: float) -> Tensor:
        return self.apply(x, power)

    def unwhiten(self, u: Tensor) -> Tensor:
        return self.apply(u, -0.5)


@dataclass
class Cholesky:
    """`S + δI = L Lᵀ`: a square root up to a rotation, at a fraction of `eigh`'s cost.

    With `L = S^{1/2} Qᵀ` (Q orthogonal): `whiten(x, ½) = Lᵀx = Q S^{1/2} x`,
    `whiten(x, −½) = L⁻¹x = Q S^{-1/2} x`, `unwhiten(u) = L⁻ᵀu = S^{-1/2} Qᵀ u`. Singular vectors of a
    matrix whitened on both sides come out rotated by Q, and `unwhiten` rotates them back, so the
    selectors' results equal those of the symmetric root.
    """

    lower: Tensor

    def whiten(self, x: Tensor, power: float) -> Tensor:
        if power == 0.5:
            return self.lower.T @ x
        return torch.linalg.solve_triangular(self.lower, x, upper=False)

    def unwhiten(self, u: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self.lower.T, u, upper=True)


Root = Spectrum | Cholesky


def damping_shift(trace: float, d: int, damping: float) -> float:
    """`δ = λ·mean(diag S) = λ·tr(S)/d`, what damping adds to a d×d factor's diagonal (at least 1e-12, so
    that a singular factor stays invertible)."""
    return max(damping * trace / d, 1e-12)


def cholesky(s: Tensor, damping: float) -> Cholesky | None:
    """Cholesky root of the damped factor, or None if it is not numerically positive definite."""
    d = s.shape[0]
    delta = damping_shift(float(s.diagonal().sum()), d, damping)
    lower, info = torch.linalg.cholesky_ex(0.5 * (s + s.T) + delta * torch.eye(d, dtype=s.dtype, device=s.device))
    return Cholesky(lower) if int(info) == 0 else None


def spectrum(s: Tensor | FactorSketch, damping: float, k: int | None = None, seed: int = 0, iters: int = 4) -> Spectrum:
    """The damped factor's spectrum: exact when `k` is None or ≥ d/2, else its top-k.

    A sketched factor gives the top eigenpairs its sketch holds (at most k).
    """
    d = s.shape[0]
    if isinstance(s, FactorSketch):
        vals, vecs = s.eigenpairs()
        vals, vecs = vals[:k], vecs[:, :k]
        delta = damping_shift(s.trace, d, damping)
        rest = max(s.trace - float(vals.sum()), 0.0) / max(d - vals.numel(), 1)
        return Spectrum(vecs, vals + delta, rest=rest + delta, trace=s.trace + d * delta)
    s = 0.5 * (s + s.T)
    trace = float(s.diagonal().sum())
    delta = damping_shift(trace, d, damping)
    if k is None or 2 * k >= d:
        vals, vecs = torch.linalg.eigh(s)
        vals, vecs = vals.flip(0).clamp_min(0.0) + delta, vecs.flip(1)
        return Spectrum(vecs, vals, rest=delta, trace=trace + d * delta)
    vals, vecs = top_eigenpairs(s, k, seed=seed, iters=iters)
    vals = vals.clamp_min(0.0)
    rest = max(trace - float(vals.sum()), 0.0) / (d - k)
    return Spectrum(vecs, vals + delta, rest=rest + delta, trace=trace + d * delta)


def whiten(g: Root, a: Root, m: Tensor | LowRank, power: float) -> Tensor | LowRank:
    """`S_G^p M S_A^p` (up to the roots' rotations), dense or low-rank as M is (a low-rank M is never
    expanded to m×n)."""
    if isinstance(m, LowRank):
        return LowRank(g.whiten(m.left, power), a.whiten(m.right.T, power).T)
    return a.whiten(g.whiten(m, power).T, power).T


def top_eigenpairs(s: Tensor, k: int, seed: int = 0, iters: int = 4, oversample: int = 10) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a symmetric PSD matrix by randomized subspace iteration (descending)."""
    d = s.shape[0]
    g = torch.Generator(device=s.device).manual_seed(seed)
    q = torch.linalg.qr(s @ torch.randn(d, min(d, k + oversample), generator=g, device=s.device, dtype=s.dtype))[0]
    for _ in range(iters):
        q = torch.linalg.qr(s @ q)[0]
    vals, small = torch.linalg.eigh(q.T @ s @ q)
    vals, small = vals.flip(0)[:k], small.flip(1)[:, :k]
    return vals, q @ small


def top_singular(
    m: Tensor | LowRank, k: int, exact: bool, seed: int = 0, iters: int = 6
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets `U_k, σ_k, V_kᵀ` (exact thin SVD, or randomized with power iterations).

    A low-rank `M = L R` is decomposed exactly through its factors: `L = Q_L R_L`, `Rᵀ = Q_R R_R`,
    `R_L R_Rᵀ = U Σ Vᵀ` give `M = (Q_L U) Σ (Q_R V)ᵀ`, at O((m + n)·c²) for inner rank c (at most c triplets).
    """
    if isinstance(m, LowRank):
        q_left, r_left = torch.linalg.qr(m.left)
        q_right, r_right = torch.linalg.qr(m.right.T)
        u, sigma, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
        return (q_left @ u)[:, :k], sigma[:k], (vh @ q_right.T)[:k]
    if exact or 2 * k >= min(m.shape):
        u, sigma, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], sigma[:k], vh[:k]
    g = torch.Generator(device=m.device).manual_seed(seed)
    q = torch.linalg.qr(m @ torch.randn(m.shape[1], min(min(m.shape), k + 10), generator=g, device=m.device))[0]
    for _ in range(iters):
        q = torch.linalg.qr(m @ (m.T @ q))[0]
    u, sigma, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ u)[:, :k], sigma[:k], vh[:k]
