"""Config validation and the statistics cache."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny import tiny_llama

from fisher_core import FisherConfig, estimate
from fisher_core.estimate.cache import CacheMismatchError

LAYERS = ["q_proj", "down_proj"]


def _batches() -> list[dict]:
    ids = torch.randint(3, 384, (4, 10), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("selector", "pissa"),
        ("fisher_type", "exact"),
        ("num_batches", 0),
        ("damping", -1.0),
        ("policy", "keep"),
        ("rank_budget", 0),
    ],
)
def test_invalid_values_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        FisherConfig(**{field: value})


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="num_batch"):
        FisherConfig(num_batch=3)


def test_mc_samples_needs_true_fisher():
    with pytest.raises(ValidationError, match="fisher_type='true'"):
        FisherConfig(mc_samples=4)


def test_matching_cache_is_reused_without_any_forward_pass(tmp_path):
    cfg = FisherConfig(progress=False, num_batches=1, cache_path=tmp_path / "stats.safetensors")
    model = tiny_llama()
    first = estimate(model, _batches(), target_modules=LAYERS, config=cfg)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    second = estimate(model, _batches(), target_modules=LAYERS, config=cfg)
    assert not calls
    for name in first:
        assert torch.equal(first[name].input_cov, second[name].input_cov)
        assert torch.equal(first[name].grad_cov, second[name].grad_cov)
        assert torch.equal(first[name].mean_grad, second[name].mean_grad)
    assert second["model.layers.0.self_attn.q_proj"].num_tokens == 40


def test_cache_from_other_weights_targets_or_settings_is_refused(tmp_path):
    path = tmp_path / "stats.safetensors"
    cfg = FisherConfig(progress=False, num_batches=1, cache_path=path)
    estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg)
    with pytest.raises(CacheMismatchError, match="other model weights"):
        estimate(tiny_llama(seed=1), _batches(), target_modules=LAYERS, config=cfg)
    with pytest.raises(CacheMismatchError, match="targets"):
        estimate(tiny_llama(), _batches(), target_modules=["q_proj"], config=cfg)
    with pytest.raises(CacheMismatchError, match="fisher_type"):
        estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg.model_copy(update={"fisher_type": "true"}))
    for setting in ({"solver": "lowrank"}, {"exact_max_dim": 8}):  # sketched statistics where dense ones were cached
        with pytest.raises(CacheMismatchError, match=next(iter(setting))):
            estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg.model_copy(update=setting))


def test_cache_sees_an_active_adapters_weights_but_not_a_disabled_ones(tmp_path):
    """Statistics of a model whose (trained) adapter is on depend on its factors; with the adapter disabled
    (a fresh one, as `initialize` runs the pass) they do not, and a new random A must not miss the cache."""
    from peft import LoraConfig, get_peft_model

    cfg = FisherConfig(progress=False, num_batches=1, cache_path=tmp_path / "stats.safetensors")
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "up_proj", "down_proj"]))
    layers = {name: m for name, m in model.named_modules() if name.endswith(tuple(LAYERS)) and hasattr(m, "lora_A")}
    with model.disable_adapter():
        estimate(model, _batches(), target_modules=layers, config=cfg)
        with torch.no_grad():
            for m in layers.values():
                m.lora_A["default"].weight.normal_()
        estimate(model, _batches(), target_modules=layers, config=cfg)  # reused: the adapter is off
    with torch.no_grad():
        for m in layers.values():
            m.lora_B["default"].weight.normal_()  # "trained"
    with pytest.raises(CacheMismatchError, match="other model weights"):
        estimate(model, _batches(), target_modules=layers, config=cfg)


def test_truncated_cache_is_refused(tmp_path):
    path = tmp_path / "stats.safetensors"
    cfg = FisherConfig(progress=False, num_batches=1, cache_path=path)
    estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CacheMismatchError, match="unreadable"):
        estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg)


def test_cache_from_other_data_is_refused(tmp_path):
    cfg = FisherConfig(progress=False, num_batches=1, cache_path=tmp_path / "stats.safetensors")
    estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg)
    other = _batches()
    other[0]["input_ids"] = other[0]["input_ids"].flip(1)
    with pytest.raises(CacheMismatchError, match="data"):
        estimate(tiny_llama(), other, target_modules=LAYERS, config=cfg)


def _two_batches(later_seed: int) -> list[dict]:
    first = _batches()[0]
    ids = torch.randint(3, 384, (4, 10), generator=torch.Generator().manual_seed(later_seed))
    return [first, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def test_cache_sees_every_batch_not_only_the_first(tmp_path):
    cfg = FisherConfig(progress=False, num_batches=2, stop_tol=None, cache_path=tmp_path / "stats.safetensors")
    estimate(tiny_llama(), _two_batches(1), target_modules=LAYERS, config=cfg)
    with pytest.raises(CacheMismatchError, match="data"):
        estimate(tiny_llama(), _two_batches(2), target_modules=LAYERS, config=cfg)


def test_cache_from_another_loss_fn_is_refused(tmp_path):
    cfg = FisherConfig(progress=False, num_batches=1, cache_path=tmp_path / "stats.safetensors")
    estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg)

    def half_loss(model, batch):
        return 0.5 * model(**batch).loss * batch["input_ids"].numel()

    with pytest.raises(CacheMismatchError, match="data"):
        estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg, loss_fn=half_loss)


def test_tuple_batches_are_refused_with_what_to_change():
    ids = _batches()[0]["input_ids"]
    with pytest.raises(TypeError, match=r"batches must be dicts for model\(\*\*batch\)"):
        estimate(tiny_llama(), [(ids, ids)], target_modules=LAYERS, config=FisherConfig(progress=False, num_batches=1))
