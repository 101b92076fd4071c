"""Bad input gets a clear error; interruptions leave the model as it was (issue: reliability)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from pydantic import ValidationError
from tiny import tiny_llama
from torch import nn

from fisher_core import FisherConfig, FisherStats, LayerStats, apply, estimate, initialize, select
from fisher_core.layers import LayerKind

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(n: int = 4, t: int = 8) -> list[dict]:
    ids = torch.randint(3, 384, (n, t), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def _cfg(**kw) -> FisherConfig:
    return FisherConfig(progress=False, num_batches=kw.pop("num_batches", 1), **kw)


def _peft():
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def _snapshot(model: nn.Module) -> dict:
    return {
        "weights": copy.deepcopy(model.state_dict()),
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert before["weights"].keys() == after["weights"].keys()
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    assert before["flags"] == after["flags"] and before["modes"] == after["modes"] and before["hooks"] == after["hooks"]
    assert all(p.grad is None for p in model.parameters())


def test_empty_batches_name_the_data_source():
    with pytest.raises(ValueError, match="batches yielded nothing"):
        estimate(tiny_llama(), [], target_modules=TARGETS, config=_cfg())


def test_fewer_batches_than_asked_warn_with_the_count_used():
    with pytest.warns(UserWarning, match="only 1 of num_batches=5"):
        estimate(tiny_llama(), _batches(), target_modules=TARGETS, config=_cfg(num_batches=5))


def test_all_labels_ignored_is_an_error_about_supervised_tokens():
    batch = _batches()[0]
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no supervised tokens"):
        estimate(tiny_llama(), [batch], target_modules=TARGETS, config=_cfg())


def test_non_finite_loss_names_the_first_bad_layer_and_writes_nothing():
    model = _peft()
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.up_proj.weight.fill_(float("inf"))
    before = _snapshot(model)
    with pytest.raises(FloatingPointError, match=r"layers\.1\.mlp\.up_proj"):
        initialize(model, _batches(), config=_cfg())
    _assert_unchanged(model, before)


def test_target_matching_nothing_and_unsupported_layers():
    with pytest.raises(ValueError, match="matches no layer"):
        estimate(tiny_llama(), _batches(), target_modules=["qkv"], config=_cfg())
    with pytest.warns(UserWarning, match="embed_tokens"):
        stats = estimate(tiny_llama(), _batches(), target_modules=["embed_tokens", "q_proj"], config=_cfg())
    assert list(stats) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_keyboard_interrupt_mid_estimate_leaves_the_model_exactly_as_before(tmp_path):
    model = _peft()
    before = _snapshot(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj

    def interrupt(*args):
        raise KeyboardInterrupt

    handle = layer.register_forward_hook(interrupt)
    before["hooks"] = {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}
    with pytest.raises(KeyboardInterrupt):
        initialize(model, _batches(), config=_cfg(cache_path=tmp_path / "stats.safetensors"))
    handle.remove()
    before["hooks"] = {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}
    _assert_unchanged(model, before)
    assert list(tmp_path.iterdir()) == []  # no partial cache


def test_keyboard_interrupt_mid_write_undoes_the_layers_already_written(monkeypatch):
    model = _peft()
    before = _snapshot(model)
    original, calls = LayerKind.subtract, []

    def subtract_then_interrupt(self, layer, delta):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        original(self, layer, delta)

    monkeypatch.setattr(LayerKind, "subtract", subtract_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        initialize(model, _batches(), config=_cfg(selector="fwsvd", policy="preserve"))
    monkeypatch.setattr(LayerKind, "subtract", original)
    after = model.state_dict()
    for k, v in before["weights"].items():  # the undo is W − R + R in fp32: equal to rounding
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6)
    assert not any(m.lora_B["default"].weight.any() for m in model.modules() if hasattr(m, "lora_B") and m.lora_B)


def test_two_tokens_of_data_give_finite_directions():
    ids = torch.tensor([[5, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for selector in ["select", "fwsvd", "natural", "subspace"]:
        model = _peft()
        report = initialize(model, [batch], config=_cfg(selector=selector))
        assert all(torch.isfinite(d.A).all() and torch.isfinite(d.B).all() for d in report.directions.values())


def test_meta_device_layers_are_refused_with_what_to_do():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="meta device"):
        estimate(model, _batches(), target_modules=TARGETS, config=_cfg())


def test_bf16_model_keeps_outputs_to_bf16_precision():
    reference = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    batch = _batches()[0]
    initialize(model, [batch], config=_cfg(selector="fwsvd"))
    with torch.no_grad():
        diff = (model(input_ids=batch["input_ids"]).logits - reference(input_ids=batch["input_ids"]).logits).abs()
    assert diff.max() < 0.05


@st.composite
def _factors(draw):
    m, n = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    r = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, n + 2, generator=g), torch.randn(m, m + 2, generator=g)
    scale = draw(st.sampled_from([1e-6, 1.0, 1e4]))
    return m, n, r, seed, scale * x @ x.T, scale * y @ y.T, torch.randn(m, n, generator=g)


@settings(max_examples=40, deadline=None)
@given(_factors(), st.sampled_from(["select", "fwsvd", "natural", "subspace"]), st.sampled_from(["preserve", "zero"]))
def test_selectors_are_finite_with_right_shapes_and_policy_semantics(factors, selector, policy):
    """On a PEFT model: `preserve` leaves `W − s·B·A` in the base (computed here from the written factors, not
    by the writer) and the outputs unchanged; `zero` leaves B = 0 and the base as it was."""
    m, n, r, seed, s_a, s_g, mean_grad = factors
    torch.manual_seed(seed)
    model = get_peft_model(
        nn.Sequential(nn.Linear(n, m, bias=False)), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    w, x = layer.base_layer.weight.detach().clone(), torch.randn(3, n)
    with model.disable_adapter(), torch.no_grad():
        before = model(x)
    stats = FisherStats({"0": LayerStats(s_a, s_g, 10, mean_grad)}, fisher_type="empirical", num_batches=1)
    directions = select(stats, model, config=FisherConfig(selector=selector, policy=policy))
    d = directions["0"]
    assert d.B.shape == (m, r) and d.A.shape == (r, n)
    assert torch.isfinite(d.A).all() and torch.isfinite(d.B).all()
    apply(model, directions)
    b, a = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
    expected = w if policy == "zero" else w - 2.0 * (b.double() @ a.double()).float()  # s = α/r = 2
    assert policy != "zero" or not b.any()
    tol = 1e-5 * max(1.0, float(w.abs().max()), float((b @ a).abs().max()))
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected, rtol=0, atol=tol)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4 * max(1.0, float(before.abs().max())))


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(list(FisherConfig.model_fields)),
        st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=8), st.booleans()),
        max_size=4,
    )
)
def test_junk_config_values_never_construct_an_invalid_config(values):
    try:
        cfg = FisherConfig(**values)
    except ValidationError:
        return
    assert cfg.num_batches >= 1 and cfg.damping >= 0 and cfg.mc_samples >= 1
    assert cfg.selector in {"select", "fwsvd", "natural", "subspace"} and cfg.policy in {"preserve", "zero"}
    assert cfg.rank_budget is None or cfg.rank_budget >= 1
