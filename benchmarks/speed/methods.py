"""The measured methods. Each takes the frozen base model and the batches, does its set-up (not
timed) and returns the call that is timed; that call returns extra figures to report (or {}).

- `floor`: forward + input-gradient backward of the summed loss over every batch, no weight
  gradient, no hooks: the physical lower bound of any gradient-statistics init. It runs in the
  mode fisher's pass runs in (`estimation_mode`: eval, checkpointed blocks kept checkpointed).
- `train_step`: one LoRA training step (AdamW) per batch, the adapter already in place.
- `lora`: plain `get_peft_model` (PEFT's default init): the wrapping cost every init below includes.
- `fisher` / `fisher-<selector>`: `get_peft_model` then `fisher_core.initialize` (default
  `FisherConfig` plus `settings["fisher"]` overrides, `num_batches` = all batches and `stop_tol=None`,
  so it reads exactly the floor's tokens; the default's early stop would only make it cheaper), whitened by
  the task's own statistics (`keep_knowledge=False`).
- `fisher-keep`: the same in keep mode, what the default does on a chat model: the model's greedy answers to
  the shipped instructions (made with the tokenizer saved beside the model, so only real-weight presets),
  their statistics pass, then selection.
- `lora_ga`: PEFT's `preprocess_loraga` (fp32 weight gradients of the target layers) then
  `get_peft_model` (which runs its SVDs and writes the base offsets).
- `eva`: `get_peft_model` then `initialize_lora_eva_weights` (incremental PCA of layer inputs; it
  cycles the batches until the components converge).
- `corda`: PEFT's `preprocess_corda` (IPM: input covariances, then an SVD of `W·C` per layer) then
  `get_peft_model`; its hook reads one sequence per forward, so the batches are fed row by row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from benchmarks.speed.measure import held_bytes
from benchmarks.speed.workload import Batch

Timed = Callable[[], dict]
Method = Callable[[nn.Module, list[Batch], dict], Timed]
SELECTORS = ("natural", "subspace", "fwsvd", "select")


def lora_kwargs(settings: dict) -> dict:
    """The LoRA settings every method shares (explicit target names: PEFT's data-driven
    preprocessors do not expand `all-linear`)."""
    return {
        "r": settings["rank"],
        "lora_alpha": 2 * settings["rank"],
        "lora_dropout": 0.0,
        "target_modules": list(settings["targets"]),
    }


def floor(model: nn.Module, batches: list[Batch], settings: dict) -> Timed:
    from fisher_core.estimate.hooks import estimation_mode
    from fisher_core.estimate.objective import summed_cross_entropy, supervised_logits

    roots: list[torch.Tensor] = []

    def make_root(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.detach().requires_grad_(True)
        roots.append(output)
        return output

    model.get_input_embeddings().register_forward_hook(make_root)

    def run() -> dict:
        with estimation_mode(model):
            for batch in batches:
                roots.clear()
                with torch.enable_grad():
                    loss = summed_cross_entropy(*supervised_logits(model, batch))
                torch.autograd.grad(loss, roots)
        return {}

    return run


def train_step(model: nn.Module, batches: list[Batch], settings: dict) -> Timed:
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs(settings)))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> dict:
        for batch in batches:
            peft_model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {}

    return run


def lora(model: nn.Module, batches: list[Batch], settings: dict) -> Timed:
    def run() -> dict:
        get_peft_model(model, LoraConfig(**lora_kwargs(settings)))
        return {}

    return run


def fisher(selector: str | None, keep: bool = False) -> Method:
    def method(model: nn.Module, batches: list[Batch], settings: dict) -> Timed:
        from transformers import AutoTokenizer

        from fisher_core import FisherConfig, initialize

        # every batch is read (no early stop), so the init sees exactly the floor's tokens
        overrides = {"stop_tol": None, "keep_knowledge": keep, **settings.get("fisher", {}),
                     **({"selector": selector} if selector else {})}  # fmt: skip
        config = FisherConfig(num_batches=len(batches), progress=False, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path) if keep else None

        def run() -> dict:
            before = held_bytes(settings.get("device", "cpu"))
            peft_model = get_peft_model(model, LoraConfig(**lora_kwargs(settings)))
            wrapping = held_bytes(settings.get("device", "cpu")) - before  # exact with --exact-rss on CPU
            report = initialize(peft_model, batches, config=config, tokenizer=tokenizer)
            held = int(report.stats.meta.get("held_peak_bytes", 0))  # inputs/gradients kept at once for Ḡ
            adapter = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
            return {
                "selector": config.selector,
                "phases": report.seconds,
                "statistics_bytes": statistics_bytes(report.stats),
                "held_peak_bytes": held,
                "adapter_bytes": adapter,  # the LoRA weights themselves, which every LoRA method allocates
                "wrapping_bytes": wrapping,  # what get_peft_model added: the adapter and PEFT's wrapper objects
            }

        return run

    return method


def statistics_bytes(stats) -> int:
    """Bytes of the averaged statistics (a factor shared by layers reading one input counted once)."""
    tensors = {}
    for s in stats.values():
        for stat in (s.input_cov, s.grad_cov, s.mean_grad):
            parts = [getattr(stat, a) for a in ("y", "omega", "left", "right") if hasattr(stat, a)] or [stat]
            tensors.update({id(t): t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor)})
    return sum(tensors.values())


def lora_ga(model: nn.Module, batches: list[Batch], settings: dict) -> Timed:
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    config = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **lora_kwargs(settings))

    def train_step() -> None:
        for batch in batches:
            model(**batch).loss.backward()

    def run() -> dict:
        preprocess_loraga(model, config, train_step=train_step)
        get_peft_model(model, config)
        return {}

    return run


def eva(model: nn.Module, batches: list[Batch], settings: dict) -> Timed:
    from peft import EvaConfig, initialize_lora_eva_weights

    config = LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=1.0), **lora_kwargs(settings))

    def run() -> dict:
        peft_model = get_peft_model(model, config)
        initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
        return {}

    return run


def corda(model: nn.Module, batches: list[Batch], settings: dict) -> Timed:
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(
        init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"), **lora_kwargs(settings)
    )

    @torch.no_grad()
    def run_model() -> None:  # CorDA's hook squeezes dim 0: it reads one sequence per forward
        for batch in batches:
            for i in range(batch["input_ids"].shape[0]):
                model(**{k: v[i : i + 1] for k, v in batch.items() if k != "labels"})

    def run() -> dict:
        preprocess_corda(model, config, run_model=run_model)
        get_peft_model(model, config)
        return {}

    return run


METHODS: dict[str, Method] = {
    "floor": floor,
    "train_step": train_step,
    "lora": lora,
    "fisher": fisher(None),
    "fisher-keep": fisher(None, keep=True),
    **{f"fisher-{s}": fisher(s) for s in SELECTORS},
    "lora_ga": lora_ga,
    "eva": eva,
    "corda": corda,
}
