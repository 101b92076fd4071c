"""Memory budget: sketched statistics stay within the budget and recover what they can hold."""

from __future__ import annotations

import gc
import importlib
import weakref

import pytest
import torch
from tiny import checkpointing_on, tiny_llama

from fisher_core import FisherConfig, estimate, select
from fisher_core.estimate import hooks
from fisher_core.estimate.factors import StatsAccumulator
from fisher_core.estimate.objective import supervised_logits
from fisher_core.estimate.plan import initial_plan, plan_sketches, planned_bytes
from fisher_core.estimate.sums import CrossSketch, PsdSketch, SketchMatrices
from fisher_core.layers import base_layer, find_targets, layer_kind

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _batches() -> list[dict]:
    ids = torch.randint(3, 384, (8, 12), generator=torch.Generator().manual_seed(0))
    return [
        {"input_ids": ids[i : i + 4], "attention_mask": torch.ones(4, 12, dtype=torch.long), "labels": ids[i : i + 4]}
        for i in (0, 4)
    ]


def test_nystrom_sketch_recovers_a_low_rank_factor_exactly():
    g = torch.Generator().manual_seed(1)  # every draw seeded: the same data whatever ran before
    x = torch.randn(50, 5, generator=g) @ torch.randn(5, 40, generator=g)
    sketch = PsdSketch(SketchMatrices(0, torch.device("cpu"))("input", 40, 12))
    sketch.add_outer(x)
    vals, vecs = sketch.mean(50).eigenpairs()
    exact = x.T @ x / 50  # entries of order 5: fp32 rounding of the sketch is ~1e-6 of that
    scale = float(exact.abs().max())
    torch.testing.assert_close((vecs[:, :5] * vals[:5]) @ vecs[:, :5].T, exact, rtol=1e-3, atol=1e-5 * scale)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(12), rtol=0, atol=1e-5)  # all k, the 7 null ones too


def test_cross_sketch_recovers_a_low_rank_mean_gradient_exactly():
    g = torch.Generator().manual_seed(2)
    grads, inputs = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g), torch.randn(30, 16, generator=g)
    sketch = CrossSketch(20, 16, 6, SketchMatrices(0, torch.device("cpu")))
    sketch.add_outer(grads, other=inputs)
    torch.testing.assert_close(_dense(sketch.mean(30)), grads.T @ inputs / 30, rtol=1e-3, atol=1e-4)


def test_cross_sketch_reuses_the_factor_sketches_projections():
    """Ḡ's sketch shares its test matrices with the factor sketches: fed their projections x·Ω and g·Ω_G it
    holds exactly what it computes from x and g alone (with matrices drawn again: the draws are seeded)."""
    g = torch.Generator().manual_seed(3)
    grads, inputs = torch.randn(30, 20, generator=g), torch.randn(30, 16, generator=g)
    matrices = SketchMatrices(0, torch.device("cpu"))
    x_projected = PsdSketch(matrices("input", 16, 8)).add_outer(inputs)
    g_projected = PsdSketch(matrices("grad", 20, 8)).add_outer(grads)
    reused, alone = CrossSketch(20, 16, 8, matrices), CrossSketch(20, 16, 8, SketchMatrices(0, torch.device("cpu")))
    reused.add_outer(grads, other=inputs, rows_projected=g_projected, other_projected=x_projected)
    alone.add_outer(grads, other=inputs)
    torch.testing.assert_close(reused.y, alone.y)
    torch.testing.assert_close(reused.w, alone.w)


def test_sketches_of_one_width_share_one_test_matrix_and_the_plan_counts_what_is_allocated():
    """One test matrix per (input or gradient, width), not per layer: inputs and gradients of a square layer get
    independent draws (Ḡ's two-sided sketch needs them independent), and `planned_bytes` is what the sketches
    allocate (their sums, and each distinct test matrix once)."""
    shapes = {"q": (16, 16), "o": (16, 16), "up": (32, 16)}  # (m, n)
    sketched = {name: {"input", "grad", "mean_grad"} for name in shapes}
    acc = StatsAccumulator(shapes, True, sketched, sketch_rank=4)
    q, o, up = (acc.layers[name] for name in shapes)
    assert q.input_sum.omega is o.input_sum.omega is up.input_sum.omega
    assert q.grad_sum.omega is o.grad_sum.omega and up.grad_sum.omega.shape == (32, 4)
    assert not torch.equal(q.input_sum.omega, q.grad_sum.omega)
    assert up.mean_grad_sum.psi_t is up.grad_sum.omega
    assert up.mean_grad_sum.omega.data_ptr() == up.input_sum.omega.data_ptr()
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for layer in acc.layers.values()
        for s in (layer.input_sum, layer.grad_sum, layer.mean_grad_sum)
        for t in vars(s).values()
        if isinstance(t, torch.Tensor) and t.dim() == 2  # not the traces
    }
    assert sum(storages.values()) == planned_bytes(shapes, True, sketched, 4)


def test_plan_sketches_the_largest_factors_until_the_budget_holds():
    shapes = {"a": (64, 32), "b": (16, 16)}  # (m, n)
    full = 4 * (32 * 32 + 64 * 64 + 16 * 16 * 2)
    assert plan_sketches(shapes, False, full, 8) == {}
    plan = plan_sketches(shapes, False, full - 1, 8)
    assert plan == {"a": {"grad"}}  # the 64×64 factor goes first
    with pytest.raises(MemoryError, match="memory_budget=100"):
        plan_sketches(shapes, False, 100, 8)


def test_the_inputs_held_for_the_mean_gradient_count_against_the_budget():
    """The layer inputs a pass holds for Ḡ count against the budget. Under a budget the pass checkpoints every
    block itself, so it holds one block's inputs whether or not the model checkpoints: a budget that holds the
    dense statistics and one block's inputs (but not every block's) keeps them dense, with the same values and
    the model's own setting back afterwards; a budget the inputs alone fill is refused with what to do."""

    def run(checkpointing: bool, budget: int | None = None):
        model = tiny_llama(layers=4)
        if checkpointing:
            checkpointing_on(model.train())
        config = FisherConfig(progress=False, num_batches=2, memory_budget=budget, sketch_rank=8)
        return estimate(model, _batches(), target_modules=TARGETS, config=config)

    def sketched(stats) -> int:
        return sum(
            type(s.grad_cov).__name__ == "FactorSketch" or type(s.mean_grad).__name__ == "LowRank"
            for s in stats.values()
        )

    held_plain, held_checkpointed = (int(run(c).meta["held_peak_bytes"]) for c in (False, True))
    assert 0 < held_checkpointed < held_plain / 2
    targets = find_targets(tiny_llama(layers=4), TARGETS)
    shapes = {n: layer_kind(m).shape(base_layer(m)) for n, m in targets.items()}
    statistics = planned_bytes(shapes, True, {}, 8)
    budget = statistics + (held_plain + held_checkpointed) // 2
    plain, budgeted = run(False), run(False, budget)
    assert sketched(budgeted) == 0 and sketched(run(True, budget)) == 0
    assert int(budgeted.meta["held_peak_bytes"]) == held_checkpointed
    for name, s in plain.items():
        torch.testing.assert_close(budgeted[name].mean_grad, s.mean_grad, rtol=1e-5, atol=1e-7)
    all_sketched = planned_bytes(shapes, True, {n: {"input", "grad", "mean_grad"} for n in shapes}, 8)
    with pytest.raises(MemoryError, match=r"holds \d+ bytes of layer inputs for Ḡ.*position_fraction"):
        run(False, all_sketched + held_checkpointed // 2)  # the statistics fit, until the pass holds the inputs


def test_a_budgeted_pass_checkpoints_and_hands_the_model_back_as_it_was():
    model = tiny_llama(layers=2)
    blocks = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    seen: list[bool] = []  # inside the block's forward (newer transformers run a block's own hooks once)
    blocks[0].self_attn.register_forward_pre_hook(lambda m, args: seen.append(blocks[0].gradient_checkpointing))
    config = FisherConfig(progress=False, num_batches=1, memory_budget=10**9)
    estimate(model, _batches(), target_modules=TARGETS, config=config)
    assert seen == [True, True]  # checkpointed during the pass: the forward, then its replay in the backward
    assert not model.is_gradient_checkpointing and not any(b.gradient_checkpointing or b.training for b in blocks)


def test_block_checkpointing_is_routed_on_this_transformers():
    """The one private route (`hooks._PRIVATE_FUNC`) is what this transformers' blocks call: the probe finds it on
    the pinned set and the latest (scripts/test --latest); the budgeted pass above shows it in use."""
    assert hooks.block_checkpointing_routed()


def test_without_the_private_route_a_budgeted_pass_does_not_checkpoint_and_says_so(monkeypatch, caplog):
    """A transformers that no longer calls its blocks through the private route: one warning, no block
    checkpointed (the user's flags off for the pass, back after it), the statistics those of a plain pass."""
    config = FisherConfig(progress=False, num_batches=2)
    plain = estimate(tiny_llama(layers=2), _batches(), target_modules=TARGETS, config=config)
    monkeypatch.setattr(hooks, "block_checkpointing_routed", lambda: False)
    model = checkpointing_on(tiny_llama(layers=2).train())
    block = model.model.layers[0]
    seen: list[bool] = []
    block.self_attn.register_forward_pre_hook(lambda m, args: seen.append(block.gradient_checkpointing))
    config = FisherConfig(progress=False, num_batches=2, memory_budget=10**9)
    with caplog.at_level("WARNING", logger="fisher_core"):
        budgeted = estimate(model, _batches(), target_modules=TARGETS, config=config)
    assert [r.message for r in caplog.records if "checkpoint" in r.message] == [
        "fisher-lora: this transformers does not checkpoint its blocks through `_gradient_checkpointing_func`: the "
        "statistics pass runs without checkpointing (it holds every adapted layer's input for Ḡ until its gradient "
        "arrives)"
    ]
    assert seen == [False] * len(_batches())  # one forward per batch, no replay
    assert model.training and block.gradient_checkpointing
    for name, s in plain.items():
        torch.testing.assert_close(budgeted[name].mean_grad, s.mean_grad, rtol=1e-5, atol=1e-7)


def test_statistics_sketched_mid_pass_equal_sketches_streamed_from_the_start():
    g = torch.Generator().manual_seed(3)
    x, grads = torch.randn(40, 12, generator=g), torch.randn(40, 9, generator=g)
    streamed = StatsAccumulator({"l": (9, 12)}, True, {"l": {"input", "grad", "mean_grad"}}, 6)
    converted = StatsAccumulator({"l": (9, 12)}, True, {}, 6)
    for part in (slice(0, 25), slice(25, 40)):
        for acc in (streamed, converted):
            layer = acc.layers["l"]
            layer.input_sum.add_outer(x[part])
            layer.grad_sum.add_outer(grads[part])
            layer.mean_grad_sum.add_outer(grads[part], other=x[part])
        if part.start == 0:
            converted.sketch_more({"l": {"input", "grad", "mean_grad"}})
    for attr in ("input_sum", "grad_sum", "mean_grad_sum"):
        a, b = getattr(streamed.layers["l"], attr), getattr(converted.layers["l"], attr)
        assert type(a) is type(b)
        for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
            torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5)


def test_budgeted_estimate_keeps_sketches_and_selection_still_works():
    model = tiny_llama()
    budget = 100_000  # dense statistics need ~154 kB, all sketched ~68 kB, plus one checkpointed block's inputs for Ḡ
    cfg = FisherConfig(progress=False, num_batches=2, selector="natural", memory_budget=budget, sketch_rank=8)
    stats = estimate(model, _batches(), target_modules=TARGETS, config=cfg)
    kinds = {type(s.grad_cov).__name__ for s in stats.values()} | {type(s.mean_grad).__name__ for s in stats.values()}
    assert "FactorSketch" in kinds and "LowRank" in kinds
    directions = select(stats, model, rank=4, config=cfg)
    assert all(torch.isfinite(d.A).all() and torch.isfinite(d.B).all() for d in directions.values())
    assert all(d.rank == 4 for d in directions.values())


@pytest.mark.parametrize("selector", ["fwsvd", "subspace", "select"])
def test_sketched_factors_capture_most_of_what_exact_factors_capture(selector):
    model = tiny_llama()
    exact_cfg = FisherConfig(progress=False, num_batches=2, selector=selector)
    exact = select(
        estimate(model, _batches(), target_modules=TARGETS, config=exact_cfg), model, rank=2, config=exact_cfg
    )
    cfg = exact_cfg.model_copy(update={"memory_budget": 1, "sketch_rank": 30})
    with pytest.raises(MemoryError):
        estimate(model, _batches(), target_modules=TARGETS, config=cfg)
    cfg = exact_cfg.model_copy(update={"memory_budget": 100_000, "sketch_rank": 24})
    low = select(estimate(model, _batches(), target_modules=TARGETS, config=cfg), model, rank=2, config=cfg)
    for name in exact:
        assert low[name].captured == pytest.approx(exact[name].captured, rel=0.15)


def test_sketched_statistics_round_trip_through_the_cache(tmp_path):
    model = tiny_llama()
    cfg = FisherConfig(
        progress=False,
        num_batches=2,
        selector="natural",
        memory_budget=130_000,
        sketch_rank=8,
        cache_path=tmp_path / "s.safetensors",
    )
    first = estimate(model, _batches(), target_modules=TARGETS, config=cfg)
    second = estimate(model, _batches(), target_modules=TARGETS, config=cfg)
    assert second.meta.get("cache")

    def parts(stat):
        return (
            [stat]
            if isinstance(stat, torch.Tensor)
            else [v for v in vars(stat).values() if isinstance(v, torch.Tensor)]
        )

    for name in first:
        for what in ("input_cov", "grad_cov", "mean_grad"):
            a, b = getattr(first[name], what), getattr(second[name], what)
            assert type(a) is type(b) and all(torch.equal(x, y) for x, y in zip(parts(a), parts(b), strict=True))


def test_a_sketch_too_small_for_the_rank_is_refused_with_what_to_set():
    model = tiny_llama()
    cfg = FisherConfig(progress=False, num_batches=2, selector="natural", solver="lowrank", sketch_rank=4)
    stats = estimate(model, _batches(), target_modules=TARGETS, config=cfg)
    with pytest.raises(
        ValueError, match="holds rank 2, fewer than the 4 directions asked for: raise sketch_rank to at least 8"
    ):
        select(stats, model, rank=4, config=cfg)


def test_the_logits_are_not_held_through_the_backward(monkeypatch):
    """The pass keeps what a training step keeps: the loss's saved tensors, not a second copy of the
    logits (at a 128k vocabulary the logits of a 16k-token batch are gigabytes)."""
    collect = importlib.import_module("fisher_core.estimate.collect")
    logits_refs: list[weakref.ref] = []

    def recorded(model, batch):
        logits, labels = supervised_logits(model, batch)
        logits_refs.append(weakref.ref(logits))
        return logits, labels

    monkeypatch.setattr(collect, "supervised_logits", recorded)
    model = tiny_llama()
    held_in_backward: list[bool] = []

    def watch(module, args, output) -> None:
        def check(grad: torch.Tensor) -> None:
            gc.collect()  # only a reference the pass keeps counts, not a cycle waiting for the collector
            held_in_backward.append(logits_refs[-1]() is not None)

        output.register_hook(check)

    model.model.layers[0].mlp.down_proj.register_forward_hook(watch)
    estimate(model, _batches(), target_modules=TARGETS, config=FisherConfig(num_batches=2, progress=False))
    assert held_in_backward == [False, False]


def test_the_first_forward_does_not_keep_the_layer_inputs_alive():
    """Grouping layers by the input they read (q/k/v, gate/up) must not hold every layer's input until
    the backward: that is a whole forward's activations, which the model itself frees (down_proj's)."""
    model = tiny_llama().requires_grad_(False)  # frozen, as under PEFT: no weight gradient saves the inputs
    inputs: list[weakref.ref] = []
    alive_in_backward: list[int] = []
    for block in model.model.layers:
        block.mlp.down_proj.register_forward_hook(lambda m, args, out: inputs.append(weakref.ref(args[0])))

    def watch(module, args, output) -> None:
        def check(grad: torch.Tensor) -> None:
            gc.collect()  # only a reference the pass keeps counts, not a cycle waiting for the collector
            alive_in_backward.append(sum(ref() is not None for ref in inputs))

        output.register_hook(check)

    model.lm_head.register_forward_hook(watch)
    config = FisherConfig(num_batches=1, progress=False, selector="fwsvd")  # no Ḡ: no input is held for it
    estimate(model, _batches(), target_modules=TARGETS, config=config)
    assert len(inputs) == 2 and alive_in_backward == [0]


def test_a_tighter_plan_does_not_bring_back_an_input_sum_nobody_reads():
    """k/v read q's input: their own input sums are freed, and a plan that sketches "input" everywhere
    (as the scale path does) must not allocate them again."""
    shapes = {"q": (16, 16), "k": (8, 16), "v": (8, 16)}
    acc = StatsAccumulator(shapes, True, {}, sketch_rank=4)
    for follower in ("k", "v"):
        acc.layers[follower].input_group = "q"
        acc.drop_input(follower)
    acc.sketch_more({name: {"input", "grad", "mean_grad"} for name in shapes})
    assert isinstance(acc.layers["q"].input_sum, PsdSketch)
    for follower in ("k", "v"):
        assert acc.layers[follower].input_sum.total is None  # an empty dense sum: nothing allocated
        assert isinstance(acc.layers[follower].grad_sum, PsdSketch)


def test_a_budget_lowers_the_default_sketch_rank_until_it_fits_but_not_a_rank_the_user_set():
    shapes = {"a": (512, 512), "b": (512, 512)}  # (m, n)
    budget = 1_000_000  # rank-128 and rank-64 sketches of both layers do not fit, rank 32 does
    plan = initial_plan(shapes, FisherConfig(memory_budget=budget), budget, [4])
    assert plan.sketch_rank == 32 and planned_bytes(shapes, True, plan.sketched, 32) <= budget
    with pytest.raises(MemoryError, match="rank 128"):  # the user's own sketch_rank is kept
        initial_plan(shapes, FisherConfig(memory_budget=budget, sketch_rank=128), budget, [4])
    with pytest.raises(MemoryError, match="rank 64"):  # r = 32: Ḡ's sketch must hold 32 directions (k ≥ 64)
        initial_plan(shapes, FisherConfig(memory_budget=budget), budget, [32])


def _dense(m) -> torch.Tensor:
    """A `LowRank` matrix, formed."""
    return m.left @ m.right


def test_blocks_the_pass_checkpoints_run_without_their_own_dropout():
    """BART's layers apply dropout in their own forward (`training=self.training`); the pass turns such a
    block's flag on only to route it through checkpointing, so forward and replay must still be eval: two
    passes give the same loss and input gradient as the model in plain eval mode, with no checkpointing."""
    from transformers import BartConfig, BartForConditionalGeneration

    from fisher_core.estimate.hooks import estimation_mode

    config = BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        dropout=0.5, activation_dropout=0.5, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval().requires_grad_(False)
    ids = torch.randint(4, 64, (2, 8))

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            loss = model(inputs_embeds=embeds, labels=ids).loss
            (grad,) = torch.autograd.grad(loss, embeds)
        return loss.detach(), grad

    plain = loss_and_grad()
    with estimation_mode(model, checkpoint_all=True) as blocks:
        assert blocks  # the layers are checkpointed for the pass
        first, second = loss_and_grad(), loss_and_grad()
    for got in (first, second):
        torch.testing.assert_close(got, plain)
