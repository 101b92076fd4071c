"""Independent reference computations for the tests: explicit loops, one sequence at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def brute_force_factors(
    model: nn.Module, batches: list[dict], layer_names: list[str], causal: bool = True
) -> dict[str, tuple[Tensor, Tensor]]:
    """S_A, S_G per layer by explicit per-sequence autograd and per-position outer products.

    Each sequence is run alone; L is the sum of its supervised token losses; g_t = ∂L/∂y_t is read
    with `retain_grad` on the layer output; positions with attention_mask 0 are skipped.
    """
    modules = dict(model.named_modules())
    sums = {n: [None, None] for n in layer_names}
    count = 0
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][i : i + 1]
            mask = batch["attention_mask"][i : i + 1]
            labels = batch["labels"][i : i + 1]
            inputs, outputs = {}, {}

            def keep(name, inputs=inputs, outputs=outputs):
                def hook(mod, args, out):
                    inputs[name] = args[0].detach()
                    out.retain_grad()
                    outputs[name] = out

                return hook

            handles = [modules[n].register_forward_hook(keep(n)) for n in layer_names]
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, attention_mask=mask).logits.double()
            for h in handles:
                h.remove()
            lg, lb = (logits[:, :-1], labels[:, 1:]) if causal else (logits, labels)
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="sum")
            loss.backward()
            for t in range(ids.shape[1]):
                if mask[0, t] == 0:
                    continue
                for n in layer_names:
                    x = inputs[n][0, t].double()
                    g = outputs[n].grad[0, t].double()
                    a, gg = torch.outer(x, x), torch.outer(g, g)
                    sums[n][0] = a if sums[n][0] is None else sums[n][0] + a
                    sums[n][1] = gg if sums[n][1] is None else sums[n][1] + gg
            count += int(mask.sum())
            model.zero_grad(set_to_none=True)
    return {n: (a / count, g / count) for n, (a, g) in sums.items()}
