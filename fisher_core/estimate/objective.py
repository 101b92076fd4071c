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
INPUT, DECODER = "input", "decoder"  # the sequences whose positions are counted (DECODER: encoder–decoder models)


@functools.cache
def _causal_lm_classes() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or `model` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def can_generate(model: nn.Module) -> bool:
    """Whether the transformers model inside `model` has a `generate` (transformers gives one to generative heads)."""
    return callable(getattr(unwrapped(model), "generate", None))


def is_causal_lm(model: nn.Module) -> bool:
    """True for transformers causal-LM heads (labels are shifted by one position)."""
    return type(unwrapped(model)).__name__ in _causal_lm_classes()


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for transformers encoder–decoder models (T5, BART): labels are the decoder's targets."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def model_inputs(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """The batch as the model reads it: an encoder–decoder model keeps `labels` (it shifts them into its
    decoder inputs, as in training); other models get no labels (the loss is ours)."""
    if is_encoder_decoder(model):
        return dict(batch)
    return {k: v for k, v in batch.items() if k != "labels"}


def supervised_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Default `LogitsFn` for HF batches: token-level (shifted for causal LMs) or sequence-level."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(
            "the batch has no 'labels'; add labels (-100 for ignored positions) or pass loss_fn=... "
            "that returns the summed loss of the batch"
        )
    out = model(**model_inputs(model, batch))
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


def batch_seed(seed: int, index: int) -> int:
    """The seed of global batch `index`'s draws (sampled labels, position subsets): each batch's draws depend on
    `seed` and its index only, so process `r` of `w` reading its `k`-th batch (global batch `k·w + r`) draws what
    one process reading the processes' batches round-robin draws there, and no two processes share a stream."""
    return (seed * 2**32 + index) % 2**63


def position_masks(model: nn.Module, batch: Batch, positions: str) -> dict[str, Tensor | None]:
    """Per sequence, the [B, T] bool mask of the positions that count as samples (None: every position).

    `INPUT` is the model's input sequence (`position_mask`); an encoder–decoder model's encoder positions are
    its non-padding ones and its `DECODER` positions those of `decoder_mask`.
    """
    if not is_encoder_decoder(model):
        return {INPUT: position_mask(model, batch, positions)}
    encoder = batch.get("attention_mask")
    return {INPUT: None if encoder is None else encoder.bool(), DECODER: decoder_mask(batch, positions)}


def decoder_mask(batch: Batch, positions: str) -> Tensor | None:
    """An encoder–decoder model's decoder positions (decoder position t predicts label t). `supervised`: those
    with a label; `attention`: `decoder_attention_mask` or, without one, every position up to the row's last
    label (a later one reaches no label); those with a label in either case."""
    labels, given = batch.get("labels"), batch.get("decoder_attention_mask")
    if labels is None or labels.dim() != 2:
        return None if given is None else given.bool()
    supervised = labels != IGNORE_INDEX
    if positions == "supervised":
        return supervised
    if given is not None and given.shape == supervised.shape:
        return given.bool() | supervised
    return supervised.flip(-1).int().cummax(-1).values.flip(-1).bool()


def position_mask(model: nn.Module, batch: Batch, positions: str) -> Tensor | None:
    """[B, T] bool mask of the positions that count as samples, or None (count every row).

    A position is supervised when its output carries a label (for causal LMs, position t predicts label
    t+1). `attention`: every non-padding position (`attention_mask == 1`) and every supervised one — with left
    padding the last pad predicts the first real token, a term of the loss, so N·Ḡ stays ∂L/∂W on either side.
    `supervised`: the supervised positions only.
    """
    mask = batch.get("attention_mask")
    mask = mask.bool() if mask is not None else None
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or (mask is not None and mask.shape != labels.shape):
        return mask
    supervised = labels != IGNORE_INDEX
    if is_causal_lm(model):
        supervised = torch.cat([supervised[:, 1:], torch.zeros_like(supervised[:, :1])], dim=1)
    if positions == "attention":
        return None if mask is None else mask | supervised
    return supervised


def subsample(mask: Tensor | None, shape: torch.Size, fraction: float, generator: torch.Generator) -> Tensor:
    """Keep each counted position of a `shape` grid (`mask`; None: every one) with probability `fraction`."""
    keep = torch.rand(shape, generator=generator, device=generator.device) < fraction
    return keep if mask is None else mask & keep.to(mask.device)
