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
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fisher_core.config import FisherConfig
from fisher_core.estimate.factors import FisherStats, LayerStats
from fisher_core.io import atomic_path
from fisher_core.layers import base_layer, layer_kind

logger = logging.getLogger("fisher_core")
FORMAT = "fisher-lora-stats/1"


class CacheMismatchError(ValueError):
    """The cache file was computed from another model, other targets, settings or version."""


def fingerprint(modules: Mapping[str, nn.Module]) -> str:
    """sha256 over target names, shapes and a strided sample of each target's weight."""
    h = hashlib.sha256()
    for name, module in sorted(modules.items()):
        w = layer_kind(module).weight(base_layer(module))
        flat = w.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(w.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _settings(config: FisherConfig) -> dict[str, str]:
    from fisher_core import __version__

    return {
        "format": FORMAT,
        "version": __version__,
        "fisher_type": config.fisher_type,
        "mc_samples": str(config.mc_samples),
        "positions": config.positions,
        "num_batches": str(config.num_batches),
        "mean_grad": str(config.needs_mean_grad),
        "seed": str(config.seed),
    }


def save(
    stats: FisherStats, path: Path, model: nn.Module, modules: Mapping[str, nn.Module], config: FisherConfig
) -> None:
    """Write `stats` atomically; shared input factors are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, object]] = {}
    for name, s in stats.items():
        if s.input_group == name or not s.input_group:
            tensors[f"{name}/input_cov"] = s.input_cov.contiguous()
        tensors[f"{name}/grad_cov"] = s.grad_cov.contiguous()
        if s.mean_grad is not None:
            tensors[f"{name}/mean_grad"] = s.mean_grad.contiguous()
        layers[name] = {"num_tokens": s.num_tokens, "input_group": s.input_group or name}
    meta = {
        **_settings(config),
        "fingerprint": fingerprint(modules),
        "targets": json.dumps(sorted(modules)),
        "layers": json.dumps(layers),
        "num_batches_used": str(stats.num_batches),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    logger.info("fisher-lora: statistics cached at %s", path)


def load_matching(
    path: Path, model: nn.Module, modules: Mapping[str, nn.Module], config: FisherConfig
) -> FisherStats | None:
    """The cached statistics if `path` exists and matches; None if it does not exist.

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
    expected = {**_settings(config), "targets": json.dumps(sorted(modules))}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CacheMismatchError(
                f"statistics cache {path} was computed with {key}={meta.get(key)!r}, this run needs {value!r}; "
                "delete the file or set another cache_path to recompute"
            )
    if meta.get("fingerprint") != fingerprint(modules):
        raise CacheMismatchError(
            f"statistics cache {path} was computed from other model weights (fingerprint differs); "
            "delete the file or set another cache_path to recompute"
        )
    layers_meta = json.loads(meta["layers"])
    out: dict[str, LayerStats] = {}
    for name, info in layers_meta.items():
        group = info["input_group"]
        out[name] = LayerStats(
            input_cov=tensors[f"{group}/input_cov"],
            grad_cov=tensors[f"{name}/grad_cov"],
            num_tokens=int(info["num_tokens"]),
            mean_grad=tensors.get(f"{name}/mean_grad"),
            input_group=group,
        )
    logger.info("fisher-lora: reusing cached statistics from %s", path)
    stats = FisherStats(out, fisher_type=meta["fisher_type"], num_batches=int(meta["num_batches_used"]))
    stats.meta["cache"] = str(path)
    return stats
