"""Memory plan: which statistics stay dense and which become fixed-size sketches.

Dense fp32 factors cost `4·(n² + m²)` bytes per layer (`S_A` shared by layers that read the same
input), plus `4·m·n` for the mean gradient; a factor sketch costs `4·d·k` for its sums, plus the test
matrices, `4·d·k` once per (input or gradient, width) (`sums.SketchMatrices`). When the dense total exceeds
`memory_budget`, the largest statistics are sketched first until the total fits; if even all
sketches do not fit, the error names the budget and the need. The layer inputs the pass holds for Ḡ
(until each layer's gradient arrives) count against the same budget: they are measured batch by batch,
and when they leave too little room the plan is tightened mid-pass (`refit`: dense sums turn into sketches
of what they hold, exactly). `initial_plan` and `refit` are pure: the pass logs what they decided.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from fisher_core.config import FisherConfig, default_sketch_rank

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
    unread_inputs: Collection[str] = (),
) -> dict[str, set[str]]:
    """For each layer, the statistics ("input", "grad", "mean_grad") to keep as sketches.

    Statistics with a dimension above `sketch_above` are always sketched (their spectra are only
    ever used through their top part, and a sketch costs O(d·k) per token instead of O(d²)); the
    rest are sketched largest-first while the total exceeds `budget`. Input factors are counted
    per layer (sharing is only known after the first forward), so the plan errs on the safe side.
    `sketched`: statistics already sketched (a plan being tightened keeps them); `unread_inputs`: layers
    known to read another layer's input, whose own input factor is not kept.
    """
    sketched = {name: set(whats) for name, whats in (sketched or {}).items()}
    if sketch_above is not None:
        for name, (m, n) in shapes.items():
            for what, big in (("input", n), ("grad", m), ("mean_grad", max(m, n) if with_mean_grad else 0)):
                if big > sketch_above:
                    sketched.setdefault(name, set()).add(what)
    if budget is None:
        return sketched
    total = _sketch_largest_first(shapes, with_mean_grad, budget, sketch_rank, sketched, unread_inputs)
    if total > budget:
        raise MemoryError(
            f"memory_budget={budget} bytes cannot hold the statistics of {len(shapes)} layers: even with every "
            f"factor sketched at rank {sketch_rank} they need {total} bytes; raise memory_budget, lower "
            "sketch_rank, or adapt fewer layers"
        )
    return sketched


def _sketch_largest_first(
    shapes: Mapping[str, tuple[int, int]], with_mean_grad: bool, budget: int, k: int, sketched: dict[str, set[str]],
    unread_inputs: Collection[str],
) -> int:  # fmt: skip
    """Add statistics to `sketched` (in place), largest first, while the planned bytes exceed `budget`; return
    the planned bytes. A sketch's change counts the test matrices it is the first to need."""
    total = planned_bytes(shapes, with_mean_grad, sketched, k, unread_inputs)
    drawn = _all_test_matrices(shapes, with_mean_grad, sketched, k)
    candidates = [(n * n, name, "input") for name, (m, n) in shapes.items()]
    candidates += [(m * m, name, "grad") for name, (m, n) in shapes.items()]
    candidates += [(m * n, name, "mean_grad") for name, (m, n) in shapes.items()] if with_mean_grad else []
    for _, name, what in sorted(candidates, key=lambda i: (-i[0], i[1], i[2])):
        current = sketched.get(name, set())
        if total <= budget:
            break
        if what in current:
            continue
        (m, n), own = shapes[name], name not in unread_inputs
        new = _test_matrices(m, n, with_mean_grad, current | {what}, k) - drawn
        change = FLOAT_BYTES * sum(d * cols for _, d, cols in new)
        change += _layer_bytes(m, n, with_mean_grad, current | {what}, k, own)
        change -= _layer_bytes(m, n, with_mean_grad, current, k, own)
        if change < 0:
            sketched[name], total, drawn = current | {what}, total + change, drawn | new
    return total


def planned_bytes(
    shapes: Mapping[str, tuple[int, int]],
    with_mean_grad: bool,
    sketched: Mapping[str, set[str]],
    sketch_rank: int,
    unread_inputs: Collection[str] = (),
) -> int:
    """Bytes of the statistics under a plan: `_layer_bytes` summed over the layers, and the test matrices."""
    sums = sum(
        _layer_bytes(m, n, with_mean_grad, sketched.get(name, set()), sketch_rank, name not in unread_inputs)
        for name, (m, n) in shapes.items()
    )
    tests = _all_test_matrices(shapes, with_mean_grad, sketched, sketch_rank)
    return sums + FLOAT_BYTES * sum(d * k for _, d, k in tests)


@dataclass(frozen=True)
class Plan:
    """Which statistics of each layer are sketches ("input", "grad", "mean_grad"), their rank k, and whether the
    pass checkpoints every transformers block (`checkpoint_blocks`: a budget and a Ḡ to hold layer inputs for,
    so the pass holds one block's inputs at a time; no statistic changes)."""

    sketched: dict[str, set[str]]
    sketch_rank: int
    checkpoint_blocks: bool = False


def requested_sketch_rank(config: FisherConfig, lora_ranks: Collection[int]) -> int:
    """k as set, or the default for the largest LoRA rank (`default_sketch_rank`): where `initial_plan` starts."""
    return config.sketch_rank or default_sketch_rank(max(lora_ranks, default=0))


def initial_plan(
    shapes: Mapping[str, tuple[int, int]], config: FisherConfig, budget: int | None, lora_ranks: Collection[int]
) -> Plan:
    """The memory plan before the pass: statistics above `exact_max_dim` (solver auto; all for lowrank, none for
    exact) are sketches, the rest sketched largest-first while the budget needs it, at `sketch_rank` as set or
    else the default (`default_sketch_rank`) halved while the budget cannot hold even sketches, down to the least
    the selector can use (a sketched Ḡ holds k/2 directions: 2·r, or 2·ρ·r under `rank_budget`). MemoryError,
    saying what to change, when nothing fits."""
    sketch_above = {"auto": config.exact_max_dim, "exact": None, "lowrank": 0}[config.solver]
    k = requested_sketch_rank(config, lora_ranks)
    least = (
        2 * max(lora_ranks) * (math.ceil(config.rank_cap) if config.rank_budget is not None else 1) if lora_ranks else k
    )
    while True:
        try:
            sketched = plan_sketches(shapes, config.needs_mean_grad, budget, k, sketch_above)
        except MemoryError:
            if config.sketch_rank is not None or k // 2 < least:
                raise
            k //= 2
            continue
        return Plan(sketched, k, checkpoint_blocks=budget is not None and config.needs_mean_grad)


def refit(
    plan: Plan, shapes: Mapping[str, tuple[int, int]], config: FisherConfig, budget: int | None, held: int,
    unread_inputs: Collection[str] = (),
) -> Plan:  # fmt: skip
    """The plan during the pass, given what it measured (`held`: the bytes of layer inputs held for Ḡ at once, the
    most over processes; `unread_inputs`: layers known to read another's input): `plan` itself if its statistics
    plus `held` fit the budget, else a tighter plan at the same rank (dense sums become sketches of what they
    hold). What is held grows with the tokens of a batch and is bounded by checkpointing (one block's inputs),
    not by sketching; MemoryError, saying what to change, when nothing fits."""
    k, with_mean_grad = plan.sketch_rank, config.needs_mean_grad
    if budget is None or planned_bytes(shapes, with_mean_grad, plan.sketched, k, unread_inputs) + held <= budget:
        return plan
    try:
        sketched = plan_sketches(
            shapes, with_mean_grad, budget - held, k, sketched=plan.sketched, unread_inputs=unread_inputs
        )
    except MemoryError:
        raise MemoryError(
            f"memory_budget={budget} bytes: the pass holds {held} bytes of layer inputs for Ḡ at once, which "
            "leaves too little for the statistics even sketched; use fewer tokens per calibration batch or "
            "position_fraction < 1, or raise memory_budget (a model of transformers blocks is checkpointed for the "
            "pass, so this is one block's inputs; another model must checkpoint its own blocks)"
        ) from None
    return Plan(sketched, k, plan.checkpoint_blocks)


def _test_matrices(m: int, n: int, with_mean_grad: bool, sketched: set[str], k: int) -> set[tuple[str, int, int]]:
    """The (role, d, k) test matrices one m×n layer's sketches use (as `StatsAccumulator` draws them: an input
    sketch is drawn before the pass shows whether another layer's sum is the one kept)."""
    both = with_mean_grad and "mean_grad" in sketched  # Ḡ's sketch reads both
    tests = {("input", n, min(k, n))} if both or "input" in sketched else set()
    return tests | ({("grad", m, min(k, m))} if both or "grad" in sketched else set())


def _all_test_matrices(
    shapes: Mapping[str, tuple[int, int]], with_mean_grad: bool, sketched: Mapping[str, set[str]], k: int
) -> set[tuple[str, int, int]]:
    """Every distinct test matrix a plan's sketches use."""
    tests = (_test_matrices(m, n, with_mean_grad, sketched.get(name, set()), k) for name, (m, n) in shapes.items())
    return set().union(*tests)


def _layer_bytes(m: int, n: int, with_mean_grad: bool, sketched: set[str], k: int, own_input: bool = True) -> int:
    """fp32 bytes of one m×n layer's sums (its test matrices are shared, `_test_matrices`): a dense factor `d²`,
    a factor sketch `d·k`, a dense `Ḡ` `m·n`, a sketched one `m·k_y + l·n` (as in `sums.CrossSketch`). A layer
    that reads another's input (`own_input=False`) keeps no input factor."""
    k_in, k_out = min(k, n), min(k, m)
    numbers = 0 if not own_input else n * k_in if "input" in sketched else n * n
    numbers += m * k_out if "grad" in sketched else m * m
    if with_mean_grad:
        k_y = max(1, min(k, n, k_out) // 2)
        numbers += m * k_y + k_out * n if "mean_grad" in sketched else m * n
    return FLOAT_BYTES * numbers
