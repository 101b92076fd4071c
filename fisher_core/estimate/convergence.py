"""Early stopping of the statistics pass: stop once the factors' estimates stop changing.

At t = 2, 4, 8, 16, … batches every factor `S_t` (the running mean) is probed with fixed random vectors,
`P_t = S_t Ω` (Ω: d×4, the same on every process). Between two checks the data doubled, so

    change_t = ‖P_t − P_{t/2}‖ / ‖P_t‖

is the relative difference between the mean of the first and of the second half of the data — of the
order of the relative standard error of `S_{t/2}`, and it shrinks like 1/√t while the data are
exchangeable. The pass stops (from t = 4 on) once the *median* change over all factors is below
`stop_tol`: the median, because a few factors estimated from few rows (a pooler sees one row per
sequence) converge much more slowly than the rest and would otherwise hold the whole pass. Cheap:
O(d²·4) per dense factor and check, no decomposition. Under `torch.distributed` each process judges its
own shard and the largest median decides, so every process stops at the same batch.
"""

from __future__ import annotations

import statistics

import torch
from torch import Tensor

from fisher_core.estimate.distributed import global_max
from fisher_core.estimate.factors import StatsAccumulator
from fisher_core.estimate.sums import DenseSum, PsdSketch, random_matrix

PROBES = 4


class ConvergenceMonitor:
    """Remembers every factor's probes at the last check; `converged` compares them with the current ones."""

    def __init__(self, tol: float, seed: int) -> None:
        self.tol, self.seed = tol, seed
        self.previous: dict[str, Tensor] = {}
        self.last_change = float("inf")  # the median change at the last check (for the log line)

    @staticmethod
    def due(batches: int) -> bool:
        """Whether to check after `batches` batches: at 2, 4, 8, 16, …"""
        return batches >= 2 and batches & (batches - 1) == 0

    def converged(self, acc: StatsAccumulator) -> bool:
        changes = []
        for name, layer in acc.layers.items():
            for what, s in (("input", layer.input_sum), ("grad", layer.grad_sum)):
                probe = self._probe(s, f"{name}/{what}", layer.tokens)
                if probe is None:
                    continue
                key = f"{name}/{what}"
                if key in self.previous and self.previous[key].shape == probe.shape:  # (not re-planned since)
                    change = torch.linalg.norm(probe - self.previous[key]) / torch.linalg.norm(probe).clamp_min(1e-30)
                    changes.append(float(change))
                self.previous[key] = probe
        self.last_change = global_max(statistics.median(changes) if changes else float("inf"))
        return self.last_change < self.tol

    def _probe(self, s: object, key: str, tokens: int) -> Tensor | None:
        if tokens == 0:
            return None
        if isinstance(s, PsdSketch):
            return (s.y / tokens).cpu()
        if isinstance(s, DenseSum) and s.total is not None:
            omega = random_matrix((s.total.shape[1], PROBES), key, self.seed, s.total.device)
            return (s.total @ omega / tokens).cpu()
        return None
