"""The LoRA-Null baseline (`benchmarks/quality/methods.py`, `lora-null`) against its closed form, computed here
independently in numpy from the layer inputs: per layer, `s·B·A = W P` and base `= W − W P` with `P` the projector
onto the r eigenvectors of smallest eigenvalue of `Σ x xᵀ` over the keep tokens, and the model's outputs
unchanged. A planted swap to the largest eigenvectors, or a base left at W, fails it."""

from __future__ import annotations

import copy

import numpy as np
import torch


def test_lora_null_projects_w_onto_the_keep_inputs_least_used_directions():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from benchmarks.quality.methods import build_adapter
    from benchmarks.quality.output_scale import layer_inputs
    from benchmarks.tiny_models import llama_config

    torch.manual_seed(0)
    config = llama_config(64, hidden=16, layers=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0  # padding never counts
    keep = [{"input_ids": torch.randint(0, 64, (3, 12)), "attention_mask": mask} for _ in range(2)]
    with torch.no_grad():
        before = [model(**b).logits for b in keep]
    lora = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "down_proj"]}
    twin = get_peft_model(copy.deepcopy(model), LoraConfig(**lora))  # Kaiming A, B = 0: the base's inputs
    inputs = layer_inputs(twin, keep)  # the independent record of each layer's keep inputs
    adapted = build_adapter("lora-null", model, keep, lora=lora).model

    with torch.no_grad():
        after = [adapted(**b).logits for b in keep]
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    for name, module in adapted.named_modules():
        if name not in inputs:
            continue
        x = inputs[name].double().numpy()
        _, vectors = np.linalg.eigh(x.T @ x)
        projector = vectors[:, :2] @ vectors[:, :2].T
        w = original[name.removeprefix("base_model.model.") + ".weight"].double().numpy()
        a, b = (module.lora_A["default"].weight.detach().double(), module.lora_B["default"].weight.detach().double())
        delta = (module.scaling["default"] * b @ a).numpy()
        np.testing.assert_allclose(delta, w @ projector, atol=1e-5)
        np.testing.assert_allclose(
            module.get_base_layer().weight.detach().double().numpy(), w - w @ projector, atol=1e-5
        )
        np.testing.assert_allclose(a.numpy() @ projector, a.numpy(), atol=1e-6)  # A's rows span U_K
