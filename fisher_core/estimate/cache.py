"""Statistics cache: one safetensors file, its metadata naming what it was computed from.

A cache is reused only when the model fingerprint (target names, shapes and a sample of every target
weight), the statistics settings and the library version all match; otherwise it is refused with the
mismatch named. Writes are atomic (temporary file, then rename), so an interrupted run leaves no
partial cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import FisherStats, LayerStats, group_of, shares_input
from fisher_core.estimate.sums import FactorSketch, LowRank
from fisher_core.io import atomic_path
from fisher_core.layers import base_layer, layer_kind
from fisher_core.sharded import Gathering, whole

logger = logging.getLogger("fisher_core")
FORMAT = "fisher-lora-stats/1"


class CacheMismatchError(ValueError):
    """The cache file was computed from another model, other targets, settings or version."""


def fingerprint(modules: Mapping[str, nn.Module], gathering: Gathering | None = None) -> str:
    """sha256 over target names, shapes and a strided sample of each target's weight, and of its active LoRA
    factors where its adapters are on and B ≠ 0 (a trained adapter re-initialized with `force`: the statistics
    are of the model with it; a fresh adapter, B = 0, changes nothing whatever its random A).

    Reads whole weights (a collective on a sharded model: every process calls it; FSDP1 with the `Gathering`
    of a `whole_parameters` region).
    """
    gathering = gathering or Gathering()
    h = hashlib.sha256()
    for name, module in sorted(modules.items()):
        with gathering.layer(module):  # the sample is taken while the weights are whole: no full copy
            weights = {name: whole(layer_kind(module).weight(base_layer(module))), **_active_factors(name, module)}
            for key, w in weights.items():
                flat = w.reshape(-1)
                sample = flat[:: max(1, flat.numel() // 4096)][:4096].detach().to("cpu", torch.float32).contiguous()
                h.update(f"{key}:{tuple(w.shape)}".encode())
                h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _active_factors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors of `module`'s active adapters that change its output (adapters on, B ≠ 0), whole."""
    if getattr(module, "disable_adapters", True) is not False:
        return {}
    factors = {}
    for adapter in getattr(module, "active_adapters", ()):
        if adapter not in getattr(module, "lora_B", {}):
            continue
        b, a = whole(module.lora_B[adapter].weight), whole(module.lora_A[adapter].weight)
        if bool(b.detach().abs().max() > 0):
            factors |= {f"{name}.lora_A.{adapter}": a, f"{name}.lora_B.{adapter}": b}
    return factors


def data_fingerprint(batches: Sequence[Mapping[str, object]], *objective: Callable | None) -> str:
    """sha256 over every batch's tensors and the objective's functions (`loss_fn`, `logits_fn`: their
    qualified names and code): a cache computed on other data or another objective is refused."""
    h = hashlib.sha256()
    for batch in batches:
        for key, value in sorted(batch.items()) if isinstance(batch, Mapping) else ():
            if isinstance(value, torch.Tensor):
                h.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
                h.update(value.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    for fn in objective:
        code = getattr(fn, "__code__", None)
        h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}".encode())
        if code is not None:
            h.update(code.co_code + repr(code.co_consts).encode())
    return h.hexdigest()


def _settings(config: FisherConfig, data: str) -> dict[str, str]:
    from fisher_core import __version__

    return {
        "data": data,
        "format": FORMAT,
        "version": __version__,
        "fisher_type": config.fisher_type,
        "mc_samples": str(config.mc_samples),
        "positions": config.positions,
        "num_batches": str(config.num_batches),
        "mean_grad": str(config.needs_mean_grad),
        "seed": str(config.seed),
        "memory_budget": str(config.memory_budget),
        "sketch_rank": str(config.sketch_rank),
        "solver": config.solver,  # dense or sketched statistics
        "exact_max_dim": str(config.exact_max_dim),
        "position_fraction": str(config.position_fraction),
        "stop_tol": str(config.stop_tol),
    }


def save(
    stats: FisherStats,
    path: Path,
    modules: Mapping[str, nn.Module],
    config: FisherConfig,
    data: str,
    weights: str | None = None,
) -> None:
    """Write `stats` atomically; shared input factors are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, object]] = {}
    for name, s in stats.items():
        kinds = {}
        if not shares_input(s.input_group, name):
            kinds["input_cov"] = _pack(s.input_cov, f"{name}/input_cov", tensors)
        kinds["grad_cov"] = _pack(s.grad_cov, f"{name}/grad_cov", tensors)
        if s.mean_grad is not None:
            kinds["mean_grad"] = _pack(s.mean_grad, f"{name}/mean_grad", tensors)
        layers[name] = {"num_tokens": s.num_tokens, "input_group": group_of(s.input_group, name), "kinds": kinds}
    meta = {
        **_settings(config, data),
        "fingerprint": weights or fingerprint(modules),
        "targets": json.dumps(sorted(modules)),
        "layers": json.dumps(layers),
        "num_batches_used": str(stats.num_batches),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    logger.info("fisher-lora: statistics cached at %s", path)


def load_matching(
    path: Path, modules: Mapping[str, nn.Module], config: FisherConfig, data: str, weights: str | None = None
) -> FisherStats | None:
    """The cached statistics if `path` exists and matches; None if it does not exist.

    `weights`: the modules' `fingerprint`, if already computed (default: computed here).

    Raises `CacheMismatchError` naming the first mismatch (delete the file or pass another
    `cache_path` to recompute).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CacheMismatchError(f"statistics cache {path} is unreadable ({e}); delete it to recompute") from e
    expected = {**_settings(config, data), "targets": json.dumps(sorted(modules))}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CacheMismatchError(
                f"statistics cache {path} was computed with {key}={meta.get(key)!r}, this run needs {value!r}; "
                "delete the file or set another cache_path to recompute"
            )
    if meta.get("fingerprint") != (weights or fingerprint(modules)):
        raise CacheMismatchError(
            f"statistics cache {path} was computed from other model weights (fingerprint differs); "
            "delete the file or set another cache_path to recompute"
        )
    logger.info("fisher-lora: reusing cached statistics from %s", path)
    stats = unpack_stats(tensors, meta)
    stats.meta["cache"] = str(path)
    return stats


def unpack_stats(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> FisherStats:
    """Rebuild `FisherStats` from a cache file's tensors and metadata (no compatibility checks)."""
    layers_meta = json.loads(meta["layers"])
    out: dict[str, LayerStats] = {}
    shared: dict[str, object] = {}
    for name, info in layers_meta.items():
        group, kinds = info["input_group"], info["kinds"]
        if group not in shared:
            shared[group] = _unpack(f"{group}/input_cov", layers_meta[group]["kinds"]["input_cov"], tensors)
        out[name] = LayerStats(
            input_cov=shared[group],
            grad_cov=_unpack(f"{name}/grad_cov", kinds["grad_cov"], tensors),
            num_tokens=int(info["num_tokens"]),
            mean_grad=_unpack(f"{name}/mean_grad", kinds["mean_grad"], tensors) if "mean_grad" in kinds else None,
            input_group=group,
        )
    return FisherStats(out, fisher_type=meta["fisher_type"], num_batches=int(meta["num_batches_used"]))


def _pack(obj: object, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """Store a statistic's tensors under `key`; return what `_unpack` needs to rebuild it."""
    if isinstance(obj, FactorSketch):
        # test matrices are shared by every sketch of one width: each stored as its own copy
        tensors[f"{key}.omega"], tensors[f"{key}.y"] = obj.omega.clone(), obj.y.contiguous()
        return {"kind": "sketch", "trace": obj.trace}
    if isinstance(obj, LowRank):
        tensors[f"{key}.left"], tensors[f"{key}.right"] = obj.left.contiguous(), obj.right.contiguous()
        return {"kind": "lowrank"}
    tensors[key] = obj.contiguous()
    return {"kind": "dense"}


def _unpack(key: str, info: dict[str, object], tensors: dict[str, torch.Tensor]) -> object:
    if info["kind"] == "sketch":
        return FactorSketch(tensors[f"{key}.omega"], tensors[f"{key}.y"], float(info["trace"]))
    if info["kind"] == "lowrank":
        return LowRank(tensors[f"{key}.left"], tensors[f"{key}.right"])
    return tensors[key]
