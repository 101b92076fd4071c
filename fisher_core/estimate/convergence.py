"""Early stopping of the statistics pass: stop once the factors stop moving.

Every factor `S` (the running mean) is probed with fixed random vectors, `P = S Ω` (Ω: d×4, the same
on every process); the pass may stop when, for every factor, `‖P_t − P_{t−1}‖ / ‖P_t‖ < tol` between
two checks. Cheap (O(d²·4) per factor and check, no decomposition) and a proxy for the top subspaces
no longer moving. Under `torch.distributed` the decision is all-reduced, so every process stops at
the same batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fisher_core.estimate.distributed import world_size
from fisher_core.estimate.factors import StatsAccumulator
from fisher_core.estimate.sums import DenseSum, PsdSketch, random_matrix

PROBES = 4


class ConvergenceMonitor:
    """Remembers the last probes of every factor; `converged` says whether they all stood still."""

    def __init__(self, tol: float, seed: int) -> None:
        self.tol, self.seed = tol, seed
        self.previous: dict[str, Tensor] = {}

    def converged(self, acc: StatsAccumulator) -> bool:
        moved = 0.0
        for name, layer in acc.layers.items():
            for what, s in (("input", layer.input_sum), ("grad", layer.grad_sum)):
                probe = self._probe(s, f"{name}/{what}", layer.tokens)
                if probe is None:
                    continue
                key = f"{name}/{what}"
                if key in self.previous:
                    change = float(
                        torch.linalg.norm(probe - self.previous[key]) / torch.linalg.norm(probe).clamp_min(1e-30)
                    )
                    moved = max(moved, change)
                else:
                    moved = float("inf")
                self.previous[key] = probe
        flag = torch.tensor([moved])
        if world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return float(flag) < self.tol

    def _probe(self, s: object, key: str, tokens: int) -> Tensor | None:
        if tokens == 0:
            return None
        if isinstance(s, PsdSketch):
            return (s.y / tokens).cpu()
        if isinstance(s, DenseSum) and s.total is not None:
            omega = random_matrix((s.total.shape[1], PROBES), key, self.seed, s.total.device)
            return (s.total @ omega / tokens).cpu()
        return None
