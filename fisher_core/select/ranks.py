"""Rank allocation under a global budget (docs/design.md §2).

Each layer's component scores are normalized to fractions of that layer's total mass; the fractions of
all layers are pooled and the largest kept, every layer getting at least one component and at most
its cap. Ties break by layer name and component index, so the allocation is deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def check_budget(budget: int, num_layers: int) -> None:
    """Refuse a total rank below one per adapted layer."""
    if budget < num_layers:
        raise ValueError(
            f"rank_budget={budget} is smaller than the number of adapted layers ({num_layers}); "
            f"every layer needs rank ≥ 1, so set rank_budget ≥ {num_layers}"
        )


def allocate_ranks(scores: Mapping[str, tuple[Tensor, float]], budget: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Ranks per layer summing to `budget` (clipped to what the caps allow); each in [1, cap].

    `scores[name]` is (component scores, descending; the layer's total scored mass).
    """
    check_budget(budget, len(scores))
    ranks = dict.fromkeys(scores, 1)
    pool: list[tuple[float, str, int]] = []
    for name, (s, total) in scores.items():
        fractions = (s / total).tolist() if total > 0 else [0.0] * s.numel()
        pool.extend((-f, name, i) for i, f in enumerate(fractions[1 : caps[name]], start=1))
    pool.sort()
    left = budget - len(scores)
    for _, name, _ in pool[:left]:
        ranks[name] += 1
    return ranks
