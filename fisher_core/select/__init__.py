"""Directions: turn statistics into rank-r LoRA factors per layer (docs/design.md §2–§3).

`select` reads W and the LoRA scale `s` of each layer, asks the configured selector for candidate
components, allocates ranks (uniform, or under `rank_budget`), and applies the step-0 policy:

- `preserve`: `B, A` as the selector gives them; the base keeps `W − s·B·A` (written by `apply`).
- `zero`: `B = 0`, `A`'s rows rescaled to PEFT's default row norm; the base is untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fisher_core.config import FisherConfig, default_sketch_rank
from fisher_core.estimate.factors import FisherStats, LayerStats, group_of
from fisher_core.layers import base_layer, canonical_name, layer_kind
from fisher_core.select.base import Candidates, Selector, Solver
from fisher_core.select.fwsvd import select_fwsvd
from fisher_core.select.linalg import DEFAULT_ROW_NORM, activation_matched, fix_signs, with_norm
from fisher_core.select.natural import select_natural
from fisher_core.select.parallel import solve_cost, solve_spread
from fisher_core.select.ranks import allocate_ranks
from fisher_core.select.sensitivity import select_sensitive
from fisher_core.select.subspace import select_subspace
from fisher_core.sharded import Gathering, is_sharded, whole, whole_parameters

# selectors that read W's values (the others need only its shape, which a sharded W knows whole)
READS_WEIGHTS = ("select", "fwsvd")
SELECTORS: dict[str, Selector] = {
    "select": select_sensitive,
    "fwsvd": select_fwsvd,
    "natural": select_natural,
    "subspace": select_subspace,
}


@dataclass
class LayerDirections:
    """The factors for one layer: the adapter starts at `s·B·A`; `residual` is what leaves W."""

    B: Tensor  # m×r, fp32
    A: Tensor  # r×n, fp32
    scaling: float
    scores: Tensor  # the selector's component scores, descending
    total: float  # the layer's whole scored mass
    policy: str

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def captured(self) -> float:
        """Fraction of the layer's scored Fisher mass in the chosen components."""
        return float(self.scores[: self.rank].sum()) / self.total if self.total > 0 else 0.0


@dataclass
class Directions(Mapping[str, LayerDirections]):
    """Per-layer factors plus the PEFT patterns that carry non-uniform ranks."""

    layers: dict[str, LayerDirections]
    selector: str
    policy: str
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerDirections:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def select(
    stats: FisherStats,
    model: nn.Module,
    *,
    rank: int | None = None,
    config: FisherConfig | None = None,
    adapter_name: str = "default",
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    gathering: Gathering | None = None,
    scale_stats: FisherStats | None = None,
) -> Directions:
    """Rank-r factors for every layer in `stats`.

    On a PEFT model, each layer's rank and scale `s` come from its LoRA adapter `adapter_name`; on a
    plain model pass `rank` (and `lora_alpha`, default `rank`, so `s = α/r` or `α/√r` with rsLoRA).
    Under `torch.distributed` this is a collective, like `estimate`: every process calls it, each solves
    a share of the layers (`fisher_core.select.parallel`) and all return the same directions. `gathering`:
    that of an enclosing `whole_parameters(model)` region (`initialize` hands its own); None enters one.
    `scale_stats`: whose `S_A` sets A's scale under `zero_scale='activation'` — the inputs training sees
    (None: `stats`; keep mode selects on the keep data's factors but scales on the task's).
    """
    region = whole_parameters(model) if gathering is None else contextlib.nullcontext(gathering)
    with region as gathering:  # FSDP1: one unit whole at a time
        config = config or FisherConfig()
        modules = {canonical_name(n): m for n, m in model.named_modules()}
        plans = {
            name: _layer_plan(modules, name, adapter_name, rank, lora_alpha, use_rslora, gathering) for name in stats
        }
        ranks = {name: plan[1] for name, plan in plans.items()}
        if config.rank_budget is not None:
            caps = {name: min(math.ceil(config.rank_cap * r), min(w.shape)) for name, (w, r, _, _) in plans.items()}
        else:
            caps = ranks
        fn = SELECTORS[config.selector]
        spectra: dict = {}  # shared by every layer's solver: a shared factor is decomposed once

        def solve(name: str, weight: Tensor | None = None) -> Candidates:
            planned, _, scaling, _ = plans[name]
            weight = planned if weight is None else weight
            return fn(weight, stats[name], caps[name], scaling, config, _solver(config, weight, caps[name], spectra))

        groups = {name: group_of(stats[name].input_group, name) for name in plans}
        costs = {name: solve_cost(tuple(w.shape), groups[name] != name) for name, (w, _, _, _) in plans.items()}
        if config.selector in READS_WEIGHTS and any(is_sharded(w) or w.is_meta for w, _, _, _ in plans.values()):
            # sharded weights whose values the selector reads: each layer's W is gathered only while it is
            # solved, by every process in the same order (a gather is a collective), so the solves are not spread
            cands = {name: solve(name, _whole_weight(modules[name], plans[name][0], gathering)) for name in plans}
        else:
            cands = solve_spread(list(plans), groups, costs, solve)
        if config.rank_budget is not None:
            ranks = allocate_ranks({n: (c.scores, c.total) for n, c in cands.items()}, config.rank_budget, caps)
        scale_stats = stats if scale_stats is None else scale_stats
        layers = {name: _finish(cands[name], ranks[name], plans[name][2], config, scale_stats[name]) for name in plans}
        directions = Directions(layers, selector=config.selector, policy=config.policy)
        if config.rank_budget is not None:  # the scale s stays as configured: α_l = s·r_l (s·√r_l with rsLoRA)
            for name, (_, _, scaling, rslora) in plans.items():
                directions.rank_pattern[name] = ranks[name]
                directions.alpha_pattern[name] = scaling * (math.sqrt(ranks[name]) if rslora else ranks[name])
        return directions


def _whole_weight(module: nn.Module, weight: Tensor, gathering: Gathering) -> Tensor:
    """`W` whole: an FSDP2 DTensor all-gathered, a ZeRO-3 layer or FSDP1 unit gathered (collectives); else as it is."""
    if not weight.is_meta:
        return whole(weight)
    base = base_layer(module)
    with gathering.layer(base):
        return layer_kind(module).weight(base).clone()


def _layer_plan(
    modules: Mapping[str, nn.Module], name: str, adapter_name: str, rank: int | None, lora_alpha: float | None,
    use_rslora: bool, gathering: Gathering,
) -> tuple[Tensor, int, float, bool]:  # fmt: skip
    """(W, r, s, rsLoRA) of layer `name`; W is a meta tensor of its shape where the layer is gathered only
    when read (ZeRO-3, FSDP1)."""
    if name not in modules:
        raise KeyError(f"statistics name layer {name!r}, which this model does not have; estimate on this model")
    module = modules[name]
    r, scaling, rslora = _lora_settings(module, adapter_name, rank, lora_alpha, use_rslora, name)
    kind, base = layer_kind(module), base_layer(module)
    weight = torch.empty(kind.shape(base), device="meta") if gathering.by_layer(base) else kind.weight(base)
    if r > min(weight.shape):
        raise ValueError(f"rank {r} exceeds min(out, in) = {min(weight.shape)} of layer {name!r}; lower the rank")
    return weight, r, scaling, rslora


def _solver(config: FisherConfig, weight: Tensor, k: int, spectra: dict) -> Solver:
    """Exact decompositions for small layers (or when asked), top-k ones for large layers."""
    exact = config.solver == "exact" or (config.solver == "auto" and max(weight.shape) <= config.exact_max_dim)
    # a full SVD costs O(mn·min(m,n)); the top k (k ≪ min(m,n)) come as accurately from a few power iterations
    svd_exact = config.solver == "exact" or (exact and 4 * (k + 10) >= min(weight.shape))
    return Solver(
        sketch=None if exact else config.sketch_rank or default_sketch_rank(k),
        seed=config.seed,
        svd_exact=svd_exact,
        spectra=spectra,
    )


def _finish(c: Candidates, r: int, scaling: float, config: FisherConfig, stats: LayerStats) -> LayerDirections:
    """The first `r` candidates under the step-0 policy: `zero` sets B = 0 and A's scale (`config.zero_scale`,
    `activation`: matched on `stats.input_cov`)."""
    b, a = fix_signs(c.B[:, :r].contiguous(), c.A[:r].contiguous())
    if config.policy == "zero":
        _, a = with_norm(b, a, DEFAULT_ROW_NORM)
        if config.zero_scale == "activation":
            a = activation_matched(a, stats.input_cov)
        b = torch.zeros_like(b)
    return LayerDirections(B=b, A=a, scaling=scaling, scores=c.scores, total=c.total, policy=config.policy)


def _lora_settings(
    module: nn.Module, adapter_name: str, rank: int | None, lora_alpha: float | None, use_rslora: bool, name: str
) -> tuple[int, float, bool]:
    """(r, s, rsLoRA) from the layer's LoRA adapter, else from the arguments."""
    r_by_adapter = getattr(module, "r", None)
    if isinstance(r_by_adapter, dict):
        if adapter_name not in r_by_adapter:
            raise KeyError(
                f"layer {name!r} has no LoRA adapter {adapter_name!r} (it has {sorted(r_by_adapter)}); "
                "pass adapter_name=..."
            )
        r, scaling = r_by_adapter[adapter_name], module.scaling[adapter_name]
        if rank is not None and rank != r:
            raise ValueError(
                f"rank={rank} was given, but layer {name!r} is a LoRA layer of rank {r}: on a PEFT model the rank "
                "comes from its LoraConfig (change r there, or use rank_budget); rank= is for plain models"
            )
        return r, scaling, not math.isclose(scaling, module.lora_alpha[adapter_name] / r)
    if rank is None:
        raise ValueError(f"layer {name!r} has no LoRA adapter: pass rank=... (and lora_alpha=...)")
    alpha = float(lora_alpha if lora_alpha is not None else rank)
    return rank, alpha / math.sqrt(rank) if use_rslora else alpha / rank, use_rslora
