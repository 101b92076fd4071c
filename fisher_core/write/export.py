"""`export_adapter`: save an adapter that loads with plain `PeftModel.from_pretrained` on the
*original* base model and reproduces the trained model (docs/design.md §3).

The trained model is `W_now + s·B·A` with `W_now = W_original − Σ_j s_j·B_j·A_j` (the recorded
offsets), so the adapter to ship is `Δ = s·B·A − Σ_j s_j·B_j·A_j`: the stacked factors
`[s·B | −s_1·B_1 | …]`, `[A; A_1; …]`, compressed to their exact numerical rank (rank 2r after one
`preserve` init, like PEFT's PiSSA conversion). Exported layers carry scale 1 (`lora_alpha = r` per
layer, no rsLoRA) so any layer's rank can differ. The write goes to a temporary directory that is
renamed into place; an existing adapter is never overwritten unless `overwrite=True`, and other files in the
directory (a README.md, a report) are never replaced: PEFT's model card is added only where there is none.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from fisher_core.layers import base_layer, canonical_name, layer_kind
from fisher_core.sharded import sharding
from fisher_core.write.peft import check_peft_model, lora_layers, resize_adapter
from fisher_core.write.record import (
    RECORD_FILE,
    InitRecord,
    Offset,
    get_record,
    save_record,
    set_record,
    stacked,
    total_delta,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
logger = logging.getLogger("fisher_core")


def export_adapter(
    peft_model: nn.Module, path: str | Path, adapter_name: str = "default", *, overwrite: bool = False
) -> Path:
    """Save `adapter_name` so that it applies to the original (unmodified) base model."""
    check_peft_model(peft_model, adapter_name)
    path = Path(path)
    if not overwrite and any((path / f).exists() for f in ADAPTER_FILES):
        raise FileExistsError(f"{path} already holds an adapter; pass overwrite=True or choose another directory")
    record = get_record(peft_model, adapter_name)
    kind = sharding(peft_model)
    if kind is not None:
        raise ValueError(
            f"exporting needs whole weights, and this model is sharded ({kind}): save the adapter as trained "
            "(trainer.save_model) and its record (fisher_core.write.save_record), then on one process load the "
            "original base with that adapter, call restore_offsets(model, load_record(dir)) and export_adapter"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        if record is None or not record.changes_base:
            peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
            if adapter_name != "default":  # save_pretrained nests non-default adapters in a subfolder
                for f in (tmp / adapter_name).iterdir():
                    f.rename(tmp / f.name)
                (tmp / adapter_name).rmdir()
        else:
            _save_converted(peft_model, tmp, adapter_name, record)
        if path.exists():  # the adapter files are ours to replace; anything else there (a README) is the user's
            for f in ADAPTER_FILES:
                (path / f).unlink(missing_ok=True)
            for f in tmp.iterdir():
                if f.name in ADAPTER_FILES or not (path / f.name).exists():
                    os.replace(f, path / f.name)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def record_for_offline_export(peft_model: nn.Module, output_dir: str | Path, adapter_name: str = "default") -> None:
    """A sharded model whose base the init changed cannot be exported in place (that needs whole weights on one
    process): save its record to `output_dir`, beside the adapter the trainer saves there, and log the command
    that exports the pair afterwards (`fisher-lora export`). Call it on the process that saves."""
    record = get_record(peft_model, adapter_name)
    if record is None or not record.changes_base:
        return
    save_record(record, output_dir)
    logger.warning(
        "fisher-lora: the model is sharded (%s), so the adapter saved to %s is the one for the residual base as "
        "trained, with its base offsets (%s). For an adapter that loads on the original base run: "
        "fisher-lora export --model ORIGINAL_BASE --adapter %s --out DIR",
        sharding(peft_model), output_dir, RECORD_FILE, output_dir,
    )  # fmt: skip


def to_original_base(peft_model: nn.Module, adapter_name: str = "default") -> int:
    """Make the live model the ORIGINAL base plus an adapter for it, in place, with the same outputs: per layer
    `W ← W + Σ_j s_j·B_j·A_j` (the recorded offsets go back in), `(B, A) ← exported_factors` at scale 1, the
    PEFT config says the new ranks, and the record is emptied. Whatever saves the model next
    (`save_pretrained`, `trainer.save_model`, `merge_and_unload`) then needs nothing of fisher-lora's. The base
    is rounded twice in its own dtype (`W − Δ`, then `+ Δ`): exact in fp32 to a few ulps, ~one ulp in bf16.
    Returns how many layers were converted (0: the base never changed). A sharded model cannot be reshaped."""
    record = get_record(peft_model, adapter_name)
    if record is None or not record.changes_base:
        return 0
    if (kind := sharding(peft_model)) is not None:
        raise ValueError(f"the model is sharded ({kind}): its LoRA layers cannot be reshaped; use export_adapter")
    rank_pattern: dict[str, int] = {}
    for name, module in lora_layers(peft_model, adapter_name).items():
        b_out, a_out = exported_factors(module, record.offsets.get(name, []), adapter_name)
        if record.offsets.get(name):
            layer_kind(module).subtract(base_layer(module), total_delta(record.offsets[name]).neg_())
        resize_adapter(module, adapter_name, a_out.shape[0], alpha=float(a_out.shape[0]))
        module.scaling[adapter_name] = 1.0
        with torch.no_grad():
            module.lora_A[adapter_name].weight.copy_(a_out)
            module.lora_B[adapter_name].weight.copy_(b_out)
        rank_pattern[name] = a_out.shape[0]
    _rank_one_scale(peft_model.peft_config[adapter_name], rank_pattern)
    set_record(peft_model, adapter_name, InitRecord())
    return len(rank_pattern)


def exported_factors(module: nn.Module, offsets: list[Offset], adapter_name: str) -> tuple[Tensor, Tensor]:
    """`(B', A')` at scale 1 with `B'·A' = s·B·A − Σ_j s_j·B_j·A_j` at its exact numerical rank (`compress`)."""
    a = module.lora_A[adapter_name].weight.detach().float()
    b = module.lora_B[adapter_name].weight.detach().float() * module.scaling[adapter_name]
    parts = [(b, a)]
    if (offset := stacked(offsets)) is not None:
        parts.append((-offset[0].to(b.device), offset[1].to(a.device)))
    return compress(torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=0))


def _rank_one_scale(config, rank_pattern: dict[str, int]) -> None:
    """Point a `LoraConfig` at per-layer ranks `rank_pattern`, every layer at scale 1 (`lora_alpha = r`)."""
    config.r = max(rank_pattern.values())
    config.lora_alpha = config.r
    config.use_rslora = False
    config.rank_pattern = rank_pattern
    config.alpha_pattern = {n: float(r) for n, r in rank_pattern.items()}
    config.init_lora_weights = True


def _save_converted(peft_model: nn.Module, directory: Path, adapter_name: str, record) -> None:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    rank_pattern: dict[str, int] = {}
    for name, module in lora_layers(peft_model, adapter_name).items():
        b_out, a_out = exported_factors(module, record.offsets.get(name, []), adapter_name)
        dtype = module.lora_A[adapter_name].weight.dtype
        prefix = _state_prefix(state, name)
        state[f"{prefix}.lora_A.weight"] = a_out.to(dtype).contiguous().cpu()
        state[f"{prefix}.lora_B.weight"] = b_out.to(dtype).contiguous().cpu()
        rank_pattern[name] = a_out.shape[0]
    _rank_one_scale(config, rank_pattern)
    config.save_pretrained(directory)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        directory / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )


def _state_prefix(state: dict[str, Tensor], name: str) -> str:
    """The state-dict prefix of layer `name` (canonical): the key whose module name is exactly `name` once PEFT's
    and FSDP's wrapper segments are dropped (a name that is a suffix of another's, `model.layers.0.q_proj` beside
    `vision.model.layers.0.q_proj`, must not take the other's key)."""
    for key in state:
        if key.endswith(".lora_A.weight") and canonical_name(key.removesuffix(".lora_A.weight")) == name:
            return key.removesuffix(".lora_A.weight")
    raise KeyError(f"PEFT's state dict has no lora_A for layer {name!r}")


def compress(b: Tensor, a: Tensor, rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Exact minimal-rank factors of `b @ a` (m×k, k×n): QR both sides, SVD the k×k core.

    Components with singular value below `rtol·σ_max` are dropped (at least one is kept).
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, sigma, vh = torch.linalg.svd(rb @ ra.T)
    keep = max(1, int((sigma > rtol * sigma.max()).sum())) if sigma.numel() and sigma.max() > 0 else 1
    root = sigma[:keep].sqrt()
    return (qb @ (u[:, :keep] * root)).to(b.dtype), ((root[:, None] * vh[:keep]) @ qa.T).to(a.dtype)
