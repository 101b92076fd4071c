"""What `apply` took out of the base weights, so the original base can always be recovered.

After `apply`, every adapted layer's base weight is `W_original − Σ_j s·B_j·A_j` over the offsets
recorded here (one per `preserve` write; a re-initialization that folds a previous adapter back adds
an offset with the opposite sign). `export_adapter` turns these into extra LoRA components, and
`save_record`/`restore_offsets` let a resumed run rebuild the same base from the original one.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fisher_core.io import atomic_path

RECORD_FILE = "fisher_init.safetensors"


@dataclass
class Offset:
    """`s·B·A` was subtracted from the base weight (m×n)."""

    B: Tensor
    A: Tensor
    scaling: float

    def delta(self) -> Tensor:
        """`s·B·A` (m×n, fp32)."""
        return torch.mm(self.B.float(), self.A.float()).mul_(self.scaling)


def total_delta(offsets: list[Offset]) -> Tensor:
    """`Σ s·B·A` over `offsets` (at least one), summed in place."""
    out = offsets[0].delta()
    for o in offsets[1:]:
        out.add_(o.delta())
    return out


@dataclass
class InitRecord:
    """Per layer, the offsets subtracted from its base; plus the factors written at init."""

    offsets: dict[str, list[Offset]] = field(default_factory=dict)
    initial: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def changes_base(self) -> bool:
        return any(self.offsets.values())


# Each model's records, beside the model rather than on it (no attribute written on the user's module): weak keys,
# so a record goes when its model does.
_RECORDS: weakref.WeakKeyDictionary[nn.Module, dict[str, InitRecord]] = weakref.WeakKeyDictionary()


def get_record(model: nn.Module, adapter_name: str) -> InitRecord | None:
    """The record `set_record` kept for `model` (or for the model it wraps: a trainer's DDP or FSDP wrapper)."""
    for module in model.modules():
        if module in _RECORDS:
            return _RECORDS[module].get(adapter_name)
    return None


def set_record(model: nn.Module, adapter_name: str, record: InitRecord) -> None:
    _RECORDS.setdefault(model, {})[adapter_name] = record


def save_record(record: InitRecord, directory: str | Path) -> Path:
    """Write the record next to a checkpoint (atomically), for `restore_offsets` on resume."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, list[float]] = {}
    for name, offsets in record.offsets.items():
        meta[name] = [o.scaling for o in offsets]
        for j, o in enumerate(offsets):
            tensors[f"{name}/{j}/B"] = o.B.detach().cpu().contiguous()
            tensors[f"{name}/{j}/A"] = o.A.detach().cpu().contiguous()
    path = Path(directory) / RECORD_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"offsets": json.dumps(meta)})
    return path


def load_record(directory: str | Path) -> InitRecord | None:
    """The record saved in `directory`, or None if there is none."""
    path = Path(directory) / RECORD_FILE
    if not path.exists():
        return None
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {})["offsets"])
        record = InitRecord()
        for name, scalings in meta.items():
            record.offsets[name] = [
                Offset(f.get_tensor(f"{name}/{j}/B"), f.get_tensor(f"{name}/{j}/A"), s) for j, s in enumerate(scalings)
            ]
    return record


def stacked(offsets: list[Offset]) -> tuple[Tensor, Tensor] | None:
    """The offsets as one pair (B, A) with scale 1: B = [s_1·B_1 | s_2·B_2 | …], A = [A_1; A_2; …]."""
    if not offsets:
        return None
    return (
        torch.cat([o.scaling * o.B.float() for o in offsets], dim=1),
        torch.cat([o.A.float() for o in offsets], dim=0),
    )
