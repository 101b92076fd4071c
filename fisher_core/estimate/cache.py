"""Statistics cache: one safetensors file, its metadata naming what it was computed from.

A cache is reused only when the model fingerprint (a checksum of every weight of the model), the data,
the targets, the statistics settings and the library version all match, and the file holds finite
statistics of every target's shapes; otherwise it is refused with the file and the mismatch named.
Writes are atomic (temporary file, then rename), so an interrupted run leaves no partial cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fisher_core.config import FisherConfig
from fisher_core.estimate.distributed import global_min
from fisher_core.estimate.factors import FisherStats, LayerStats, group_of, shares_input
from fisher_core.estimate.sums import FactorSketch, LowRank, is_finite
from fisher_core.io import atomic_path
from fisher_core.layers import base_layer, canonical_name, layer_kind
from fisher_core.sharded import Gathering, whole

logger = logging.getLogger("fisher_core")
FORMAT = "fisher-lora-stats/1"


class CacheMismatchError(ValueError):
    """The cache file was computed from another model, other targets, settings or version."""


def fingerprint(model: nn.Module, gathering: Gathering | None = None) -> str:
    """sha256 over every parameter and buffer of `model` (name, shape, dtype and `_checksum` of all
    its bytes), and over the LoRA factors of active adapters with B ≠ 0: a layer's statistics depend on every
    weight around it (S_G on the MLPs, norms and head downstream, S_A on everything upstream), so another
    fine-tune of the same base that shares the adapted layers' weights must not match. LoRA factors are left
    out where they change nothing (adapters disabled, or a fresh adapter, B = 0, whatever its random A); a
    trained adapter re-initialized with `force` is part of the model the statistics are of. Names drop PEFT's
    and FSDP's wrapper segments and `.base_layer`, so a plain model and its PEFT model with a fresh adapter agree.

    Cost: every byte of the model is read once, on its own device (no copy to the CPU), with two int64
    operations per 16-bit word: measured on one CPU core, 0.9 s per 100 M bf16 parameters, 2.3 s per 100 M
    fp32; on a GPU, ~34 bytes of memory traffic per bf16 parameter (estimated, not measured: ~10 ms per
    billion at 3 TB/s), against seconds to minutes for the statistics pass it saves. Sharded models are
    read whole one module at a time (a collective on a sharded model: every process calls it; FSDP1 with the
    `Gathering` of a `whole_parameters` region). Weights offloaded to the meta device cannot be read: refused
    with a `ValueError`.
    """
    gathering = gathering or Gathering()
    h = hashlib.sha256()
    read: dict[int, bytes] = {}  # by parameter: a tied weight (lm_head = embed_tokens) is read once
    for raw, module in model.named_modules():
        if LORA_FACTORS.intersection(raw.split(".")):
            continue
        name = canonical_name(raw).replace(".base_layer", "")
        factors = isinstance(getattr(module, "lora_A", None), nn.ModuleDict)  # a LoRA layer: read its factors
        with gathering.layer(module, recurse=factors):  # the parameters read here whole, then sharded again
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for key, t in sorted((f"{name}.{k}", t) for k, t in own if k != FSDP1_FLAT_PARAM):
                if id(t) not in read:
                    read[id(t)] = _checksum(key, whole(t))
                h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode() + read[id(t)])
            for key, t in sorted(_active_factors(name, module).items()):
                h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode() + _checksum(key, t))
    return h.hexdigest()


LORA_FACTORS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}
FSDP1_FLAT_PARAM = "_flat_param"  # FSDP1's flattened copy of its unit's parameters, each also read on its own
_CHUNK = 1 << 16  # words per checksum: Σ |x_i·k_i| < 2¹⁵·2³¹·2¹⁶ = 2⁶², exact in int64
_BLOCK = 256 * _CHUNK  # words converted to int64 at once (128 MiB)
_KEYS: dict[torch.device, torch.Tensor] = {}


def _checksum(name: str, t: torch.Tensor) -> bytes:
    """`Σ_i x_i·k_i` per chunk of 2¹⁶ words of `t`'s bytes (signed 16-bit words x_i, bytes for 1-byte dtypes),
    with fixed keys k_i ∈ [1, 2³¹) (`_keys`), in exact int64 arithmetic: the same on every device and in every
    reduction order. Every element is read; a change to one word always changes its chunk's sum (k_i ≠ 0); a
    change to several goes unseen only if `Σ δ_i·k_i = 0` exactly (for a change not built from the keys, about
    as likely as a random 31-bit collision). Chunks stay in order, so moved chunks show too."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device (offloaded or not loaded): the statistics cache cannot check it; "
            "load the model's weights, or set cache_path=None"
        )
    flat = t.detach().contiguous().reshape(-1)
    words = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
    keys = _keys(words.device)
    full = words.numel() // _CHUNK * _CHUNK
    sums = [
        words[start : min(start + _BLOCK, full)].to(torch.int64).view(-1, _CHUNK).mul_(keys).sum(dim=1)
        for start in range(0, full, _BLOCK)
    ]
    if full < words.numel():
        tail = words[full:].to(torch.int64)
        sums.append(tail.mul_(keys[: tail.numel()]).sum().reshape(1))
    return torch.cat(sums).cpu().numpy().tobytes() if sums else b""


def _keys(device: torch.device) -> torch.Tensor:
    """k_i ∈ [1, 2³¹) for i < 2¹⁶: an integer mix of i (multiply, xor-shift), the same on every machine."""
    if device not in _KEYS:
        i = torch.arange(_CHUNK, dtype=torch.int64, device=device)
        k = (i * 0x9E3779B1) & 0x7FFFFFFF
        k = ((k ^ (k >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
        _KEYS[device] = (k ^ (k >> 13)) % (2**31 - 1) + 1
    return _KEYS[device]


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
    weights: str = "",
) -> None:
    """Write `stats` atomically; shared input factors are stored once. `weights`: the model's `fingerprint`
    (empty: no model to check against, so `load_matching` never reuses the file)."""
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
        "fingerprint": weights,
        "targets": json.dumps(sorted(modules)),
        "layers": json.dumps(layers),
        "num_batches_used": str(stats.num_batches),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    logger.info("fisher-lora: statistics cached at %s", path)


def load_matching(
    path: Path, modules: Mapping[str, nn.Module], config: FisherConfig, data: str, weights: str
) -> FisherStats | None:
    """The cached statistics if `path` exists and matches on every process; None on every process if it does not
    exist on one (a cache on one node's local disk): then all of them compute the pass, which is a collective.
    A collective under torch.distributed.

    `data`, `weights`: the `data_fingerprint` of the batches and the model's `fingerprint`.

    Raises `CacheMismatchError` naming the file and the first mismatch, or what makes it no valid cache for
    `modules` (a directory, unreadable, metadata or tensors missing, shapes that are not the layers',
    non-finite values): delete the file or pass another `cache_path` to recompute. Every process raises when
    one does.
    """
    mismatch: CacheMismatchError | None = None
    try:
        cached = _load_local(path, modules, config, data, weights)
    except CacheMismatchError as e:
        mismatch, cached = e, None
    agreed = global_min(-1 if mismatch else int(cached is not None))  # -1: a mismatch, 0: a miss, 1: a hit
    if agreed == -1:
        raise mismatch or CacheMismatchError(
            f"statistics cache {path}: another process's copy does not match this run; delete it on every node "
            "or set another cache_path to recompute"
        )
    if agreed == 0 or cached is None:
        return None
    logger.info("fisher-lora: reusing cached statistics from %s", path)
    cached.meta["cache"] = str(path)
    return cached


def _load_local(
    path: Path, modules: Mapping[str, nn.Module], config: FisherConfig, data: str, weights: str
) -> FisherStats | None:
    """This process's `load_matching`: the statistics at `path` if it exists and matches, None if it does not
    exist; raises `CacheMismatchError` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CacheMismatchError(f"statistics cache {path} is a directory; set cache_path to a file path")
    if not path.exists():
        return None
    try:
        tensors = load_file(path)
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
    if meta.get("fingerprint") != weights:
        raise CacheMismatchError(
            f"statistics cache {path} was computed from other model weights (fingerprint differs); "
            "delete the file or set another cache_path to recompute"
        )
    return _checked_stats(path, tensors, meta, modules)


def _checked_stats(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], modules: Mapping[str, nn.Module]
) -> FisherStats:
    """`unpack_stats`, refused with `CacheMismatchError` unless every target has statistics of its shapes
    (S_A n×n, S_G m×m, Ḡ m×n for an m×n weight) and every value is finite."""
    try:
        stats = unpack_stats(tensors, meta)
        problem = next(filter(None, (_layer_problem(n, stats[n], modules[n]) for n in modules)), None)
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # metadata or tensors missing or malformed
        problem = f"its metadata or tensors are malformed ({type(e).__name__}: {e})"
    if problem is not None:
        raise CacheMismatchError(
            f"statistics cache {path} is not a valid cache for this model: {problem}; delete it to recompute"
        )
    return stats


def _layer_problem(name: str, s: LayerStats, module: nn.Module) -> str | None:
    """What is wrong with layer `name`'s cached statistics for its m×n weight, or None."""
    m, n = layer_kind(module).shape(base_layer(module))
    parts = {"input_cov": (s.input_cov, (n, n)), "grad_cov": (s.grad_cov, (m, m)), "mean_grad": (s.mean_grad, (m, n))}
    for kind, (stat, shape) in parts.items():
        if stat is None:
            continue
        if tuple(stat.shape) != shape or not _consistent(stat):
            return f"{name} {kind} has shape {tuple(stat.shape)}, the layer needs {shape}"
        if not is_finite(stat):
            return f"{name} {kind} holds non-finite values"
    return None


def _consistent(stat: object) -> bool:
    """A sketch's test matrix and image have one shape; a low-rank pair's inner sizes agree."""
    if isinstance(stat, FactorSketch):
        return stat.omega.shape == stat.y.shape
    if isinstance(stat, LowRank):
        return stat.left.shape[1] == stat.right.shape[0]
    return stat.dim() == 2


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
