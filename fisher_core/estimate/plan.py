"""Memory plan: which statistics stay dense and which become fixed-size sketches.

Dense fp32 factors cost `4·(n² + m²)` bytes per layer (`S_A` shared by layers that read the same
input), plus `4·m·n` for the mean gradient; a sketch costs `4·d·k`. When the dense total exceeds
`memory_budget`, the largest statistics are sketched first until the total fits; if even all
sketches do not fit, the error names the budget and the need. The layer inputs the pass holds for Ḡ
(until each layer's gradient arrives) count against the same budget: they are measured batch by batch,
and when they leave too little room the plan is tightened mid-pass (`plan_for_held`: dense sums turn
into sketches of what they hold, exactly).
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
    sketched: Mapping[str, set[str]] | None = None,
) -> dict[str, set[str]]:
    """For each layer, the statistics ("input", "grad", "mean_grad") to keep as sketches.

    Statistics with a dimension above `sketch_above` are always sketched (their spectra are only
    ever used through their top part, and a sketch costs O(d·k) per token instead of O(d²)); the
    rest are sketched largest-first while the total exceeds `budget`. Input factors are counted
    per layer (sharing is only known after the first forward), so the plan errs on the safe side.
    `sketched`: statistics already sketched (a plan being tightened keeps them).
    """
    sketched = {name: set(whats) for name, whats in (sketched or {}).items()}
    if sketch_above is not None:
        for name, (m, n) in shapes.items():
            for what, big in (("input", n), ("grad", m), ("mean_grad", max(m, n) if with_mean_grad else 0)):
                if big > sketch_above:
                    sketched.setdefault(name, set()).add(what)
    if budget is None:
        return sketched
    items = _items(shapes, with_mean_grad, sketch_rank)
    total = planned_bytes(shapes, with_mean_grad, sketched, sketch_rank)
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


def planned_bytes(
    shapes: Mapping[str, tuple[int, int]], with_mean_grad: bool, sketched: Mapping[str, set[str]], sketch_rank: int
) -> int:
    """Bytes of the statistics under a plan: dense `4·d²` (`4·m·n` for Ḡ) or sketched `4·d·k` each."""
    items = _items(shapes, with_mean_grad, sketch_rank)
    return sum(sketch if what in sketched.get(name, ()) else dense for dense, sketch, name, what in items)


def plan_for_held(
    shapes: Mapping[str, tuple[int, int]],
    with_mean_grad: bool,
    budget: int | None,
    sketch_rank: int,
    sketched: Mapping[str, set[str]],
    held: int,
) -> dict[str, set[str]] | None:
    """A tighter plan when the statistics plus the layer inputs the pass holds for Ḡ exceed the budget
    (None while they fit); MemoryError, saying what to change, when even sketching all cannot make room.

    What is held is measured (the most at once so far, on any process), not planned: it grows with the
    tokens of a batch and is bounded by gradient checkpointing (one block's inputs), not by sketching.
    """
    if budget is None or planned_bytes(shapes, with_mean_grad, sketched, sketch_rank) + held <= budget:
        return None
    try:
        return plan_sketches(shapes, with_mean_grad, budget - held, sketch_rank, sketched=sketched)
    except MemoryError:
        raise MemoryError(
            f"memory_budget={budget} bytes: the pass holds {held} bytes of layer inputs for Ḡ at once, which "
            "leaves too little for the statistics even sketched; enable gradient checkpointing "
            "(model.gradient_checkpointing_enable(): the pass then holds one block's inputs), use fewer tokens "
            "per calibration batch or position_fraction < 1, or raise memory_budget"
        ) from None


def _items(
    shapes: Mapping[str, tuple[int, int]], with_mean_grad: bool, sketch_rank: int
) -> list[tuple[int, int, str, str]]:
    """(dense bytes, sketch bytes, layer, statistic) for every statistic of every layer."""
    items: list[tuple[int, int, str, str]] = []
    for name, (m, n) in shapes.items():
        items.append((FLOAT_BYTES * n * n, FLOAT_BYTES * n * min(sketch_rank, n), name, "input"))
        items.append((FLOAT_BYTES * m * m, FLOAT_BYTES * m * min(sketch_rank, m), name, "grad"))
        if with_mean_grad:
            co_rank = min(sketch_rank, m)  # as in sums.CrossSketch
            k_y = max(1, min(sketch_rank, n, co_rank) // 2)
            items.append((FLOAT_BYTES * m * n, FLOAT_BYTES * (m * k_y + co_rank * n), name, "mean_grad"))
    return items
