"""LoRA initializers by name, all behind one call: `build_adapter(method, model, calibration, ...)`.

`lora` is PEFT's default (`init_lora_weights=True`: Kaiming A, zero B); `gaussian`, `pissa`, `olora`,
`orthogonal` and `mica` are PEFT's weight-only inits; `eva`, `corda` (IPM) and `lora_ga` are PEFT's
data-driven inits and read the calibration batches; `corda-kpm` is CorDA's knowledge-preserved mode and
`lora-null` LoRA-Null's rule (Tang et al., 2025), whose calibration batches are the data whose knowledge is kept
(the caller passes those); `fisher` is
`fisher_core.initialize` with the given `FisherConfig`; `fisher-random` is its ablation with the data's
directions replaced by random ones of the same norms. Every method gets the same rank, alpha, target modules
and trainable head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from benchmarks.quality.encoder import Batch
from fisher_core import FisherConfig, initialize

WEIGHT_ONLY = ("gaussian", "pissa", "olora", "orthogonal", "mica")
DATA_DRIVEN = ("eva", "corda", "corda-kpm", "lora-null", "lora_ga", "fisher")
ABLATIONS = ("fisher-random",)
METHODS = ("lora", *WEIGHT_ONLY, *DATA_DRIVEN, *ABLATIONS)
# BERT's linear layers: attention q/k/v, attention output, MLP in/out and the pooler (all `dense`).
BERT_TARGETS = ("query", "key", "value", "dense")

Builder = Callable[[nn.Module, dict, Sequence[Batch], FisherConfig | None], "Adapter"]


@dataclass
class Adapter:
    """The initialized `PeftModel`, the init's own timings by phase (seconds; empty if it has none) and
    the calibration batches it read (None: it reads none, or does not say)."""

    model: nn.Module
    phases: dict[str, float] = field(default_factory=dict)
    batches: int | None = None


def lora_kwargs(rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = BERT_TARGETS) -> dict:
    """The `LoraConfig` arguments every method shares (the classifier head is trained and saved)."""
    return {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "modules_to_save": ["classifier"],
    }


def build_adapter(
    method: str,
    model: nn.Module,
    calibration: Sequence[Batch],
    *,
    lora: dict | None = None,
    fisher: FisherConfig | None = None,
) -> Adapter:
    """Wrap `model` in a LoRA `PeftModel` initialized by `method` (one of `METHODS`).

    `calibration` are the batches the data-driven methods read (ignored by the others); `fisher` is
    the `FisherConfig` of method `fisher` (default `FisherConfig()`). `model` is modified in place.
    """
    if method not in _BUILDERS:
        raise ValueError(f"unknown init method {method!r}; choose one of {', '.join(METHODS)}")
    return _BUILDERS[method](model, dict(lora or lora_kwargs()), calibration, fisher)


def _peft_init(name: str | bool) -> Builder:
    def build(model: nn.Module, kwargs: dict, calibration: Sequence[Batch], fisher: FisherConfig | None) -> Adapter:
        return Adapter(get_peft_model(model, LoraConfig(init_lora_weights=name, **kwargs)))

    return build


def _eva(model: nn.Module, kwargs: dict, calibration: Sequence[Batch], fisher: FisherConfig | None) -> Adapter:
    from peft import EvaConfig, initialize_lora_eva_weights

    # rho=1 keeps every layer at rank r (same budget as the others); labels are per sequence, not per token.
    from peft.tuners.lora.eva import prepare_layer_inputs_fn_language_modeling

    config = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.0, use_label_mask=False), **kwargs)
    peft_model = get_peft_model(model, config)

    def layer_inputs(layer_input, model_input, layer_name):  # BERT's pooler reads [B, d]: every row counts
        x = layer_input[0] if isinstance(layer_input, tuple | list) else layer_input
        return x.contiguous() if x.dim() == 2 else prepare_layer_inputs_fn_language_modeling(x, model_input, layer_name)

    initialize_lora_eva_weights(
        peft_model, dataloader=list(calibration), prepare_layer_inputs_fn=layer_inputs, show_progress_bar=False
    )
    return Adapter(peft_model)


def _corda(mode: str) -> Builder:
    """PEFT's CorDA in `mode` ("ipm": instruction-previewed, task data; "kpm": knowledge-preserved, the data
    whose knowledge is kept)."""

    def build(model: nn.Module, kwargs: dict, calibration: Sequence[Batch], fisher: FisherConfig | None) -> Adapter:
        return _corda_adapter(model, kwargs, calibration, mode)

    return build


def _corda_adapter(model: nn.Module, kwargs: dict, calibration: Sequence[Batch], mode: str) -> Adapter:
    """PEFT's CorDA hook takes `input[0].squeeze(0)` as a [T, d] matrix: it assumes batches of one
    sequence and 3-D layer inputs. A 2-D input (BERT's pooler reads [B, d]) would give a wrong
    covariance, so that is refused."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode), **kwargs)

    if "dense" in kwargs["target_modules"] and hasattr(model, "bert"):
        raise NotImplementedError("corda: PEFT's CorDA cannot read BERT's pooler (2-D input); drop it from targets")

    @torch.no_grad()
    def run_model() -> None:  # one sequence at a time, unpadded, as CorDA's hook expects
        for batch in calibration:
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                model(input_ids=row[mask.bool()][None])

    preprocess_corda(model, config, run_model=run_model)
    return Adapter(get_peft_model(model, config))


@torch.no_grad()
def _lora_null(model: nn.Module, kwargs: dict, calibration: Sequence[Batch], fisher: FisherConfig | None) -> Adapter:
    """LoRA-Null (v1, its authors' rule): with `C = Σ x xᵀ` over every non-padding token of the keep batches at a
    layer's input and `U_K` the r eigenvectors of C of smallest eigenvalue (the directions the kept behaviour least
    excites), the adapter is W projected onto them, `s·B·A = W U_K U_Kᵀ` (its SVD, √σ on each side), and the
    base keeps the rest, `W − W U_K U_Kᵀ`: the model is unchanged at step 0 and A's rows span `U_K`. Where the keep
    tokens are fewer than a layer's inputs, `U_K` is a basis of C's null space that float64 `eigh` picks."""
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=True, **kwargs))
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}
    moments = {n: 0.0 for n in layers}
    mask: list[torch.Tensor] = []

    def record(name: str, x: torch.Tensor) -> None:
        rows = x[mask[0].bool()].double()
        moments[name] = moments[name] + rows.T @ rows

    hooks = [m.register_forward_hook(lambda _, args, __, n=n: record(n, args[0])) for n, m in layers.items()]
    for batch in calibration:
        mask[:] = [batch["attention_mask"]]
        peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    for name, module in layers.items():
        a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
        base = module.get_base_layer().weight
        null = torch.linalg.eigh(moments[name]).eigenvectors[:, : a.shape[0]]  # ascending eigenvalues
        projected = base.double() @ null @ null.T
        u, sigma, vt = torch.linalg.svd(projected, full_matrices=False)
        root = (sigma[: a.shape[0]] / s).sqrt()
        b.copy_(u[:, : a.shape[0]] * root)
        a.copy_(root[:, None] * vt[: a.shape[0]])
        base.copy_(base.double() - projected)
    return Adapter(peft_model)


def _lora_ga(model: nn.Module, kwargs: dict, calibration: Sequence[Batch], fisher: FisherConfig | None) -> Adapter:
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    config = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **kwargs)

    def train_step() -> None:
        for batch in calibration:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step=train_step)
    return Adapter(get_peft_model(model, config))


def _fisher(model: nn.Module, kwargs: dict, calibration: Sequence[Batch], fisher: FisherConfig | None) -> Adapter:
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=True, **kwargs))
    config = fisher or FisherConfig()
    if config.num_batches > len(calibration):
        config = config.model_copy(update={"num_batches": len(calibration)})
    report = initialize(peft_model, list(calibration), config=config)
    return Adapter(peft_model, dict(report.seconds), report.num_batches)


@torch.no_grad()
def _fisher_random(
    model: nn.Module, kwargs: dict, calibration: Sequence[Batch], fisher: FisherConfig | None
) -> Adapter:
    """The Fisher init's scale without its subspace: every row of A and column of B is redrawn from a
    Gaussian at the norm the init gave it, and the base is re-offset (`W_base = W − s·B·A`), so the
    model still starts at its pre-trained outputs. Drawn from torch's seeded generator (the run's seed)."""
    adapter = _fisher(model, kwargs, calibration, fisher)
    for module in adapter.model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            s, base = module.scaling["default"], module.get_base_layer().weight
            base += s * (b @ a)
            a.copy_(_same_norms(torch.randn_like(a), a, dim=1))
            b.copy_(_same_norms(torch.randn_like(b), b, dim=0))
            base -= s * (b @ a)
    return adapter


def _same_norms(x: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` with each slice along `dim` scaled to the norm of `like`'s."""
    return x * like.norm(dim=dim, keepdim=True) / x.norm(dim=dim, keepdim=True)


_BUILDERS: dict[str, Builder] = {
    "lora": _peft_init(True),
    **{name: _peft_init(name) for name in WEIGHT_ONLY},
    "eva": _eva,
    "corda": _corda("ipm"),
    "corda-kpm": _corda("kpm"),
    "lora-null": _lora_null,
    "lora_ga": _lora_ga,
    "fisher": _fisher,
    "fisher-random": _fisher_random,
}
