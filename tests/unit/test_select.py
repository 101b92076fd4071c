"""Selectors against their closed forms (numpy/scipy in float64) and against PEFT's PiSSA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama

from fisher_core import FisherConfig, FisherStats, LayerStats, select
from fisher_core.select.ranks import allocate_ranks

NAME = "model.layers.0.mlp.down_proj"


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, 3 * d, generator=g)
    return x @ x.T / (3 * d)


def _stats(model, names, identity=False, seed=0) -> FisherStats:
    layers = {}
    for i, name in enumerate(names):
        m, n = model.get_submodule(name).weight.shape
        a = torch.eye(n) if identity else _spd(n, seed + 2 * i)
        g = torch.eye(m) if identity else _spd(m, seed + 2 * i + 1)
        mean_grad = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + i))
        layers[name] = LayerStats(input_cov=a, grad_cov=g, num_tokens=10, mean_grad=mean_grad)
    return FisherStats(layers, fisher_type="empirical", num_batches=1)


def _cfg(**kw) -> FisherConfig:
    """`preserve`: the selector's own factors (under `zero` B is 0 and A's rows are renormalized)."""
    return FisherConfig(progress=False, damping=kw.pop("damping", 0.0), policy=kw.pop("policy", "preserve"), **kw)


def _product(d) -> torch.Tensor:
    """`s·B·A`, what `preserve` moves out of the base."""
    return d.scaling * (d.B @ d.A)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def test_select_keeps_the_triplets_with_largest_fisher_sensitivity():
    model = tiny_llama()
    stats = _stats(model, [NAME])
    d = select(stats, model, rank=4, lora_alpha=8, config=_cfg(selector="select"))[NAME]
    w = _np(model.get_submodule(NAME).weight.detach())
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    kappa = (
        s**2
        * np.einsum("ij,ik,kj->j", u, _np(stats[NAME].grad_cov), u)
        * np.einsum("ji,ik,jk->j", vt, _np(stats[NAME].input_cov), vt)
    )
    top = np.argsort(-kappa)[:4]
    expected = (u[:, top] * s[top]) @ vt[top]
    np.testing.assert_allclose(_np(_product(d)), expected, atol=1e-5)
    np.testing.assert_allclose(_np(d.scores[:4]), kappa[top], rtol=1e-4)


def test_fwsvd_is_the_fisher_norm_optimal_rank_r_part_of_w():
    model = tiny_llama()
    stats = _stats(model, [NAME])
    d = select(stats, model, rank=4, lora_alpha=4, config=_cfg(selector="fwsvd"))[NAME]
    w = _np(model.get_submodule(NAME).weight.detach())
    g_half = np.real(scipy.linalg.sqrtm(_np(stats[NAME].grad_cov)))
    a_half = np.real(scipy.linalg.sqrtm(_np(stats[NAME].input_cov)))
    u, s, vt = np.linalg.svd(g_half @ w @ a_half)
    expected = np.linalg.solve(g_half, (u[:, :4] * s[:4]) @ vt[:4]) @ np.linalg.inv(a_half)
    np.testing.assert_allclose(_np(_product(d)), expected, atol=1e-4)


def test_natural_spans_the_whitened_mean_gradient_directions():
    model = tiny_llama()
    stats = _stats(model, [NAME])
    cfg = _cfg(selector="natural", stable_gamma=4.0)
    d = select(stats, model, rank=3, lora_alpha=3, config=cfg)[NAME]
    g_ih = np.linalg.inv(np.real(scipy.linalg.sqrtm(_np(stats[NAME].grad_cov))))
    a_ih = np.linalg.inv(np.real(scipy.linalg.sqrtm(_np(stats[NAME].input_cov))))
    u, _, vt = np.linalg.svd(g_ih @ _np(stats[NAME].mean_grad) @ a_ih)
    b_dirs, a_dirs = g_ih @ u[:, :3], vt[:3] @ a_ih
    for got, want in zip(_np(d.B).T, b_dirs.T, strict=True):  # each column is ± the closed-form direction
        assert abs(abs(got @ want) / (np.linalg.norm(got) * np.linalg.norm(want)) - 1) < 1e-5
    for got, want in zip(_np(d.A), a_dirs, strict=True):
        assert abs(abs(got @ want) / (np.linalg.norm(got) * np.linalg.norm(want)) - 1) < 1e-5
    norm = d.B.shape[0] ** 0.25 / math.sqrt(4.0)
    np.testing.assert_allclose(_np(d.B.norm(dim=0)), norm, rtol=1e-5)
    np.testing.assert_allclose(_np(d.A.norm(dim=1)), norm, rtol=1e-5)


def _inv_sqrt_damped(s: np.ndarray, damping: float) -> np.ndarray:
    """(S + λ·mean(diag S)·I)^{-1/2}, the damping as documented (FisherConfig.damping)."""
    return np.linalg.inv(np.real(scipy.linalg.sqrtm(s + damping * np.trace(s) / len(s) * np.eye(len(s)))))


def test_natural_damping_is_lambda_times_the_mean_diagonal():
    """λ = 0.5 moves the directions a lot (checked against λ = 0); a damping of another size — λ·max(diag S),
    λ alone, or a 10 % different λ — gives directions off by more than the 1e-4 tolerance."""
    model = tiny_llama()
    stats = _stats(model, [NAME])
    d = select(stats, model, rank=3, lora_alpha=3, config=_cfg(selector="natural", damping=0.5))[NAME]

    def closed_form(damping: float) -> tuple[np.ndarray, np.ndarray]:
        g_ih = _inv_sqrt_damped(_np(stats[NAME].grad_cov), damping)
        a_ih = _inv_sqrt_damped(_np(stats[NAME].input_cov), damping)
        u, _, vt = np.linalg.svd(g_ih @ _np(stats[NAME].mean_grad) @ a_ih)
        return g_ih @ u[:, :3], vt[:3] @ a_ih

    def cosines(got: torch.Tensor, want: np.ndarray) -> np.ndarray:
        got = _np(got)
        return np.abs((got * want).sum(0)) / (np.linalg.norm(got, axis=0) * np.linalg.norm(want, axis=0))

    b_dirs, a_dirs = closed_form(0.5)
    assert np.all(np.abs(cosines(d.B, b_dirs) - 1) < 1e-4) and np.all(np.abs(cosines(d.A.T, a_dirs.T) - 1) < 1e-4)
    for other in (0.0, 0.55):
        b_other, a_other = closed_form(other)
        assert np.abs(cosines(d.B, b_other) - 1).max() > 1e-4 or np.abs(cosines(d.A.T, a_other.T) - 1).max() > 1e-4


def test_exact_max_dim_switches_between_dense_and_sketched_statistics():
    """`solver="auto"`: a layer with max(out, in) ≤ exact_max_dim gets dense factors, a wider one sketches."""
    from fisher_core import estimate
    from fisher_core.estimate.sums import FactorSketch

    model = tiny_llama()
    batches = [{"input_ids": torch.randint(3, 300, (2, 16)), "labels": torch.randint(3, 300, (2, 16))}]
    widths = {name: max(m.weight.shape) for name, m in model.named_modules() if name.endswith(("q_proj", "up_proj"))}
    cut = min(widths.values())  # q_proj (64) stays dense, up_proj (its wider side) is sketched
    assert max(widths.values()) > cut
    cfg = FisherConfig(progress=False, num_batches=1, exact_max_dim=cut, sketch_rank=8)
    stats = estimate(model, batches, target_modules=list(widths), config=cfg)
    for name, width in widths.items():
        sketched = isinstance(stats[name].input_cov, FactorSketch) or isinstance(stats[name].grad_cov, FactorSketch)
        assert sketched == (width > cut), (name, width)


def test_subspace_takes_the_top_eigenvectors_of_both_factors():
    model = tiny_llama()
    stats = _stats(model, [NAME])
    d = select(stats, model, rank=3, lora_alpha=3, config=_cfg(selector="subspace"))[NAME]
    gv, gq = np.linalg.eigh(_np(stats[NAME].grad_cov))
    av, aq = np.linalg.eigh(_np(stats[NAME].input_cov))
    np.testing.assert_allclose(
        np.abs(_np(d.B) / np.linalg.norm(_np(d.B), axis=0)), np.abs(gq[:, ::-1][:, :3]), atol=1e-5
    )
    np.testing.assert_allclose(
        np.abs(_np(d.A) / np.linalg.norm(_np(d.A), axis=1)[:, None]), np.abs(aq[:, ::-1][:, :3].T), atol=1e-5
    )
    np.testing.assert_allclose(_np(d.scores[:3]), gv[::-1][:3] * av[::-1][:3], rtol=1e-5)


@pytest.mark.parametrize("selector", ["select", "fwsvd"])
def test_identity_factors_reproduce_peft_pissa(selector):
    targets = ["q_proj", "down_proj"]
    pissa = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa")
    )
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    names = [n for n in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")]
    base = tiny_llama()
    directions = select(_stats(base, names, identity=True), ours, config=_cfg(selector=selector, damping=1e-3))
    for name in names:
        layer = pissa.base_model.model.get_submodule(name)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        sign = torch.sign((directions[name].A * a).sum(dim=1))  # PEFT fixes no signs
        torch.testing.assert_close(directions[name].A, a * sign[:, None], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(directions[name].B, b * sign, atol=1e-5, rtol=1e-4)


def test_zero_policy_gives_zero_product_and_default_row_norms():
    model = tiny_llama()
    d = select(_stats(model, [NAME]), model, rank=4, config=_cfg(selector="fwsvd", policy="zero"))[NAME]
    assert not d.B.any() and not _product(d).any()
    torch.testing.assert_close(d.A.norm(dim=1), torch.full((4,), 1 / math.sqrt(3)))


def test_signs_are_deterministic_largest_entry_of_each_a_row_positive():
    model = tiny_llama()
    d = select(_stats(model, [NAME]), model, rank=4, config=_cfg(selector="fwsvd"))[NAME]
    idx = d.A.abs().argmax(dim=1)
    assert (d.A.gather(1, idx[:, None]) > 0).all()


def test_rank_allocation_follows_the_pooled_normalized_scores():
    scores = {
        "a": torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0]),  # flat: later components still carry mass
        "b": torch.tensor([100.0, 1.0, 0.5, 0.1, 0.1]),  # concentrated: one component suffices
        "c": torch.tensor([5.0, 4.0, 1.0, 0.0, 0.0]),
    }
    scores = {n: (s, float(s.sum())) for n, s in scores.items()}
    ranks = allocate_ranks(scores, budget=7, caps={"a": 4, "b": 4, "c": 4})
    assert ranks == {"a": 4, "b": 1, "c": 2}
    assert sum(ranks.values()) == 7
    with pytest.raises(ValueError, match="rank_budget"):
        allocate_ranks(scores, budget=2, caps={"a": 4, "b": 4, "c": 4})


def test_rank_budget_emits_rank_and_alpha_patterns_with_constant_scale():
    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    dirs = select(_stats(model, names), model, rank=4, lora_alpha=8, config=_cfg(selector="fwsvd", rank_budget=12))
    assert sum(dirs.rank_pattern.values()) == 12
    assert len(set(dirs.rank_pattern.values())) > 1
    for name, r in dirs.rank_pattern.items():
        assert dirs[name].rank == r
        assert dirs.alpha_pattern[name] / r == pytest.approx(2.0)


def test_rank_above_layer_size_is_refused_with_the_layer_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="down_proj"):
        select(_stats(model, [NAME]), model, rank=40, config=_cfg())


def _decaying(d: int, seed: int) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))[0]
    return (q * 0.7 ** torch.arange(d, dtype=torch.float32)) @ q.T


@pytest.mark.parametrize("selector", ["fwsvd", "natural", "subspace", "select"])
def test_lowrank_solver_matches_exact_on_decaying_spectra(selector):
    """Accurate when the factors' tails beyond the sketch fall below the damping level."""
    model = torch.nn.Sequential(torch.nn.Linear(96, 80, bias=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # pre-trained weights have decaying spectra too; `select` ranks W's top triplets
        u, _, vh = torch.linalg.svd(torch.randn(80, 96, generator=g), full_matrices=False)
        model[0].weight.copy_((u * 0.8 ** torch.arange(80.0)) @ vh)
    stats = FisherStats(
        {"0": LayerStats(_decaying(96, 1), _decaying(80, 2), 10, torch.randn(80, 96, generator=g))},
        fisher_type="empirical",
        num_batches=1,
    )
    exact = select(stats, model, rank=4, config=FisherConfig(selector=selector, solver="exact", policy="preserve"))["0"]
    cfg = FisherConfig(selector=selector, solver="lowrank", sketch_rank=36, policy="preserve")
    low = select(stats, model, rank=4, config=cfg)["0"]
    if selector in ("fwsvd", "select"):
        assert torch.linalg.norm(_product(low) - _product(exact)) / torch.linalg.norm(_product(exact)) < 1e-3
    else:  # nearly the same subspaces (natural's whitened spectrum is flat in the damped tail)
        for x, y in ((low.B, exact.B), (low.A.T, exact.A.T)):
            px, py = x @ torch.linalg.pinv(x), y @ torch.linalg.pinv(y)
            assert torch.linalg.norm(px - py) < (0.25 if selector == "natural" else 1e-2)
    assert low.captured == pytest.approx(exact.captured, rel=1e-2)
