"""Running sums of outer products: dense, or a fixed-size randomized sketch when memory is short.

- `DenseSum`: `Σ_t a_t b_tᵀ` in fp32 (d_a×d_b).
- `PsdSketch`: for `S = Σ_t x_t x_tᵀ` keeps `Y = S Ω` (d×k, Ω Gaussian) and `tr S`; at the end a
  Nyström approximation gives S's top-k eigenpairs (Tropp, Yurtsever, Udell & Cevher 2017,
  "Fixed-rank approximation of a positive-semidefinite matrix from streaming data"), and the trace
  gives one value for the rest of the spectrum. Memory d·k (Y) instead of d², plus Ω, shared.
- `CrossSketch`: for `Ḡ = Σ_t g_t x_tᵀ` keeps the range sketch `Y = Ḡ Ω` (m×k_y) and the co-range
  sketch `W = Ψ Ḡ` (l×n, l ≥ 2·k_y); at the end `Ḡ ≈ Q (ΨQ)⁺ W` with `Q = orth(Y)` (Tropp et al.
  2017, "Practical sketching algorithms for low-rank matrix approximation", Alg. 7). `Ω` is the first
  k_y columns of the input factors' test matrix and `Ψ = Ω_Gᵀ` the gradient factors', so when those
  factors are sketched too, their projections `x·Ω`, `g·Ω_G` are reused and `Ḡ` costs `k_y·m + l·n` per
  token. Memory (m·k_y + l·n) instead of m·n.

Each is a `RunningSum` (one protocol): linear in the data, so shards add; `tensors()` lists what an
all-reduce must sum.
Test matrices come from `SketchMatrices`: one per (input or gradient, width), identical on every process.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


def _add_outer(total: Tensor, rows: Tensor, other: Tensor, weight: float = 1.0) -> Tensor:
    """`total += weight · rowsᵀ other` in fp32, in place, outside any autocast region.

    Elsewhere than CUDA half precision this is one `addmm_` into `total`: no d_a×d_b temporary (a dense
    factor would otherwise exist twice during each update). On CUDA, half-precision activations are
    multiplied on the tensor cores with fp32 accumulation (`out_dtype`), as fast as the model's own matmuls.
    """
    with torch.autocast(rows.device.type, enabled=False):  # hooks run inside the model's autocast region
        if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16) and other.dtype == rows.dtype:
            return total.add_(torch.mm(rows.T, other, out_dtype=torch.float32), alpha=weight)
        return total.addmm_(rows.float().T, other.float(), alpha=weight)


def random_matrix(shape: tuple[int, int], name: str, seed: int, device: torch.device) -> Tensor:
    """A Gaussian matrix determined by (layer name, seed): the same on every process and run."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g).to(device)


class SketchMatrices:
    """The Gaussian test matrices of a pass: one d×k matrix per (role, d, k), role "input" or "grad", drawn on
    first use from (role, d, seed) — the same on every process.

    Every sketch of a d-dimensional layer input uses the same Ω (every sketch of a d-dimensional output
    gradient the same Ω_G): a sketch's guarantee needs only a Gaussian test matrix independent of its own data,
    so sharing across layers costs no accuracy, while a model holds one matrix per width instead of one per
    layer and layers reading the same input (q/k/v, gate/up) reuse one projection `x·Ω`. Inputs and gradients
    get independent draws: Ḡ's two-sided sketch needs its Ω and Ψ independent (also for square layers).
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self._drawn: dict[tuple[str, int, int], Tensor] = {}

    def __call__(self, role: str, dim: int, k: int) -> Tensor:
        key = (role, dim, k)
        if key not in self._drawn:
            self._drawn[key] = random_matrix((dim, k), f"{role}/{dim}", self.seed, self.device)
        return self._drawn[key]


class RunningSum(Protocol):
    """What every running sum of the pass is (`DenseSum`, `PsdSketch`, `CrossSketch`): `Σ weight · rowsᵀ other` of
    a fixed shape, streamed, linear in the data (so shards and earlier sums add), averaged once at the end."""

    def add_outer(
        self,
        rows: Tensor,
        other: Tensor | None = None,
        *,
        weight: float = 1.0,
        rows_projected: Tensor | None = None,
        other_projected: Tensor | None = None,
    ) -> Tensor | None:
        """Add `weight · rowsᵀ other` (`other` = `rows` when None). `rows_projected`, `other_projected`: the rows
        already multiplied by the pass's test matrix of their role and width (`SketchMatrices`), when another sum
        computed it. Returns the rows' projection by this sum's test matrix (a sketch's), else None."""

    def absorb(self, total: Tensor) -> None:
        """Add a dense `Σ rowsᵀ other` collected so far: what streaming its rows would have added."""

    def tensors(self) -> list[Tensor]:
        """What an all-reduce sums (in place)."""

    def mean(self, tokens: int) -> Tensor | FactorSketch | LowRank:
        """Σ/N, divided in place (the sum is not kept twice)."""


class DenseSum:
    """`Σ weight · rowsᵀ other` in fp32, a `shape` matrix (allocated by the first rows, on their device)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.total: Tensor | None = None

    def add_outer(
        self,
        rows: Tensor,
        other: Tensor | None = None,
        *,
        weight: float = 1.0,
        rows_projected: Tensor | None = None,
        other_projected: Tensor | None = None,
    ) -> None:
        """`RunningSum.add_outer`; a dense sum needs no projections and computes none."""
        other = rows if other is None else other
        if self.total is None:
            self.total = torch.zeros(self.shape, device=rows.device)
        _add_outer(self.total, rows, other, weight)

    def absorb(self, total: Tensor) -> None:
        self.total = total.clone() if self.total is None else self.total.add_(total)

    def tensors(self) -> list[Tensor]:
        if self.total is None:
            self.total = torch.zeros(self.shape)
        return [self.total]

    def mean(self, tokens: int) -> Tensor:
        return self.total.div_(tokens) if self.total is not None else torch.zeros(self.shape)


@dataclass
class FactorSketch:
    """A PSD factor known through `Y = S Ω` and `tr S` (both already divided by N)."""

    omega: Tensor  # d×k
    y: Tensor  # d×k
    trace: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y.shape[0], self.y.shape[0])

    def eigenpairs(self) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues (descending) and eigenvectors of the Nyström approximation of `S + νI`, less ν
        (Tropp et al. 2017, Alg. 3): with `Y_ν = Y + νΩ` and `ΩᵀY_ν = LLᵀ`, `B = Y_ν L⁻ᵀ`, `S ≈ U(Σ² − ν)Uᵀ` for
        `B = UΣVᵀ`. `B`'s SVD is taken from the k×k `BᵀB = L⁻¹(Y_νᵀY_ν)L⁻ᵀ = VΣ²Vᵀ` and `U = Y_ν L⁻ᵀVΣ⁻¹`, then
        one Cholesky-QR pass makes `U`'s columns orthonormal again (squaring lost ~1e-4 on those with Σ² ≈ ν):
        d×k matrix products in fp64 instead of a d×k SVD, 1.4–1.6× faster at d = 2 048–14 336, k = 128."""
        y, omega = self.y.double(), self.omega.double()
        nu = torch.finfo(torch.float32).eps * float(torch.linalg.norm(y))
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        chol = torch.linalg.cholesky(0.5 * (core + core.T) + 1e-12 * torch.eye(core.shape[0], dtype=core.dtype))
        half = torch.linalg.solve_triangular(chol, y_nu.T @ y_nu, upper=False)  # L⁻¹ Y_νᵀY_ν
        gram = torch.linalg.solve_triangular(chol, half.T, upper=False)  # BᵀB
        sigma_sq, v = torch.linalg.eigh(0.5 * (gram + gram.T))
        sigma_sq, v = sigma_sq.flip(0).clamp_min(torch.finfo(torch.float64).tiny), v.flip(1)
        u = y_nu @ (torch.linalg.solve_triangular(chol.T, v, upper=True) / sigma_sq.sqrt())
        u = torch.linalg.solve_triangular(torch.linalg.cholesky(u.T @ u), u.T, upper=False).T
        return (sigma_sq - nu).clamp_min(0.0).float(), u.float()


class PsdSketch:
    """Streaming sketch of `Σ weight · x xᵀ`: `Y = Σ weight · x (xᵀΩ)` and its trace."""

    def __init__(self, omega: Tensor) -> None:
        """`omega`: the d×k test matrix (`SketchMatrices`)."""
        self.omega = omega
        self.y = torch.zeros_like(omega)
        self.trace = torch.zeros((), device=omega.device)

    def add_outer(
        self,
        rows: Tensor,
        other: Tensor | None = None,
        *,
        weight: float = 1.0,
        rows_projected: Tensor | None = None,
        other_projected: Tensor | None = None,
    ) -> Tensor:
        """`RunningSum.add_outer` of the rows' own outer products (`other` must be None or `rows`); returns
        `rows·Ω` (the cross sketch of the same layer reuses it)."""
        if other is not None and other is not rows:
            raise ValueError("a PSD sketch sums the rows' own outer products: pass other=None")
        rows = rows.float()
        projected = _project(rows, self.omega) if rows_projected is None else rows_projected
        _add_outer(self.y, rows, projected, weight)
        flat = rows.reshape(-1)
        self.trace.add_(flat.dot(flat), alpha=weight)  # Σ‖x_t‖², without a squared copy
        return projected

    def absorb(self, total: Tensor) -> None:
        """`Y += total·Ω`, `tr S += tr total`."""
        self.y.add_(total @ self.omega)
        self.trace.add_(total.diagonal().sum())

    def tensors(self) -> list[Tensor]:
        return [self.y, self.trace]

    def mean(self, tokens: int) -> FactorSketch:
        return FactorSketch(self.omega.cpu(), self.y.div_(tokens).cpu(), float(self.trace) / tokens)


def _project(rows: Tensor, test: Tensor) -> Tensor:
    """`rows · test` in fp32, outside any autocast region."""
    with torch.autocast(rows.device.type, enabled=False):
        return rows.float() @ test


@dataclass
class LowRank:
    """A matrix kept as `left @ right` (m×k, k×n)."""

    left: Tensor
    right: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def squared_norm(self) -> float:
        """`‖left·right‖_F² = Σ (leftᵀleft) ⊙ (right·rightᵀ)`, without forming the product."""
        return float(((self.left.T @ self.left) * (self.right @ self.right.T)).sum())


class CrossSketch:
    """Streaming two-sided sketch of `Σ g xᵀ`: `Y = Σ g (xᵀΩ)`, `W = Σ (Ψg) xᵀ`.

    `Ω` = the first k_y columns of the input factors' test matrix, `Ψᵀ` = the gradient factors' (l = min(k, m)
    columns), both from the pass's `SketchMatrices`: the same values the layer's factor sketches use.
    """

    def __init__(self, rows: int, cols: int, k: int, matrices: SketchMatrices) -> None:
        self.co_rank = min(k, rows)
        self.k_y = max(1, min(k, cols, self.co_rank) // 2)
        self.omega = matrices("input", cols, min(k, cols))[:, : self.k_y]
        self.psi_t = matrices("grad", rows, self.co_rank)  # Ψᵀ (m×l)
        device = self.psi_t.device
        self.y = torch.zeros(rows, self.k_y, device=device)
        self.w = torch.zeros(self.co_rank, cols, device=device)

    def add_outer(
        self,
        rows: Tensor,
        other: Tensor | None = None,
        *,
        weight: float = 1.0,
        rows_projected: Tensor | None = None,
        other_projected: Tensor | None = None,
    ) -> Tensor:
        """`RunningSum.add_outer` of `Σ g xᵀ` for `rows` = g, `other` = x; `rows_projected` = g·Ψᵀ and
        `other_projected` = x·Ω (at least k_y columns) when the factor sketches already computed them. Returns g·Ψᵀ."""
        if other is None:
            raise ValueError("a cross sketch sums g xᵀ: pass the layer inputs as other")
        g, x = rows.float(), other.float()
        xp = other_projected[:, : self.k_y] if other_projected is not None else _project(x, self.omega)
        gp = rows_projected[:, : self.co_rank] if rows_projected is not None else _project(g, self.psi_t)
        _add_outer(self.y, g, xp, weight)
        _add_outer(self.w, gp, x, weight)
        return gp

    def absorb(self, total: Tensor) -> None:
        """`Y += total·Ω`, `W += Ψ·total`."""
        self.y.add_(total @ self.omega)
        self.w.add_(self.psi_t.T @ total)

    def tensors(self) -> list[Tensor]:
        return [self.y, self.w]

    def mean(self, tokens: int) -> LowRank:
        q = torch.linalg.qr(self.y.double())[0]
        x = torch.linalg.lstsq(self.psi_t.double().T @ q, self.w.double()).solution
        return LowRank(q.float().cpu(), (x / tokens).float().cpu())


def is_finite(stat: Tensor | FactorSketch | LowRank) -> bool:
    """Whether every number a statistic holds is finite."""
    if isinstance(stat, FactorSketch):
        parts = [stat.y, torch.tensor(stat.trace)]
    elif isinstance(stat, LowRank):
        parts = [stat.left, stat.right]
    else:
        parts = [stat]
    return all(bool(torch.isfinite(p).all()) for p in parts)


def is_zero(stat: Tensor | FactorSketch) -> bool:
    """Whether a factor is identically zero (no gradient reached the layer)."""
    return not bool((stat.y if isinstance(stat, FactorSketch) else stat).any())


def factor_trace(stat: Tensor | FactorSketch) -> float:
    """tr S of a dense or sketched factor."""
    return stat.trace if isinstance(stat, FactorSketch) else float(stat.diagonal().sum())


def factor_eigenvalues(stat: Tensor | FactorSketch) -> Tensor:
    """Eigenvalues, descending (a sketch knows only its top k)."""
    if isinstance(stat, FactorSketch):
        return stat.eigenpairs()[0]
    return torch.linalg.eigvalsh(0.5 * (stat.double() + stat.double().T)).flip(0).clamp_min(0.0)
