"""The keep pass and what `natural` whitens by in keep mode (docs/design.md §7).

The keep data's `S_A^K`, `S_G^K` come from the same pass as the task's (same Fisher type, positions,
memory plan; plain cross-entropy of its labels), without `Ḡ`. With a `cache_path` they are cached once
in a sibling file `<stem>.keep<suffix>`, keyed by `KeepData.key`, so a rerun neither generates nor passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from torch import nn

from fisher_core.config import FisherConfig
from fisher_core.estimate import FisherStats, estimate
from fisher_core.estimate.cache import fingerprint, load_matching, save
from fisher_core.estimate.distributed import global_fingerprint, is_main_process
from fisher_core.keep.data import KeepData
from fisher_core.sharded import whole_parameters


def keep_cache_path(cache_path: Path) -> Path:
    """Where the keep statistics of the task cache `cache_path` live: `stats.safetensors` → `stats.keep.safetensors`."""
    return cache_path.with_name(f"{cache_path.stem}.keep{cache_path.suffix}")


def factors_only(config: FisherConfig) -> FisherConfig:
    """The keep pass's settings: the task's, without `Ḡ` (`subspace` is the selector that reads none), without
    keep data of its own and without the task's cache file."""
    return config.model_copy(update={"selector": "subspace", "keep_knowledge": False, "keep_data": None,
                                     "cache_path": None})  # fmt: skip


def keep_statistics(
    model: nn.Module, modules: Mapping[str, nn.Module], config: FisherConfig, data: KeepData
) -> FisherStats:
    """`S_A^K`, `S_G^K` of every layer in `modules` on the keep data: read from the keep cache when it matches,
    else computed (generating the own answers if need be) and cached. A collective, like `estimate`."""
    keep_config = factors_only(config)
    if config.cache_path is None:
        return estimate(model, data.make(model), target_modules=modules, config=keep_config)
    path = keep_cache_path(Path(config.cache_path))
    with whole_parameters(model) as gathering:
        key = global_fingerprint(data.key), fingerprint(model, gathering)
    cached = load_matching(path, modules, keep_config, *key)
    if cached is not None:
        return cached
    stats = estimate(model, data.make(model), target_modules=modules, config=keep_config)
    if is_main_process():
        save(stats, path, modules, keep_config, *key)
    return stats


def keep_relative(task: FisherStats, keep: FisherStats) -> FisherStats:
    """Per layer: the task's `Ḡ` with the keep data's factors, what `natural` whitens it by in keep mode —
    `B ∝ (S_G^K)^{-1/2} U_r`, `A ∝ V_rᵀ (S_A^K)^{-1/2}` for `(S_G^K)^{-1/2} Ḡ_T (S_A^K)^{-1/2} = U Σ Vᵀ`."""
    layers = {
        name: replace(keep[name], mean_grad=task[name].mean_grad, num_tokens=task[name].num_tokens) for name in task
    }
    return FisherStats(layers, fisher_type=task.fisher_type, num_batches=task.num_batches, meta=dict(task.meta))
