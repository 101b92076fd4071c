"""How large the default Fisher A's output `A x` is next to PEFT's default (Kaiming) A's, per layer kind.

    python -m benchmarks.quality.output_scale            # SmolLM2-135M-Instruct, 16 rows of smol-dialogue

Both adapters are built on the same model and read the same inputs (the rows' layer inputs, recorded by forward
hooks); the ratio `Σ‖A_fisher x‖² / Σ‖A_kaiming x‖²` is printed per layer kind (median, min, max over layers), for
`zero_scale="row"` (the default) and `"activation"` (which makes it ≈ 1 in expectation over Kaiming draws).
"""

from __future__ import annotations

import argparse
import statistics

import torch


def layer_inputs(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Every LoRA layer's input rows at the non-padding positions of `batches` (a plain no-grad forward with
    forward hooks; padding never reaches a real token's output)."""
    seen: dict[str, list[torch.Tensor]] = {}
    mask: list[torch.Tensor] = []

    def record(name: str, x: torch.Tensor) -> None:
        seen.setdefault(name, []).append(x.detach()[mask[0].bool()])

    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: record(n, args[0]))
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    ]
    with torch.no_grad():
        for batch in batches:
            mask[:] = [batch["attention_mask"]]
            model(**batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def ratios(zero_scale: str, rows: int) -> dict[str, list[float]]:
    """Per layer kind (q_proj, …): the output-energy ratio of the Fisher A to PEFT's default A on each layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fisher_core
    from benchmarks.quality.completions import collate, encode
    from benchmarks.quality.smol import rendered, task_rows
    from benchmarks.smollm2 import smollm2_dir

    torch.manual_seed(0)
    base = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = rendered(tokenizer, task_rows("smol-dialogue", (rows, 4, 4))["train"])
    encoded = [encode(tokenizer, r["prompt"], r["completion"]) for r in data]
    batches = [collate(encoded[i : i + 4], tokenizer.pad_token_id) for i in range(0, rows, 4)]
    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    kaiming = {n: m.lora_A["default"].weight.detach().clone() for n, m in layers.items()}
    inputs = layer_inputs(model, batches)
    config = fisher_core.FisherConfig(zero_scale=zero_scale, num_batches=len(batches), stop_tol=None, progress=False)
    fisher_core.initialize(model, batches, config=config)
    out: dict[str, list[float]] = {}
    for name, module in layers.items():
        x, a = inputs[name], module.lora_A["default"].weight.detach()
        ratio = (x @ a.T).pow(2).sum() / (x @ kaiming[name].T).pow(2).sum()
        out.setdefault(name.rsplit(".", 1)[-1], []).append(float(ratio))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="smol-dialogue training rows (batches of 4)")
    args = parser.parse_args(argv)
    for zero_scale in ("row", "activation"):
        print(f"zero_scale={zero_scale}: Σ‖A_fisher x‖² / Σ‖A_kaiming x‖² per layer (median, min, max)")
        for kind, values in ratios(zero_scale, args.rows).items():
            print(f"  {kind:>9}  {statistics.median(values):.4f}  {min(values):.4f}  {max(values):.4f}")


if __name__ == "__main__":
    main()
