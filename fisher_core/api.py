"""`initialize`: estimate → select → apply on a PEFT model in one call (what integrations use)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fisher_core.config import FisherConfig
from fisher_core.estimate import FisherStats, estimate
from fisher_core.estimate.objective import Batch, LogitsFn, LossFn
from fisher_core.keep import KeepMode, keep_data, keep_mode, keep_relative, keep_statistics
from fisher_core.layers import supported
from fisher_core.select import Directions, select
from fisher_core.sharded import whole_parameters
from fisher_core.write.peft import apply, lora_layers
from fisher_core.write.plan import check_policy, check_ranks, refuse_trained, trained_layers

logger = logging.getLogger("fisher_core")


@dataclass
class LayerReport:
    rank: int
    captured: float  # fraction of the layer's scored Fisher mass in the chosen components
    top_scores: list[float]
    num_tokens: int


@dataclass
class InitReport:
    """What one initialization did: per-layer ranks and scores, totals and timings."""

    selector: str
    fisher_type: str
    policy: str
    num_batches: int
    num_tokens: int
    layers: dict[str, LayerReport]
    seconds: dict[str, float]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    keep_knowledge: bool = False
    keep_why: str = ""  # why `keep_knowledge="auto"` resolved as it did ("" when it was set)
    stats: FisherStats | None = field(default=None, repr=False)
    directions: Directions | None = field(default=None, repr=False)

    def summary(self) -> str:
        """The one log line of a run."""
        ranks = [layer.rank for layer in self.layers.values()]
        captured = sum(layer.captured for layer in self.layers.values()) / max(1, len(self.layers))
        keep = " relative to the keep data's Fisher" if self.keep_knowledge else ""
        return (
            f"fisher-lora: {self.selector} directions from {self.fisher_type} Fisher ({self.policy}){keep} on "
            f"{len(self.layers)} layers, rank {min(ranks)}-{max(ranks)}, {self.num_tokens} tokens in "
            f"{self.num_batches} batches, mean captured Fisher mass {captured:.1%}, "
            f"{sum(self.seconds.values()):.1f}s ({', '.join(f'{k} {v:.1f}s' for k, v in self.seconds.items())})"
            f"{self._auto()}"
        )

    def _auto(self) -> str:
        """What `keep_knowledge="auto"` chose and why, for the summary ("" when it was set)."""
        state = "on" if self.keep_knowledge else "off"
        return f"; keep_knowledge 'auto' is {state}: {self.keep_why}" if self.keep_why else ""

    def to_json(self) -> dict:
        return {
            "selector": self.selector,
            "fisher_type": self.fisher_type,
            "policy": self.policy,
            "num_batches": self.num_batches,
            "num_tokens": self.num_tokens,
            "seconds": self.seconds,
            "rank_pattern": self.rank_pattern,
            "keep_knowledge": self.keep_knowledge,
            "keep_why": self.keep_why,
            "layers": {n: vars(layer) for n, layer in self.layers.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically."""
        from fisher_core.io import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2))


def initialize(
    peft_model: nn.Module,
    batches: Iterable[Batch],
    *,
    loss_fn: LossFn | None = None,
    logits_fn: LogitsFn | None = None,
    config: FisherConfig | None = None,
    adapter_name: str = "default",
    tokenizer: Any | None = None,
) -> InitReport:
    """Initialize the LoRA adapter `adapter_name` of `peft_model` from Fisher statistics of `batches`.

    Statistics are estimated on the model the adapter starts from: the base with the adapters disabled
    (a fresh adapter adds nothing), or, re-initializing a trained adapter with `force=True`, the model as it
    sits (trained adapter on, unmerged first). Directions are selected with each layer's own rank and scale
    and written in place. Refusals that need no statistics (`write.plan`) come before the pass.

    In keep mode (`keep_knowledge`, by default `auto`: on for a chat model given its `tokenizer`, `keep.mode`)
    the keep data's factors are estimated in a second pass on the same model and the task's `Ḡ` is whitened by
    them (docs/design.md §7); `tokenizer` is needed to read a `keep_data` file or to generate the model's own
    answers when there is none.
    """
    config = config or FisherConfig()
    layers = supported(lora_layers(peft_model, adapter_name))
    trained = _check_before_pass(peft_model, layers, adapter_name, config)
    keeping = keep_mode(config, tokenizer, peft_model, layers)
    keep = keep_data(config, tokenizer, peft_model) if keeping.on else None
    if trained and any(getattr(m, "merged", False) for m in layers.values()):
        peft_model.unmerge_adapter()  # the same function, with the trained adapter as factors to fold
    times: dict[str, float] = {}
    t = time.perf_counter()
    with contextlib.nullcontext() if trained else peft_model.disable_adapter():
        stats = estimate(
            peft_model, batches, target_modules=layers, loss_fn=loss_fn, logits_fn=logits_fn, config=config
        )
        times["estimate"], t = time.perf_counter() - t, time.perf_counter()
        whitened = stats  # what `select` whitens: the task's own factors, or the keep data's (§7)
        if keep is not None:
            whitened = keep_relative(stats, keep_statistics(peft_model, layers, config, keep))
            times["keep"] = time.perf_counter() - t
    with whole_parameters(peft_model) as gathering:  # FSDP1: one region for both (one unit whole at a time)
        t = time.perf_counter()
        directions = select(whitened, peft_model, config=config, adapter_name=adapter_name, gathering=gathering,
                            scale_stats=stats)  # fmt: skip
        times["select"] = time.perf_counter() - t
        t = time.perf_counter()
        apply(peft_model, directions, adapter_name, force=config.force, gathering=gathering)
        times["write"] = time.perf_counter() - t
    report = _report(config, stats, directions, times, keeping)
    logger.info(report.summary())
    return report


def _check_before_pass(
    peft_model: nn.Module, layers: dict[str, nn.Module], adapter_name: str, config: FisherConfig
) -> list[str]:
    """The refusals that need no statistics (`write.plan`); returns the layers whose adapter is already trained."""
    with whole_parameters(peft_model) as gathering:
        trained = trained_layers(peft_model, layers, adapter_name, gathering)
        if not config.force:
            refuse_trained(trained, adapter_name)
        check_ranks(layers, adapter_name, config)
        check_policy(peft_model, layers, adapter_name, config)
    return trained


def _report(
    config: FisherConfig, stats: FisherStats, directions: Directions, times: dict[str, float], keeping: KeepMode
) -> InitReport:
    """The run's `InitReport`: per layer the rank, captured Fisher mass, top scores and tokens read, and whether
    keep mode ran (`keep_knowledge` resolved) and why."""
    return InitReport(
        selector=config.selector,
        fisher_type=config.fisher_type,
        policy=config.policy,
        num_batches=stats.num_batches,
        num_tokens=stats.num_tokens,
        layers={
            n: LayerReport(d.rank, d.captured, d.scores[:8].tolist(), stats[n].num_tokens)
            for n, d in directions.items()
        },
        seconds=times,
        rank_pattern=dict(directions.rank_pattern),
        keep_knowledge=keeping.on,
        keep_why=keeping.why,
        stats=stats,
        directions=directions,
    )


def initialize_lora_fisher_weights(
    model: nn.Module,
    dataloader: Iterable[Batch],
    *,
    fisher_config: FisherConfig | None = None,
    adapter_name: str = "default",
    forward_fn: LossFn | None = None,
    logits_fn: LogitsFn | None = None,
    show_progress_bar: bool | None = None,
    tokenizer=None,
) -> InitReport:
    """`initialize` in PEFT's calling convention (that of `peft.initialize_lora_eva_weights`): the PEFT model, a
    dataloader of dicts, the config, the adapter's name and an optional forward function.

    `forward_fn(model, batch) -> Tensor` returns the scalar SUM of the batch's supervised losses (where EVA's
    returns the model's outputs: EVA reads activations only, the Fisher needs the objective's gradient); None
    is the summed cross-entropy of the batch's `labels` (-100 ignored; shifted for causal LMs). It is
    `initialize`'s `loss_fn`, and `logits_fn` is `initialize`'s. `show_progress_bar` overrides
    `fisher_config.progress` when given; `tokenizer` is `initialize`'s (a chat model's turns on the default keep
    mode; a `keep_data` file needs it). The adapter is written in place; the `InitReport` is returned.
    """
    config = fisher_config or FisherConfig()
    if show_progress_bar is not None:
        config = config.model_copy(update={"progress": show_progress_bar})
    return initialize(
        model,
        dataloader,
        loss_fn=forward_fn,
        logits_fn=logits_fn,
        config=config,
        adapter_name=adapter_name,
        tokenizer=tokenizer,
    )
