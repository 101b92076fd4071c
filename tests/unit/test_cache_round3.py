"""The statistics cache (round 3): what the fingerprint covers, and cache files that are not valid caches."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import tiny_llama

from fisher_core import FisherConfig, estimate
from fisher_core.estimate.cache import CacheMismatchError, fingerprint

LAYERS = ["q_proj", "v_proj"]


def _batches() -> list[dict]:
    ids = torch.randint(3, 384, (4, 10), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "labels": ids}]


def _cfg(path) -> FisherConfig:
    return FisherConfig(progress=False, num_batches=1, cache_path=path)


def _other_fine_tune(part: str):
    """The same q/v weights as `tiny_llama()`, another MLP, norm or head (another fine-tune of the base)."""
    model = tiny_llama()
    with torch.no_grad():
        if part == "mlp":
            model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        elif part == "norm":
            model.model.layers[0].post_attention_layernorm.weight.add_(0.25)
        else:
            model.lm_head.weight.add_(1e-3 * torch.randn_like(model.lm_head.weight))
    return model


@pytest.mark.parametrize("part", ["mlp", "norm", "lm_head"])
def test_cache_from_a_model_with_other_weights_outside_the_targets_is_refused(tmp_path, part):
    cfg = _cfg(tmp_path / "stats.safetensors")
    estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=cfg)
    model = _other_fine_tune(part)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, tiny_llama().model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(CacheMismatchError, match="other model weights"):
        estimate(model, _batches(), target_modules=LAYERS, config=cfg)


def test_fingerprint_sees_one_changed_element_and_a_swap_of_two(tmp_path):
    model = tiny_llama()
    reference = fingerprint(model)
    weight = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(1.0))  # one ulp
        one_ulp = fingerprint(model)
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(-1.0))
        assert fingerprint(model) == reference
        weight[[0, 1]] = weight[[1, 0]]  # two rows swapped: every sum of the weights is the same
    assert len({reference, one_ulp, fingerprint(model)}) == 3


def test_fingerprint_of_a_100m_parameter_tensor_takes_seconds_not_minutes():
    big = torch.nn.Linear(10_000, 10_000, bias=False)
    started = time.perf_counter()
    fingerprint(big)
    assert time.perf_counter() - started < 30


def _rewrite(path, tensors=None, **meta) -> None:
    """Rewrite a cache file with some tensors or metadata replaced (a valid safetensors file)."""
    with safe_open(path, framework="pt") as f:
        old_meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors(old) if tensors else old, path, metadata={**old_meta, **meta})


def _without(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _replaced(key, fn):
    return lambda t: {**t, key: fn(t[key])}


GRAD = "model.layers.0.self_attn.q_proj/grad_cov"
CASES = {
    "bad metadata": ({"layers": "{not json"}, None),
    "no layers metadata": ({"layers": "{}"}, None),
    "missing tensor": ({}, _without(GRAD)),
    "wrong shape": ({}, _replaced(GRAD, lambda g: g[:3, :3].contiguous())),
    "not a matrix": ({}, _replaced(GRAD, lambda g: g.reshape(-1).contiguous())),
    "nan": ({}, _replaced(GRAD, lambda g: g.clone().fill_(float("nan")))),
    "inf": ({}, _replaced(GRAD, lambda g: g.clone().fill_(float("inf")))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_cache_file_that_is_no_valid_cache_is_refused_naming_it(tmp_path, case):
    path = tmp_path / "stats.safetensors"
    estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=_cfg(path))
    meta, tensors = CASES[case]
    _rewrite(path, tensors, **meta)
    with pytest.raises(CacheMismatchError, match=f"statistics cache {path} .*delete it to recompute"):
        estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=_cfg(path))


def test_a_directory_as_cache_path_is_refused_naming_it(tmp_path):
    with pytest.raises(CacheMismatchError, match=f"statistics cache {tmp_path} is a directory"):
        estimate(tiny_llama(), _batches(), target_modules=LAYERS, config=_cfg(tmp_path))
