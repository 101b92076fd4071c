"""Memory plan: which statistics stay dense and which become fixed-size sketches.

Dense fp32 factors cost `4·(n² + m²)` bytes per layer (`S_A` shared by layers that read the same
input), plus `4·m·n` for the mean gradient; a sketch costs `4·d·k`. When the dense total exceeds
`memory_budget`, the largest statistics are sketched first until the total fits; if even all
sketches do not fit, the error names the budget and the need.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

logger = logging.getLogger("fisher_core")
FLOAT_BYTES = 4


def resolve_budget(budget: int | str | None, device: torch.device) -> int | None:
    """Bytes available for statistics: as given, or half the free accelerator memory for "auto"."""
    if budget != "auto":
        return budget
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    logger.info("fisher-lora: memory_budget='auto' on %s: no limit applied", device.type)
    return None


def plan_sketches(
    shapes: Mapping[str, tuple[int, int]],
    with_mean_grad: bool,
    budget: int | None,
    sketch_rank: int,
    sketch_above: int | None = None,
) -> dict[str, set[str]]:
    """For each layer, the statistics ("input", "grad", "mean_grad") to keep as sketches.

    Statistics with a dimension above `sketch_above` are always sketched (their spectra are only
    ever used through their top part, and a sketch costs O(d·k) per token instead of O(d²)); the
    rest are sketched largest-first while the total exceeds `budget`. Input factors are counted
    per layer (sharing is only known after the first forward), so the plan errs on the safe side.
    """
    sketched: dict[str, set[str]] = {}
    if sketch_above is not None:
        for name, (m, n) in shapes.items():
            for what, big in (("input", n), ("grad", m), ("mean_grad", max(m, n) if with_mean_grad else 0)):
                if big > sketch_above:
                    sketched.setdefault(name, set()).add(what)
    if budget is None:
        return sketched
    items: list[tuple[int, int, str, str]] = []  # (dense bytes, sketch bytes, layer, statistic)
    for name, (m, n) in shapes.items():
        items.append((FLOAT_BYTES * n * n, FLOAT_BYTES * n * min(sketch_rank, n), name, "input"))
        items.append((FLOAT_BYTES * m * m, FLOAT_BYTES * m * min(sketch_rank, m), name, "grad"))
        if with_mean_grad:
            co_rank = min(sketch_rank, m)  # as in sums.CrossSketch
            k_y = max(1, min(sketch_rank, n, co_rank) // 2)
            items.append((FLOAT_BYTES * m * n, FLOAT_BYTES * (m * k_y + co_rank * n), name, "mean_grad"))
    total = sum(sketch if what in sketched.get(name, ()) else dense for dense, sketch, name, what in items)
    for dense, sketch, name, what in sorted(items, key=lambda i: (-i[0], i[2], i[3])):
        if total <= budget:
            break
        if sketch < dense and what not in sketched.get(name, ()):
            sketched.setdefault(name, set()).add(what)
            total -= dense - sketch
    if total > budget:
        raise MemoryError(
            f"memory_budget={budget} bytes cannot hold the statistics of {len(shapes)} layers: even with every "
            f"factor sketched at rank {sketch_rank} they need {total} bytes; raise memory_budget, lower "
            "sketch_rank, or adapt fewer layers"
        )
    if sketched:
        logger.info(
            "fisher-lora: memory_budget=%d bytes: %d statistics sketched at rank %d, %d bytes planned",
            budget,
            sum(len(v) for v in sketched.values()),
            sketch_rank,
            total,
        )
    return sketched
