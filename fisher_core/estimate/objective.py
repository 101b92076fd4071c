"""The training objective whose curvature is estimated.

Contracts (what integrations and users may pass):

- `LossFn(model, batch) -> Tensor`: a scalar, the *sum* of the supervised losses in the batch (not
  the mean), so statistics do not depend on batch size or accumulation.
- `LogitsFn(model, batch) -> (logits [K, C], labels [K])`: the logits and data labels of the K
  supervised units (tokens or sequences). Needed for `true` Fisher, which samples labels from
  `softmax(logits)`; the default reads HF-style batches (`labels`, -100 = ignored).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], Tensor]
LogitsFn = Callable[[nn.Module, Batch], tuple[Tensor, Tensor]]
IGNORE_INDEX = -100


@functools.cache
def _causal_lm_classes() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_causal_lm(model: nn.Module) -> bool:
    """True for transformers causal-LM heads (labels are shifted by one position)."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    return type(inner).__name__ in _causal_lm_classes()


def supervised_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Default `LogitsFn` for HF batches: token-level (shifted for causal LMs) or sequence-level."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "the batch has no 'labels'; add labels (-100 for ignored positions) or pass loss_fn=... "
            "that returns the summed loss of the batch"
        )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    logits = out if isinstance(out, Tensor) else out.logits if hasattr(out, "logits") else out[0]
    if logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape:
        if labels.dim() == 2 and is_causal_lm(model):
            logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != IGNORE_INDEX
        return logits[keep], labels[keep]
    raise ValueError(
        f"cannot pair logits of shape {tuple(logits.shape)} with labels of shape {tuple(labels.shape)}; "
        "pass loss_fn=... (and logits_fn=... for fisher_type='true')"
    )


def summed_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Σ_k −log softmax(logits_k)[labels_k], computed in fp32; labels of any integer dtype (int32 too)."""
    return F.cross_entropy(logits.float(), labels.long(), reduction="sum")


def sample_labels(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One label per row drawn from the model's predictive distribution softmax(logits)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def position_mask(model: nn.Module, batch: Batch, positions: str) -> Tensor | None:
    """[B, T] bool mask of the positions that count as samples, or None (count every row).

    `attention`: every non-padding position (`attention_mask == 1`). `supervised`: positions whose
    output carries a label (for causal LMs, position t predicts label t+1).
    """
    mask = batch.get("attention_mask")
    mask = mask.bool() if mask is not None else None
    if positions == "attention":
        return mask
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2:
        return mask
    supervised = labels != IGNORE_INDEX
    if is_causal_lm(model):
        supervised = torch.cat([supervised[:, 1:], torch.zeros_like(supervised[:, :1])], dim=1)
    return supervised if mask is None else supervised & mask


def subsample(mask: Tensor | None, batch: Batch, fraction: float, generator: torch.Generator) -> Tensor:
    """Keep each counted position with probability `fraction` (the same draw for x_t and g_t)."""
    if mask is None:
        ids = next(v for v in batch.values() if isinstance(v, Tensor) and v.dim() >= 2)
        mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
    keep = torch.rand(mask.shape, generator=generator, device=generator.device) < fraction
    return mask & keep.to(mask.device)
