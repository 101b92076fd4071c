"""Statistics against independent oracles: brute-force per-token loops, curvlinops, exact enumeration."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from oracles import brute_force_factors
from tiny import checkpointing_on, tiny_llama
from torch import nn

from fisher_core import FisherConfig, estimate
from fisher_core.estimate.sums import CrossSketch, SketchMatrices

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"]


def _batches(vocab: int = 384, n: int = 8, t: int = 10, batch_size: int = 4, seed: int = 1) -> list[dict]:
    """Sequences with right padding and -100 on prompt and padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, t - (i % 4) :] = 0  # varying padding
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :3] = -100  # an unsupervised prompt
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": mask[i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, n, batch_size)
    ]


def _cfg(batches: list, **kw) -> FisherConfig:
    return FisherConfig(progress=False, num_batches=len(batches), **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_factors_match_brute_force_per_token_on_tiny_llama():
    model = tiny_llama()
    batches = _batches()
    stats = estimate(model, batches, target_modules=LAYERS, config=_cfg(batches))
    oracle = brute_force_factors(model, batches, LAYERS)
    for name in LAYERS:
        s_a, s_g = oracle[name]
        assert _rel(stats[name].input_cov, s_a) < 1e-5
        assert _rel(stats[name].grad_cov, s_g) < 1e-5
        assert stats[name].num_tokens == sum(int(b["attention_mask"].sum()) for b in batches)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _mlp_data(n: int = 24, batch_size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def test_mlp_factors_match_brute_force_per_sample_gradients():
    model = MLP()
    data = _mlp_data()
    stats = estimate(
        model, [{"x": x, "labels": y} for x, y in data], target_modules=["fc1", "fc2", "fc3"], config=_cfg(data)
    )
    for name in ["fc1", "fc2", "fc3"]:
        layer = getattr(model, name)
        s_a = s_g = 0
        count = 0
        for x, y in data:
            for i in range(x.shape[0]):  # one sample at a time, gradient w.r.t. the layer output
                captured = {}
                h = layer.register_forward_hook(lambda m, a, o, c=captured: c.update(x=a[0].detach(), y=o))
                out = model(x[i : i + 1])
                h.remove()
                (g,) = torch.autograd.grad(F.cross_entropy(out, y[i : i + 1], reduction="sum"), captured["y"])
                s_a = s_a + torch.outer(captured["x"][0], captured["x"][0]).double()
                s_g = s_g + torch.outer(g[0], g[0]).double()
                count += 1
        assert _rel(stats[name].input_cov, s_a / count) < 1e-5
        assert _rel(stats[name].grad_cov, s_g / count) < 1e-5


def test_factors_agree_with_curvlinops_kfac_expand():
    from curvlinops import KFACLinearOperator

    model = MLP()
    data = _mlp_data()
    n = sum(x.shape[0] for x, _ in data)
    weights = [model.fc1.weight, model.fc2.weight, model.fc3.weight]
    kfac = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        weights,
        data,
        fisher_type="empirical",
        kfac_approx="expand",
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    stats = estimate(
        model, [{"x": x, "labels": y} for x, y in data], target_modules=["fc1", "fc2", "fc3"], config=_cfg(data)
    )
    for name in ["fc1", "fc2", "fc3"]:
        # curvlinops: input factor Σxxᵀ/N, gradient factor Σggᵀ for a summed loss; ours: both /N.
        assert _rel(stats[name].input_cov, kfac._input_covariances[name]) < 1e-5
        assert _rel(stats[name].grad_cov, kfac._gradient_covariances[name] / n) < 1e-5


def test_true_fisher_converges_to_exact_expectation_over_the_vocabulary():
    model = tiny_llama(vocab_size=12, hidden=16, layers=1)
    ids = torch.tensor([[3, 5, 7, 2, 9], [4, 4, 8, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    name = "model.layers.0.mlp.down_proj"
    stats = estimate(model, [batch], target_modules=[name], config=_cfg([batch], fisher_type="true", mc_samples=3000))
    # Exact: E[g gᵀ] = Σ_{t'} Σ_c p_{t'}(c) J J ᵀ, J = ∂(−log p_{t'}(c))/∂y (cross terms vanish in expectation).
    module = model.get_submodule(name)
    captured = {}
    h = module.register_forward_hook(lambda m, a, o: captured.update(y=o))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logp = torch.log_softmax(model(inputs_embeds=emb, attention_mask=mask).logits.double(), -1)
    h.remove()
    exact = 0
    for b in range(2):
        for t in range(4):  # position t predicts label t+1
            if labels[b, t + 1] == -100:
                continue
            for c in range(12):
                (g,) = torch.autograd.grad(-logp[b, t, c], captured["y"], retain_graph=True)
                rows = g[mask.bool()].double()
                exact = exact + logp[b, t, c].exp().item() * rows.T @ rows
    exact = exact / int(mask.sum())
    assert _rel(stats[name].grad_cov, exact) < 0.06  # Monte-Carlo noise of 3000 samples in every entry
    trace_ratio = float(stats[name].grad_cov.trace()) / float(exact.trace())
    assert abs(trace_ratio - 1) < 0.02, trace_ratio  # the scale, which averages that noise: a 5 % error fails


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_factors_do_not_depend_on_batch_size(batch_size):
    model = tiny_llama()
    full, split = _batches(n=16, batch_size=16), _batches(n=16, batch_size=batch_size)
    reference = estimate(model, full, target_modules=LAYERS, config=_cfg(full))
    stats = estimate(model, split, target_modules=LAYERS, config=_cfg(split))
    for name in LAYERS:
        assert _rel(stats[name].input_cov, reference[name].input_cov) < 1e-5
        assert _rel(stats[name].grad_cov, reference[name].grad_cov) < 1e-5


def test_layers_reading_the_same_input_share_one_input_cov():
    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.gate_proj"]
    stats = estimate(model, _batches(), target_modules=names, config=_cfg(_batches()))
    assert stats[names[0]].input_cov is stats[names[1]].input_cov
    assert stats[names[0]].input_cov is not stats[names[2]].input_cov


def test_estimate_leaves_the_model_as_it_was():
    model = checkpointing_on(tiny_llama().train())
    model.model.layers[1].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: list(m._forward_hooks) for n, m in model.named_modules()}
    weights = copy.deepcopy(model.state_dict())
    estimate(model, _batches(), target_modules=LAYERS, config=_cfg(_batches()))
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training and all(m.training for m in model.modules())
    assert model.is_gradient_checkpointing
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert hooks == {n: list(m._forward_hooks) for n, m in model.named_modules()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_gradient_checkpointing_stays_on_gives_the_same_statistics_and_holds_one_blocks_inputs(fisher_type, reentrant):
    """Checkpointed blocks stay checkpointed (replayed in the backward, run non-reentrant for the pass): no
    statistic is counted twice, Ḡ pairs each g with the replay's x, so what is held for Ḡ at once is one
    block's inputs instead of the whole batch's; the model's checkpointing setup is left as it was."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = _cfg(_batches(), fisher_type=fisher_type, mc_samples=2 if fisher_type == "true" else 1)
    plain = estimate(tiny_llama(layers=4), _batches(), target_modules=targets, config=config)
    model = tiny_llama(layers=4).train()
    checkpointing_on(model, use_reentrant=reentrant)
    func = model.model.layers[0]._gradient_checkpointing_func
    checkpointed = estimate(model, _batches(), target_modules=targets, config=config)
    assert model.training and model.model.layers[0]._gradient_checkpointing_func is func
    assert plain.keys() == checkpointed.keys() and len(plain) == 28
    for name, s in plain.items():
        assert checkpointed[name].num_tokens == s.num_tokens
        for what in ("input_cov", "grad_cov", "mean_grad"):
            assert _rel(getattr(checkpointed[name], what), getattr(s, what)) < 1e-6, (name, what)
    held, held_plain = int(checkpointed.meta["held_peak_bytes"]), int(plain.meta["held_peak_bytes"])
    assert 0 < held <= held_plain / 3  # 4 blocks: about one block's inputs (+ a gradient) instead of all four


def test_supervised_positions_restrict_the_samples():
    model = tiny_llama()
    batches = _batches()
    stats = estimate(model, batches, target_modules=LAYERS, config=_cfg(batches, positions="supervised"))
    supervised = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert stats[LAYERS[0]].num_tokens == supervised


def test_bf16_model_accumulates_in_fp32():
    """`S_A` of a bf16 model equals Σ x xᵀ / N of its bf16 layer inputs summed in float64, to 1e-4 relative:
    a bf16 accumulation (≈ 4e-3 per product) or a scale error of any size would not pass."""
    model = tiny_llama().to(torch.bfloat16)
    batches, name = _batches(), LAYERS[0]
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    stats = estimate(model, batches, target_modules=[name], config=_cfg(batches))
    hook.remove()
    assert stats[name].input_cov.dtype == stats[name].grad_cov.dtype == torch.float32
    assert len(seen) == len(batches)  # one forward per batch
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches, strict=True)]).double()
    assert _rel(stats[name].input_cov, rows.T @ rows / len(rows)) < 1e-4


def test_position_fraction_subsamples_positions_without_bias():
    """Half the positions, averaged over 4 sampling seeds: the factors' traces match the full pass within
    5 % (seed-to-seed spread here is ±2 % for S_A, ±6 % for S_G), so a 10 % bias in the sampled count or the
    normalization fails."""
    model = tiny_llama()
    batches = _batches(n=16, t=24, batch_size=4)
    full = estimate(model, batches, target_modules=LAYERS, config=_cfg(batches))
    halves = [
        estimate(model, batches, target_modules=LAYERS, config=_cfg(batches, position_fraction=0.5, seed=seed))
        for seed in range(4)
    ]
    for name in LAYERS:
        assert 0.35 < halves[0][name].num_tokens / full[name].num_tokens < 0.65
        for what in ("input_cov", "grad_cov"):
            ratio = (
                sum(float(getattr(h[name], what).trace()) for h in halves)
                / 4
                / float(getattr(full[name], what).trace())
            )
            assert abs(ratio - 1) < 0.05, (name, what, ratio)


def test_stop_tol_stops_reading_batches_once_the_factors_stand_still():
    model = tiny_llama()
    same = _batches(n=4, batch_size=4) * 10  # the same batch again and again: converged after the first
    read = []

    def counted():
        for batch in same:
            read.append(batch)
            yield batch

    stats = estimate(model, counted(), target_modules=LAYERS, config=_cfg(same, stop_tol=1e-4))
    assert stats.num_batches == 4 and len(read) == 4
    varied = _batches(n=40, batch_size=4)
    full = estimate(model, varied, target_modules=LAYERS, config=_cfg(varied, stop_tol=1e-9))
    assert full.num_batches == 10


def _summed_token_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Σ over supervised next-token positions of the cross-entropy (plain torch, not fisher-lora's objective)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mean_gradient_equals_plain_autograd_weight_gradient(checkpointing):
    """Ḡ·N = ∂L/∂W from plain autograd with W trainable (L the summed token loss; padding, -100 prompt labels):
    the statistic the default selector reads, against an oracle that shares no code with the hooks."""
    batches = _batches()
    model = tiny_llama(layers=2).train()
    if checkpointing:
        checkpointing_on(model)
    stats = estimate(model, batches, target_modules=LAYERS, config=_cfg(batches))
    grads = _weight_gradients(_summed_token_loss, batches)
    for name in LAYERS:
        n = stats[name].num_tokens
        assert n == sum(int(b["attention_mask"].sum()) for b in batches)
        assert _rel(stats[name].mean_grad * n, grads[name]) < 1e-5, name


def test_a_loss_that_runs_the_model_twice_pairs_each_gradient_with_its_own_input():
    """Every adapted layer is called twice per batch (a loss over two forwards): Ḡ·N must still be ∂L/∂W from
    plain autograd — each output gradient meets the input of its own call, not the last call's."""
    batches = _batches()

    def twice(model: nn.Module, batch: dict) -> torch.Tensor:
        flipped = {**batch, "input_ids": batch["input_ids"].flip(-1)}
        return _summed_token_loss(model, batch) + 0.5 * _summed_token_loss(model, flipped)

    stats = estimate(tiny_llama(layers=2), batches, target_modules=LAYERS, config=_cfg(batches), loss_fn=twice)
    grads = _weight_gradients(twice, batches)
    for name in LAYERS:
        assert _rel(stats[name].mean_grad * stats[name].num_tokens, grads[name]) < 1e-5, name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_sketched_mean_gradient_is_the_sketch_of_plain_autograds_weight_gradient(checkpointing):
    """Sketched Ḡ (`Y = ḠΩ`, `W = ΨḠ`, solver lowrank) equals the same sketch of ∂L/∂W from plain autograd —
    also for k/v and up, which reuse the projection x·Ω of the layer whose input they read (q, gate)."""
    batches, rank = _batches(), 8
    siblings = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"] + ["model.layers.0.mlp.gate_proj"]
    siblings += ["model.layers.0.mlp.up_proj"]
    model = tiny_llama(layers=2).train()
    if checkpointing:
        checkpointing_on(model)
    config = _cfg(batches, solver="lowrank", sketch_rank=rank)
    stats = estimate(model, batches, target_modules=siblings, config=config)
    grads = _weight_gradients(_summed_token_loss, batches, siblings)
    matrices = SketchMatrices(config.seed, torch.device("cpu"))
    for name in siblings:
        oracle = CrossSketch(*grads[name].shape, rank, matrices)
        oracle.absorb(grads[name])
        want, got = oracle.mean(stats[name].num_tokens), stats[name].mean_grad
        assert _rel(got.left @ got.right, want.left @ want.right) < 1e-4, name


def _weight_gradients(loss_fn, batches: list[dict], layers: list[str] = LAYERS) -> dict[str, torch.Tensor]:
    """The oracle: ∂L/∂W of each of `layers` by plain autograd, only those weights trainable, L summed over
    `batches` (a fresh model with the same seed as the one estimated)."""
    oracle = tiny_llama(layers=2).train()
    modules = dict(oracle.named_modules())
    for p in oracle.parameters():
        p.requires_grad_(False)
    for name in layers:
        modules[name].weight.requires_grad_(True)
    for batch in batches:
        loss_fn(oracle, batch).backward()
    return {name: modules[name].weight.grad for name in layers}
