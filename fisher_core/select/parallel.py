"""Selection spread over processes: each group of layers is solved by one process, the results shared.

Under `torch.distributed` every process holds the same (all-reduced) statistics, so solving every layer
everywhere repeats the eigendecompositions `world_size` times. Instead the layers are split into
groups that share an input factor (q/k/v, gate/up: their `S_A` is decomposed once, by one process),
groups are dealt out longest first to the least loaded process (LPT scheduling, deterministic), each
process solves its own, and one `all_gather_object` gives every process every layer's candidates.
The result is identical to a single process's: each layer's solve depends only on its statistics. A solve
that raises is raised on every process, not only its owner (the others would wait in the gather).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping

import torch.distributed as dist

from fisher_core.estimate.distributed import world_size
from fisher_core.select.base import Candidates


def solve_cost(shape: tuple[int, int], shares_input: bool) -> float:
    """Relative cost of one layer's solve: the cubic terms of its factor decompositions and its SVD.

    `m³` for `S_G`, `n³` for `S_A` unless a sibling decomposes it, `m·n·min(m, n)` for the whitened SVD.
    """
    m, n = shape
    return float(m**3 + (0 if shares_input else n**3) + m * n * min(m, n))


def assign_owners(groups: Mapping[str, str], costs: Mapping[str, float], world: int) -> dict[str, int]:
    """The process that solves each layer: whole groups (`groups[layer]` = its group), longest first,
    each to the currently least loaded process (ties: the lower rank; equal costs: by name)."""
    group_cost: dict[str, float] = {}
    for name, group in groups.items():
        group_cost[group] = group_cost.get(group, 0.0) + costs[name]
    load = [0.0] * world
    owner_of_group: dict[str, int] = {}
    for group in sorted(group_cost, key=lambda g: (-group_cost[g], g)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner_of_group[group] = rank
        load[rank] += group_cost[group]
    return {name: owner_of_group[group] for name, group in groups.items()}


def solve_spread(
    names: list[str],
    groups: Mapping[str, str],
    costs: Mapping[str, float],
    solve: Callable[[str], Candidates],
) -> dict[str, Candidates]:
    """Every layer's candidates (in `names` order), each solved by the process `assign_owners` gives it; a
    collective under `torch.distributed` (every process must call it), a plain loop otherwise."""
    world = world_size()
    if world == 1:
        return {name: solve(name) for name in names}
    owners = assign_owners(groups, costs, world)
    local: dict[str, tuple] = {}
    failure: Exception | None = None
    try:
        for name in (n for n in names if owners[n] == dist.get_rank()):
            c = solve(name)
            local[name] = (c.B.cpu(), c.A.cpu(), c.scores.cpu(), c.total)
    except Exception as e:  # every process raises, not only the owner (the others would wait here forever)
        failure = e
    said = (type(failure).__name__, str(failure)) if failure is not None else None
    gathered: list[tuple[dict, tuple[str, str] | None] | None] = [None] * world
    dist.all_gather_object(gathered, (local, said))
    if failure is not None:
        raise failure
    raise_first_failure([(rank, part[1]) for rank, part in enumerate(gathered) if part is not None])
    merged: dict[str, tuple] = {}
    for part in gathered:
        merged.update(part[0] if part is not None else {})
    out = {}
    for name in names:
        b, a, scores, total = merged[name]
        out[name] = Candidates(B=b, A=a, scores=scores, total=total)
    return out


def raise_first_failure(said: list[tuple[int, tuple[str, str] | None]]) -> None:
    """Raise what the first failing process raised — (rank, (exception type, message)) — as the same built-in
    exception type (else `RuntimeError`), naming the process; nothing if none failed."""
    for rank, failure in said:
        if failure is not None:
            kind, message = failure
            cls = getattr(builtins, kind, None)
            cls = cls if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError
            raise cls(f"{message} (raised by process {rank} while selecting)")
