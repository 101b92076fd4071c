"""`zero_scale='activation'`: under policy `zero`, A's Fisher directions get the output scale of PEFT's default A.

Oracle: the layer inputs recorded by plain forward hooks (not fisher-lora's), and the expectation of ‖A x‖² under
PEFT's Kaiming-uniform A (entries of variance 1/(3n)): E‖A x‖² = r·E‖x‖²/(3n)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama

from fisher_core import FisherConfig, initialize
from fisher_core.select.linalg import DEFAULT_ROW_NORM

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 384, (2, 12), generator=g) for _ in range(n)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def _initialized(zero_scale: str, batches: list[dict]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The PEFT model after `initialize`, and every adapted layer's inputs (rows) seen by a plain forward hook."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    seen: dict[str, list[torch.Tensor]] = {}
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: seen.setdefault(n, []).append(args[0].detach()))
        for n, m in layers.items()
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    config = FisherConfig(zero_scale=zero_scale, num_batches=len(batches), stop_tol=None, progress=False)
    initialize(model, batches, config=config)
    return model, {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for n, xs in seen.items()}


def test_activation_scale_gives_a_the_output_scale_of_peft_default_a():
    batches = _batches()
    model, inputs = _initialized("activation", batches)
    row, _ = _initialized("row", batches)
    rows = dict(row.named_modules())
    for name, module in model.named_modules():
        if name not in inputs:
            continue
        a, x = module.lora_A["default"].weight.detach().double(), inputs[name].double()
        r, n = a.shape
        kaiming = r * x.pow(2).sum(1).mean() / (3 * n)  # E‖A x‖² of A with entries of variance 1/(3n)
        torch.testing.assert_close((x @ a.T).pow(2).sum(1).mean(), kaiming, rtol=1e-4, atol=0)
        a_row = rows[name].lora_A["default"].weight.detach().double()
        torch.testing.assert_close(a_row.norm(dim=1), torch.full((r,), DEFAULT_ROW_NORM, dtype=a.dtype))
        ratio = a / a_row  # the same directions, one scalar per layer
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-5, atol=0)
        assert float(module.lora_B["default"].weight.detach().abs().max()) == 0.0


def test_a_sketched_input_factor_gives_the_scale_of_the_dense_one():
    """Wide layers keep `S_A` as a sketch: the scale must count the A energy outside the sketch's top-k (the Fisher
    A leans on the low-variance directions), as `select.spectral` models that complement."""
    from fisher_core.estimate.sums import FactorSketch
    from fisher_core.select.linalg import activation_matched

    g = torch.Generator().manual_seed(0)
    n, k, r = 256, 32, 8
    # an LLM-like input spectrum: a few massive outlier dimensions over a slowly decaying bulk
    scales = torch.cat([torch.full((4,), 30.0), torch.logspace(0, -0.5, n - 4)])
    x = torch.randn(4096, n, generator=g) * scales
    s_a = x.T @ x / x.shape[0]
    _, vecs = torch.linalg.eigh(s_a)
    a = vecs[:, : 4 * r].T[torch.randperm(4 * r, generator=g)[:r]] / 3**0.5  # rows in the low-variance tail
    omega = torch.randn(n, k, generator=g)
    sketch = FactorSketch(omega=omega, y=s_a @ omega, trace=float(s_a.diagonal().sum()))
    tail = float(activation_matched(a, sketch).norm() / activation_matched(a, s_a).norm())
    # the complement's mean stands in for the tail's own eigenvalues: within 2× for rows in the tail (0.51 here;
    # without the complement 5.3×), exact in expectation for rows spread over the spectrum
    assert 0.5 <= tail <= 2.0
    spread = torch.randn(r, n, generator=g)
    ratio = float(activation_matched(spread, sketch).norm() / activation_matched(spread, s_a).norm())
    assert ratio == pytest.approx(1.0, rel=0.05)
