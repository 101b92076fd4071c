"""Issue 28 (round 3): where `preserve` keeps the step-0 model and where it cannot (LoRA dropout, bf16)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama

from fisher_core import FisherConfig, initialize

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _batch() -> dict:
    ids = torch.randint(3, 384, (4, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _cfg(**kw) -> FisherConfig:
    return FisherConfig(progress=False, num_batches=1, **kw)


def _never_read():
    raise AssertionError("the batches were read: the refusal came after the pass")
    yield


def test_preserve_with_lora_dropout_is_refused_before_the_pass():
    """The cause: with `preserve` the base is W − s·B·A and in training the adapter adds s·B·A·dropout(x), so the
    training-mode loss at step 0 is not the original model's (shown here on PEFT's own forward); refused in
    one line before any batch is read, the model untouched."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_dropout=0\.1.*set lora_dropout=0 or use policy='zero'"):
        initialize(model, _never_read(), config=_cfg(policy="preserve"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_preserve_is_exact_without_lora_dropout_and_not_with_it():
    """Why the refusal above: after `preserve` (dropout 0) the training-mode loss equals the original model's;
    the same adapter with PEFT's dropout on the LoRA branch moves it (the base lost s·B·A·x, the branch adds
    s·B·A·dropout(x))."""
    batch = _batch()
    with torch.no_grad():
        want = float(tiny_llama().train()(**batch).loss)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    initialize(model, [batch], config=_cfg(policy="preserve"))
    model.train()
    with torch.no_grad():
        assert abs(float(model(**batch).loss) - want) < 1e-5
        for module in model.modules():
            if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
                module.lora_dropout["default"] = torch.nn.Dropout(0.1)
        torch.manual_seed(0)
        assert abs(float(model(**batch).loss) - want) > 1e-4


def test_preserve_under_bf16_autocast_keeps_the_loss_to_bf16_precision_only():
    """Under bf16 autocast (TRL's `bf16=True` on a fp32 model) every matmul rounds its operands to bf16, so
    `W·x` and `(W − s·B·A)·x + s·B·(A·x)` round differently: the step-0 outputs agree to bf16 precision (no
    farther from the original's than a few times autocast's own error against fp32), not exactly. Without
    autocast they agree to fp32 rounding; `zero` (B = 0) is exact under either."""
    batch = _batch()
    reference = tiny_llama()
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    initialize(model, [batch], config=_cfg(policy="preserve"))
    with torch.no_grad():
        fp32 = reference(**batch)
        assert (model(**batch).logits - fp32.logits).abs().max() < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            original, preserved = reference(**batch), model(**batch)
    own_error = (original.logits.float() - fp32.logits).abs().max()
    moved = (preserved.logits.float() - original.logits.float()).abs().max()
    assert 0 < moved <= 4 * own_error
    assert abs(float(preserved.loss) - float(original.loss)) < 2**-8 * float(original.loss)


def _half_ulp_bf16(t: torch.Tensor) -> torch.Tensor:
    """Half the bf16 spacing at each element of `t` (8 significand bits): the most round-to-nearest can move it."""
    _, exponent = torch.frexp(t.float())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float32), exponent - 9)


def test_bf16_preserve_writes_the_rounded_residual_of_the_stored_factors():
    """bf16 with `preserve`, where `W − s·B·A` is really written (under `zero` the base is untouched): each
    base element is `W − s·B·A` (B, A as stored in bf16, product in fp32) rounded once to bf16 — off by at
    most half a bf16 step — and the model's outputs stay to bf16 precision."""
    reference = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    originals = {n: m.base_layer.weight.detach().float().clone() for n, m in model.named_modules() if n.endswith("proj")
                 and hasattr(m, "base_layer")}  # fmt: skip
    batch = _batch()
    initialize(model, [batch], config=_cfg(policy="preserve"))
    modules = dict(model.named_modules())
    for name, w in originals.items():
        module = modules[name]
        b, a = module.lora_B["default"].weight.float(), module.lora_A["default"].weight.float()
        assert b.abs().max() > 0, name  # the adapter starts nonzero: the base was written
        written = module.base_layer.weight.detach()
        residual = w - module.scaling["default"] * (b @ a)
        assert ((written.float() - residual).abs() <= _half_ulp_bf16(written) * (1 + 1e-3) + 1e-30).all(), name
    with torch.no_grad():
        diff = (model(input_ids=batch["input_ids"]).logits - reference(input_ids=batch["input_ids"]).logits).abs()
    assert diff.max() < 0.05
