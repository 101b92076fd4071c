"""`FisherConfig`: every knob of the Fisher initializer, validated at construction.

The same model backs the Python API, the Axolotl keys (`fisher_<field>`), the TRL callback's keyword
arguments and the CLI flags, so a bad value fails in one place with a message that names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Selector = Literal["select", "fwsvd", "natural", "subspace"]
FisherType = Literal["empirical", "true"]
Policy = Literal["preserve", "zero"]
ZeroScale = Literal["row", "activation"]
Positions = Literal["attention", "supervised"]


def default_sketch_rank(lora_rank: int) -> int:
    """k of every low-rank object when `sketch_rank` is None (sketched statistics, top spectra): 128, or 4·r if
    that is more (a sketched Ḡ then holds 2·r directions, enough for `rank_budget`'s default cap of 2·r)."""
    return max(128, 4 * lora_rank)


def fisher_type_from_yaml(value: Any) -> Any:
    """YAML reads an unquoted `fisher_type: true` as the boolean: it means the `true` Fisher; else `value`."""
    return "true" if value is True else value


class FisherConfig(BaseModel):
    """How statistics are collected and turned into LoRA directions (docs/design.md §1–§3)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    selector: Selector = Field(
        "natural",
        description="How directions are chosen: `select` (Fisher-scored singular triplets of W), "
        "`fwsvd` (Fisher-weighted SVD of W), `natural` (whitened mean gradient), `subspace` "
        "(top eigenvectors of S_G and S_A).",
    )
    fisher_type: FisherType = Field(
        "empirical",
        description="`empirical`: gradients of the training objective with the data's labels; "
        "`true`: labels sampled from the model's own predictive distribution.",
    )
    mc_samples: int = Field(1, ge=1, description="Sampled labels per position for `true` Fisher.")
    policy: Policy = Field(
        "zero",
        description="Step-0 policy. `zero`: A gets the Fisher directions at PEFT's default row norm and B = 0, "
        "the base is untouched, so the LoRA learning rate a recipe already has stays right (BENCHMARKS.md: "
        "within seed noise of default LoRA at 0.5×–2× its best lr on four held-out encoder tasks, and on three "
        "SmolLM2 tasks with the default keep mode). `preserve`: B and A both nonzero and W_base ← W − s·B·A so "
        "outputs are unchanged; its best lr ranged from 0.5× to 2× LoRA's by task (tune it), and it needs an "
        "export.",
    )
    zero_scale: ZeroScale = Field(
        "row",
        description="Under policy `zero`, the scale of A's Fisher directions. `row`: every row at PEFT's default "
        "row norm 1/√3. `activation`: A's rows scaled together so that E‖A x‖² over the calibration inputs (the "
        "task's, also with `keep_knowledge`) equals "
        "its expectation under PEFT's default (Kaiming-uniform) A, r·tr(S_A)/(3n): the same output scale a LoRA "
        "learning rate was tuned for.",
    )
    num_batches: int = Field(
        32,
        ge=1,
        description="Most calibration batches read from the data; `stop_tol` usually stops well before "
        "(8 on the quality benchmark's encoder task, BENCHMARKS.md).",
    )
    stop_tol: float | None = Field(
        0.2,
        allow_inf_nan=False,
        ge=0.0,
        description="Stop reading batches early once the statistics have converged: after 4, 8, 16, … batches "
        "every factor is probed with fixed random vectors, and the pass stops when the median factor's probe "
        "changed by less than this relative amount since the previous check (the data doubled since). "
        "0 or None reads all `num_batches` (0 where None cannot be written: a CLI flag, Axolotl's YAML).",
    )
    positions: Positions = Field(
        "attention",
        description="Which positions count as samples: every non-padding position and any whose output carries a "
        "label, e.g. the last left pad (`attention`), or only those that carry a label (`supervised`).",
    )
    position_fraction: float = Field(
        1.0,
        allow_inf_nan=False,
        gt=0.0,
        le=1.0,
        description="Fraction of the sample positions (drawn at random per batch) whose x_t, g_t enter the "
        "statistics. The forward/backward still runs on every position; below 1 the outer products cost less.",
    )
    damping: float = Field(
        1e-3,
        allow_inf_nan=False,
        ge=0.0,
        description="λ: factors become S + λ·mean(diag S)·I before any inverse or root.",
    )
    stable_gamma: float = Field(
        16.0,
        allow_inf_nan=False,
        gt=0.0,
        description="Scale of data-only directions (`natural`, `subspace`): each column of B and "
        "row of A gets norm d_out^{1/4}/√γ, as in LoRA-GA.",
    )
    rank_budget: int | None = Field(
        None,
        ge=1,
        description="Total LoRA rank shared by all adapted layers; ranks go where the Fisher "
        "scores are largest. None keeps the configured rank everywhere.",
    )
    rank_cap: float = Field(
        2.0, allow_inf_nan=False, ge=1.0, description="ρ: no layer gets more than ρ·r under `rank_budget`."
    )
    solver: Literal["auto", "exact", "lowrank"] = Field(
        "auto",
        description="`exact`: dense statistics and full eigen/singular decompositions; `lowrank`: statistics "
        "kept as rank-`sketch_rank` sketches (O(d·k) per token) and only top spectra computed (randomized, "
        "O(d²k) instead of O(d³)); `auto`: exact up to `exact_max_dim`, low-rank above.",
    )
    sketch_rank: int | None = Field(
        None,
        ge=1,
        description="k of the sketched statistics and of the low-rank solver's top spectra (None: max(128, 4·r); "
        "the statistics' k halved while a `memory_budget` cannot hold the sketches, down to 2·r).",
    )
    exact_max_dim: int = Field(1024, ge=1, description="Largest layer dimension `auto` solves exactly.")
    memory_budget: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        None,
        description="Bytes the statistics, plus the layer inputs the pass holds for Ḡ, may take. Above it the "
        "largest factors are kept as rank-`sketch_rank` sketches (O(d·k) memory), if need be from mid-pass on; "
        "'auto' = half the free accelerator memory; None = no limit. Under a budget the pass checkpoints every "
        "transformers block (it then holds one block's inputs for Ḡ).",
    )
    cache_path: Path | None = Field(
        None, description="safetensors file for the statistics: reused when it matches, written otherwise."
    )
    keep_knowledge: bool | Literal["auto"] = Field(
        "auto",
        description="Choose directions that learn the task at the least cost to what the model knew: the task's "
        "mean gradient whitened by the K-FAC factors of `keep_data` instead of the task's (the EWC-optimal rank-r "
        "step, docs/design.md §7). Needs selector `natural`. `auto`: on where it was measured and can run, a chat "
        "model (its tokenizer has a chat template, the model generates, its parameters are not quantized; whole or "
        "sharded by FSDP/ZeRO-3) "
        "or whenever `keep_data` is given; else the task's own factors (on SmolLM2 the task's factors fell behind "
        "LoRA at half its lr, keep mode held every copied-lr cell: BENCHMARKS.md).",
    )
    keep_data: Path | list[dict[str, Any]] | None = Field(
        None,
        description="What to keep with `keep_knowledge`: a JSONL file (text, prompt/completion or chat rows) or a "
        "list of batches for model(**batch) with `labels`. None: the model's own greedy answers to the shipped "
        "generic instructions (needs the tokenizer).",
    )
    seed: int = Field(0, description="Seeds label sampling and every random choice.")
    force: bool = Field(False, description="Re-initialize adapters that are no longer at their initial values.")
    progress: bool = Field(True, description="Show a progress bar while collecting statistics.")

    @field_validator("fisher_type", mode="before")
    @classmethod
    def _yaml_true(cls, value: Any) -> Any:
        return fisher_type_from_yaml(value)

    @field_validator("stop_tol")
    @classmethod
    def _no_stop_at_zero(cls, value: float | None) -> float | None:
        """0 is None: no change is below it, so the pass reads every batch (one spelling of "off")."""
        return None if value == 0 else value

    @field_validator("keep_knowledge")
    @classmethod
    def _check_keep_knowledge(cls, value: bool | str, info: ValidationInfo) -> bool | str:
        selector = info.data.get("selector", "natural")
        if value is True and selector != "natural":
            raise ValueError(
                f"keep_knowledge whitens the task's mean gradient, which selector {selector!r} does not read; "
                "use selector='natural' (the default) or keep_knowledge=False"
            )
        return value

    @field_validator("keep_data")
    @classmethod
    def _check_keep_data(cls, value: Path | list | None, info: ValidationInfo) -> Path | list | None:
        if value is not None and info.data.get("keep_knowledge") is False:
            raise ValueError("keep_data is only read with keep_knowledge=True; set it, or drop keep_data")
        selector = info.data.get("selector", "natural")  # a bad selector is reported by its own check
        if value is not None and info.data.get("keep_knowledge") == "auto" and selector != "natural":
            raise ValueError(
                f"keep_data is read by keep_knowledge, which needs selector 'natural', not {selector!r}; "
                "use the default selector, or drop keep_data"
            )
        if isinstance(value, Path) and not value.is_file():
            raise ValueError(f"{value}: no such file; pass a JSONL file of text, prompt/completion or chat rows")
        if isinstance(value, list):
            _check_keep_batches(value)
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> FisherConfig:
        if self.mc_samples > 1 and self.fisher_type != "true":
            raise ValueError(
                "mc_samples > 1 only applies to fisher_type='true'; set fisher_type='true' or mc_samples=1"
            )
        return self

    @property
    def needs_mean_grad(self) -> bool:
        """Whether the selector needs Ḡ = (1/N) Σ_t g_t x_tᵀ besides the two factors."""
        return self.selector == "natural"


def _check_keep_batches(batches: list[dict[str, Any]]) -> None:
    """Keep batches are scored by the cross-entropy of their `labels`: every batch has them, some token is not -100."""
    import torch

    if not batches:
        raise ValueError("an empty list of batches; pass batches, a JSONL file, or None (the model's own answers)")
    if missing := [i for i, b in enumerate(batches) if "labels" not in b]:
        raise ValueError(
            f"keep batch {missing[0]} has no 'labels' (the keep pass scores the cross-entropy of its labels); "
            "add labels (-100 where nothing is kept) or pass a JSONL file"
        )
    if not any(bool((torch.as_tensor(b["labels"]) != -100).any()) for b in batches):
        raise ValueError("every keep batch's labels are -100: label the tokens whose behaviour is kept")
