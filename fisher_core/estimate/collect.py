"""`estimate`: stream calibration batches through the frozen model and return `FisherStats`.

Per batch: one forward (inputs recorded by hooks), then one input-gradient backward of the summed
loss (`empirical`), or `mc_samples` backwards of losses with labels sampled from the model for `S_G` plus,
when the selector reads `Ḡ`, one of the data's loss (`true`).
The backward targets the input embeddings' output and the batch's float inputs, so no parameter ever receives
a `.grad`.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Collection, Iterable, Mapping
from itertools import islice

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisher_core.config import FisherConfig
from fisher_core.estimate.convergence import ConvergenceMonitor
from fisher_core.estimate.distributed import (
    global_fingerprint,
    global_max,
    global_min,
    in_lockstep,
    is_main_process,
    process_index,
    world_size,
)
from fisher_core.estimate.factors import FisherStats, StatsAccumulator, shares_input
from fisher_core.estimate.hooks import estimation_mode, replayed_layers, rooted
from fisher_core.estimate.objective import (
    Batch,
    LogitsFn,
    LossFn,
    batch_seed,
    model_inputs,
    position_masks,
    sample_labels,
    summed_cross_entropy,
    supervised_logits,
)
from fisher_core.estimate.plan import Plan, initial_plan, planned_bytes, refit, requested_sketch_rank, resolve_budget
from fisher_core.estimate.recorders import InputRows, Record, Recorders
from fisher_core.estimate.sums import is_finite, is_zero
from fisher_core.layers import base_layer, find_targets, layer_kind
from fisher_core.sharded import whole_parameters

logger = logging.getLogger("fisher_core")


def estimate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    target_modules: str | list[str] | Mapping[str, nn.Module],
    loss_fn: LossFn | None = None,
    logits_fn: LogitsFn | None = None,
    config: FisherConfig | None = None,
) -> FisherStats:
    """K-FAC statistics (`S_A`, `S_G`, optionally `Ḡ`) of the objective over `config.num_batches` batches.

    `batches` yields dicts for `model(**batch)`. The objective is `loss_fn` (summed loss) when given,
    else cross-entropy of the batch `labels` (-100 ignored). `true` Fisher samples labels from
    `logits_fn` (default: the model's logits at supervised positions). The model's weights,
    `requires_grad` flags, train/eval mode and gradient checkpointing are as before on return, and
    no parameter has a `.grad` from this pass. With `cache_path`, matching statistics are read instead.
    """
    config = config or FisherConfig()
    modules = dict(target_modules) if isinstance(target_modules, Mapping) else find_targets(model, target_modules)
    key: tuple[str, str] | None = None  # (data, weights) fingerprints, with a cache
    if config.cache_path is not None:
        from fisher_core.estimate.cache import load_matching, save

        batches = list(islice(batches, config.num_batches))  # every batch the pass may read is fingerprinted
        key = _cache_key(model, batches, loss_fn, logits_fn)
        cached = load_matching(config.cache_path, modules, config, *key)
        if cached is not None:
            return cached
    _check_materialized(modules)
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    acc, recorders, used, supervised = _pass(model, batches, modules, config, loss_fn, logits_fn)
    stats = acc.finalize(config.fisher_type, used)  # all-reduces: every check below is global
    _check_result(stats, recorders.inputs.unmasked, used, supervised)
    seconds = time.perf_counter() - started
    logger.info(
        "fisher-lora: %s Fisher over %d batches, %d tokens, %d layers in %.1fs%s",
        config.fisher_type, used, stats.num_tokens, len(stats), seconds,
        f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else "",
    )  # fmt: skip
    stats.meta["seconds"] = f"{seconds:.3f}"
    stats.meta["held_peak_bytes"] = str(recorders.held_peak)  # layer inputs/gradients kept at once for Ḡ
    if key is not None and is_main_process():  # the statistics are global: one writer
        save(stats, config.cache_path, modules, config, *key)
    return stats


def _cache_key(
    model: nn.Module, batches: list[Batch], loss_fn: LossFn | None, logits_fn: LogitsFn | None
) -> tuple[str, str]:
    """(data, weights) fingerprints a cached file must match; the same on every process."""
    from fisher_core.estimate.cache import data_fingerprint, fingerprint

    data = global_fingerprint(data_fingerprint(batches, loss_fn, logits_fn))
    with whole_parameters(model) as gathering:  # FSDP1 and ZeRO-3: each module gathered while it is read
        return data, fingerprint(model, gathering)


def _pass(
    model: nn.Module, batches: Iterable[Batch], modules: Mapping[str, nn.Module], config: FisherConfig,
    loss_fn: LossFn | None, logits_fn: LogitsFn | None,
) -> tuple[StatsAccumulator, Recorders, int, int]:  # fmt: skip
    """The batch loop: accumulate each batch, refit the memory plan to what the pass held, stop at
    convergence. Returns the accumulator, the recorders, the number of batches read and of supervised units."""
    shapes = {name: layer_kind(m).shape(base_layer(m)) for name, m in modules.items()}
    device = _device(model)
    budget = resolve_budget(config.memory_budget, device)
    if config.memory_budget == "auto" and budget is not None:  # each process's free memory: plan for the least
        budget = global_min(budget)
    ranks = _lora_ranks(modules)
    plan = initial_plan(shapes, config, budget, ranks)
    _log_plan(plan, shapes, config, budget)
    if plan.sketch_rank < requested_sketch_rank(config, ranks):
        logger.info("fisher-lora: memory_budget=%d bytes: sketch rank lowered to %d to fit", budget, plan.sketch_rank)
    acc = StatsAccumulator(shapes, config.needs_mean_grad, plan.sketched, plan.sketch_rank, config.seed, device)
    generator = torch.Generator(device=device)  # seeded per batch: `batch_seed`
    world, rank = world_size(), process_index()
    monitor = ConvergenceMonitor(config.stop_tol, config.seed) if config.stop_tol is not None else None
    used, supervised, stopped_early = 0, 0, False
    with estimation_mode(model, plan.checkpoint_blocks) as blocks:
        if plan.checkpoint_blocks and blocks:
            logger.info("fisher-lora: memory_budget: the pass checkpoints %d blocks (holds one's inputs)", len(blocks))
        inputs = InputRows(config.position_fraction, generator)
        recorders = Recorders(acc, modules, replayed_layers(modules, blocks), config.needs_mean_grad, inputs)
        progress = tqdm(
            islice(in_lockstep(batches), config.num_batches),  # every process reads the same count
            total=config.num_batches, desc="fisher-lora statistics", unit="batch", disable=not config.progress,
        )  # fmt: skip
        with recorders.attached(model, blocks):
            for batch in progress:
                generator.manual_seed(batch_seed(config.seed, used * world + rank))
                supervised += _accumulate_batch(
                    model, _to_device(batch, device), recorders, config, loss_fn, logits_fn, generator
                )
                _check_replays(recorders)
                if budget is not None:  # what the pass held for Ḡ counts against the budget too
                    plan = _tightened(acc, recorders.held_peak, shapes, config, budget, plan)
                recorders.end_batch()
                used += 1
                progress.set_postfix(tokens=max(a.tokens for a in acc.layers.values()))
                if monitor is not None and monitor.due(used) and monitor.converged(acc) and used >= 4:
                    logger.info(
                        "fisher-lora: statistics converged after %d batches (median change %.3g < stop_tol=%g)",
                        used, monitor.last_change, config.stop_tol,
                    )  # fmt: skip
                    stopped_early = True
                    break
    if used == 0:
        raise ValueError("the batches yielded nothing: pass a non-empty dataloader or iterable of dicts")
    if used < config.num_batches and not stopped_early:
        warnings.warn(
            f"only {used} of num_batches={config.num_batches} batches were available; using {used}", stacklevel=3
        )
    return acc, recorders, used, supervised


def _check_replays(recorders: Recorders) -> None:
    """A checkpointed layer whose input and output gradient never met would make Ḡ wrong."""
    if unpaired := recorders.unpaired():
        raise RuntimeError(
            f"gradient checkpointing: layers {unpaired[:3]} were not replayed with their "
            "gradients; turn checkpointing off for the statistics (model.activation_checkpointing_disable(), "
            "gradient_checkpointing_disable() on an older transformers)"
        )


def _tightened(
    acc: StatsAccumulator, held_peak: int, shapes: Mapping[str, tuple[int, int]], config: FisherConfig,
    budget: int, plan: Plan,
) -> Plan:  # fmt: skip
    """The memory plan refit (`refit`) to the bytes the pass held for Ḡ (`held_peak`, the most over processes);
    the accumulator sketches what the tighter plan sketches."""
    unread = [n for n, layer in acc.layers.items() if shares_input(layer.input_group, n)]
    held = global_max(held_peak)
    tighter = refit(plan, shapes, config, budget, held, unread)
    if tighter is not plan:
        logger.info("fisher-lora: the pass holds %d bytes for Ḡ; statistics sketched to fit", held)
        _log_plan(tighter, shapes, config, budget, unread)
        acc.sketch_more(tighter.sketched)
    return tighter


def _log_plan(
    plan: Plan, shapes: Mapping[str, tuple[int, int]], config: FisherConfig, budget: int | None,
    unread: Collection[str] = (),
) -> None:  # fmt: skip
    """One line for a budgeted plan that sketches: how many statistics, at which rank, in how many bytes."""
    if budget is None or not plan.sketched:
        return
    logger.info(
        "fisher-lora: memory_budget=%d bytes: %d statistics sketched at rank %d, %d bytes planned",
        budget, sum(len(v) for v in plan.sketched.values()), plan.sketch_rank,
        planned_bytes(shapes, config.needs_mean_grad, plan.sketched, plan.sketch_rank, unread),
    )  # fmt: skip


def _check_result(stats: FisherStats, unmasked: set[str], used: int, supervised: int) -> None:
    """Refuse non-finite statistics or no supervised tokens; warn on unmasked layers."""
    if unmasked:
        warnings.warn(
            f"layer inputs did not match the attention mask's shape, their padding was counted: {sorted(unmasked)[:3]}",
            stacklevel=3,
        )
    _check_finite(stats)
    if all(is_zero(s.grad_cov) for s in stats.values()):
        raise ValueError(
            f"no supervised tokens in {used} batches ({supervised} on this process): every label is -100 "
            "or the loss does not depend on the adapted layers; check the labels / prompt masking, or the loss_fn"
        )


def _lora_ranks(modules: Mapping[str, nn.Module]) -> list[int]:
    return [max(m.r.values()) for m in modules.values() if isinstance(getattr(m, "r", None), dict) and m.r]


def _accumulate_batch(
    model: nn.Module,
    batch: Batch,
    recorders: Recorders,
    config: FisherConfig,
    loss_fn: LossFn | None,
    logits_fn: LogitsFn | None,
    generator: torch.Generator,
) -> int:
    """One forward and the backwards of the objective (curvlinops' split: one branch per Fisher type, each
    backward told what it records). Returns the supervised units (tokens or sequences) the batch held."""
    batch, leaves = _float_inputs_require_grad(batch)
    recorders.begin_batch(position_masks(model, batch, config.positions), leaves)
    backward = functools.partial(_backward, recorders, model=model, batch=batch)
    with torch.enable_grad():
        if config.fisher_type == "empirical":
            if loss_fn is not None:
                loss = loss_fn(model, batch)
                supervised = int(loss.requires_grad)
            else:
                logits, labels = supervised_logits(model, batch)
                supervised, loss = labels.numel(), summed_cross_entropy(logits, labels)
                del logits  # the backward keeps what the loss saved, as a training step does, not a second copy
            backward(loss, Record(grad_cov=True, mean_grad=config.needs_mean_grad), retain=False)
            return supervised
        logits, labels = (logits_fn or supervised_logits)(model, batch)
        if config.needs_mean_grad:  # Ḡ always comes from the data's labels
            backward(summed_cross_entropy(logits, labels), Record(grad_cov=False, mean_grad=True), retain=True)
        sampled = Record(grad_cov=True, mean_grad=False, weight=1.0 / config.mc_samples)
        for i in range(config.mc_samples):
            loss = summed_cross_entropy(logits, sample_labels(logits, generator))
            backward(loss, sampled, retain=i < config.mc_samples - 1)
        return labels.numel()


def _backward(recorders: Recorders, loss: Tensor, record: Record, retain: bool, model: nn.Module, batch: Batch) -> None:
    """Input-gradient backward recording `record`: the hooks see every g_t; no parameter gets a `.grad`."""
    if not torch.isfinite(loss):
        layer = first_nonfinite_layer(model, batch)
        where = f"; the first non-finite output is at layer {layer!r}" if layer else ""
        raise FloatingPointError(
            f"the loss is {loss.item()}{where}: check the model's dtype (fp16 overflow?) and the data; "
            "nothing was written"
        )
    if loss.numel() == 1 and not loss.requires_grad:
        return  # a batch without supervised tokens: nothing to differentiate
    if not recorders.leaves:
        raise RuntimeError(
            "no input tensor requires grad: the model has no get_input_embeddings() and the batch no float "
            "inputs; pass a model with input embeddings or float inputs"
        )
    recorders.backward(loss, record, retain)


def first_nonfinite_layer(model: nn.Module, batch: Batch) -> str | None:
    """Re-run the forward and name the first module (in execution order) with a non-finite output."""
    found: list[str] = []

    def check(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not found and isinstance(output, Tensor) and output.is_floating_point() and not output.isfinite().all():
                found.append(name)

        return hook

    handles = [m.register_forward_hook(check(n)) for n, m in model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(**model_inputs(model, batch))
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _check_materialized(modules: Mapping[str, nn.Module]) -> None:
    for name, module in modules.items():
        weight = getattr(base_layer(module), "weight", None)
        if weight is not None and weight.device.type == "meta":
            raise ValueError(
                f"layer {name!r} is on the meta device (weights not loaded); load the model's weights "
                "before initializing (e.g. do not initialize inside init_empty_weights)"
            )


def _float_inputs_require_grad(batch: Batch) -> tuple[Batch, list[Tensor]]:
    """The batch's float inputs (`pixel_values`, `inputs_embeds`, …; not labels) as roots of the backward too:
    a model reading them instead of, or beside, its input embeddings then has every layer on a path to a root."""
    out, leaves = dict(batch), []
    for k, v in batch.items():
        if k != "labels" and isinstance(v, Tensor) and v.is_floating_point():
            out[k] = rooted(v, leaves)
    return out, leaves


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batches must be dicts for model(**batch) (input_ids, attention_mask, labels, …), got a "
            f"{type(batch).__name__}; make the dataloader's collate_fn return a dict"
        )
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _check_finite(stats: FisherStats) -> None:
    for name, s in stats.items():
        for what, t in (("S_A", s.input_cov), ("S_G", s.grad_cov), ("mean gradient", s.mean_grad)):
            if t is not None and not is_finite(t):
                raise FloatingPointError(
                    f"non-finite {what} at layer {name!r} (the first bad layer): check the model's dtype "
                    "(fp16 overflow?) and the data; nothing was written"
                )
