"""Running sums of outer products: dense, or a fixed-size randomized sketch when memory is short.

- `DenseSum`: `Σ_t a_t b_tᵀ` in fp32 (d_a×d_b).
- `PsdSketch`: for `S = Σ_t x_t x_tᵀ` keeps `Y = S Ω` (d×k, Ω Gaussian) and `tr S`; at the end a
  Nyström approximation gives S's top-k eigenpairs (Tropp, Yurtsever, Udell & Cevher 2017,
  "Fixed-rank approximation of a positive-semidefinite matrix from streaming data"), and the trace
  gives one value for the rest of the spectrum. Memory 2·d·k (Y and Ω) instead of d².
- `CrossSketch`: for `Ḡ = Σ_t g_t x_tᵀ` keeps the range sketch `Y = Ḡ Ω` (m×k_y) and the co-range
  sketch `W = Ψ Ḡ` (l×n, l ≥ 2·k_y); at the end `Ḡ ≈ Q (ΨQ)⁺ W` with `Q = orth(Y)` (Tropp et al.
  2017, "Practical sketching algorithms for low-rank matrix approximation", Alg. 7). `Ω` is the first
  k_y columns of the layer's input-factor test matrix and `Ψ = Ω_Gᵀ` its gradient-factor test matrix,
  so when those factors are sketched too, their projections `x·Ω`, `g·Ω_G` are reused and `Ḡ` costs
  `k_y·m + l·n` per token. Memory (m·k_y + l·n) instead of m·n.

Every sum is linear in the data, so shards add: `tensors()` lists what an all-reduce must sum.
Test matrices are drawn from a seed derived from the layer name, identical on every process.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

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


class DenseSum:
    """`Σ weight · rowsᵀ other` in fp32."""

    def __init__(self) -> None:
        self.total: Tensor | None = None

    def add_outer(
        self,
        rows: Tensor,
        weight: float = 1.0,
        other: Tensor | None = None,
        rows_projected: Tensor | None = None,
        other_projected: Tensor | None = None,
    ) -> None:
        """Add `weight · rowsᵀ other` (`other` = `rows` if None); a dense sum needs no projections."""
        other = rows if other is None else other
        if self.total is None:
            self.total = torch.zeros(rows.shape[1], other.shape[1], device=rows.device)
        _add_outer(self.total, rows, other, weight)

    def tensors(self, shape: tuple[int, int], device: torch.device) -> list[Tensor]:
        if self.total is None:
            self.total = torch.zeros(shape, device=device)
        return [self.total]

    def mean(self, tokens: int, shape: tuple[int, int]) -> Tensor:
        """Σ/N, divided in place (the sum is not kept twice)."""
        return self.total.div_(tokens) if self.total is not None else torch.zeros(shape)


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
        """Top-k eigenvalues (descending) and eigenvectors of the Nyström approximation."""
        y, omega = self.y.double(), self.omega.double()
        nu = torch.finfo(torch.float32).eps * float(torch.linalg.norm(y))
        y_nu = y + nu * omega
        core = omega.T @ y_nu
        chol = torch.linalg.cholesky(0.5 * (core + core.T) + 1e-12 * torch.eye(core.shape[0], dtype=core.dtype))
        b = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T
        u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
        vals = (sigma.square() - nu).clamp_min(0.0)
        return vals.float(), u.float()


class PsdSketch:
    """Streaming sketch of `Σ weight · x xᵀ`: `Y = Σ weight · x (xᵀΩ)` and its trace."""

    def __init__(self, dim: int, k: int, name: str, seed: int, device: torch.device) -> None:
        self.omega = random_matrix((dim, k), name, seed, device)
        self.y = torch.zeros(dim, k, device=device)
        self.trace = torch.zeros((), device=device)

    def add_outer(self, rows: Tensor, weight: float = 1.0, other: Tensor | None = None) -> Tensor:
        """Add the rows' outer products; return their projection `rows·Ω` (a cross sketch reuses it)."""
        rows = rows.float()
        projected = _project(rows, self.omega)
        _add_outer(self.y, rows, projected, weight)
        flat = rows.reshape(-1)
        self.trace.add_(flat.dot(flat), alpha=weight)  # Σ‖x_t‖², without a squared copy
        return projected

    def absorb(self, total: Tensor) -> None:
        """Add a dense sum `Σ x xᵀ` collected so far: `Y += total·Ω` (what streaming its rows would have added)."""
        self.y.add_(total @ self.omega)
        self.trace.add_(total.diagonal().sum())

    def tensors(self, shape: tuple[int, int], device: torch.device) -> list[Tensor]:
        return [self.y, self.trace]

    def mean(self, tokens: int, shape: tuple[int, int]) -> FactorSketch:
        """Σ/N, divided in place (the sketch is not kept twice)."""
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

    `name` is the layer's: `Ω` = the first k_y columns of `random_matrix((n, k), name + "/input")` and
    `Ψ = random_matrix((m, l), name + "/grad")ᵀ`, the test matrices of the layer's own factor sketches.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        k: int,
        name: str,
        seed: int,
        device: torch.device,
        input_sketch: object = None,
        grad_sketch: object = None,
    ) -> None:
        """`input_sketch`, `grad_sketch`: the layer's factor sums; their test matrices are used where they are
        sketches (the same values, not drawn again)."""
        self.co_rank = min(k, rows)
        self.k_y = max(1, min(k, cols, self.co_rank) // 2)
        self.share_test_matrices(input_sketch, grad_sketch)
        if not isinstance(input_sketch, PsdSketch):
            self.omega = random_matrix((cols, min(k, cols)), name + "/input", seed, device)[:, : self.k_y].contiguous()
        if not isinstance(grad_sketch, PsdSketch):
            self.psi_t = random_matrix((rows, self.co_rank), name + "/grad", seed, device)  # Ψᵀ (m×l)
        self.y = torch.zeros(rows, self.k_y, device=device)
        self.w = torch.zeros(self.co_rank, cols, device=device)

    def share_test_matrices(self, input_sketch: object, grad_sketch: object) -> None:
        """Use the layer's factor sketches' test matrices (the same values) instead of holding copies."""
        if isinstance(input_sketch, PsdSketch):
            self.omega = input_sketch.omega[:, : self.k_y]
        if isinstance(grad_sketch, PsdSketch):
            self.psi_t = grad_sketch.omega[:, : self.co_rank]

    def add_outer(
        self,
        rows: Tensor,
        weight: float = 1.0,
        other: Tensor | None = None,
        rows_projected: Tensor | None = None,
        other_projected: Tensor | None = None,
    ) -> None:
        """Add `Σ g xᵀ` for `rows` = g, `other` = x; `rows_projected` = g·Ψᵀ and `other_projected` = x·Ω
        (at least k_y columns) when the factor sketches already computed them."""
        g, x = rows.float(), other.float()
        xp = other_projected[:, : self.k_y] if other_projected is not None else _project(x, self.omega)
        gp = rows_projected[:, : self.co_rank] if rows_projected is not None else _project(g, self.psi_t)
        _add_outer(self.y, g, xp, weight)
        _add_outer(self.w, gp, x, weight)

    def absorb(self, total: Tensor) -> None:
        """Add a dense sum `Σ g xᵀ` collected so far: `Y += total·Ω`, `W += Ψ·total`."""
        self.y.add_(total @ self.omega)
        self.w.add_(self.psi_t.T @ total)

    def tensors(self, shape: tuple[int, int], device: torch.device) -> list[Tensor]:
        return [self.y, self.w]

    def mean(self, tokens: int, shape: tuple[int, int]) -> LowRank:
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
