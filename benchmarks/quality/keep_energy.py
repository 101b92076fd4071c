"""Where each init's A looks: its share of the input energy of the task and of what should be kept, per layer kind.

    python -m benchmarks.quality.keep_energy            # SmolLM2-135M-Instruct, smol-dialogue

Under policy `zero` (B = 0) an adapter changes a layer's output on input x only through `A x`, so the input
energy A picks up on data the model should keep bounds what tuning can change there. For a set D of layer inputs
with second moment `S_D` (non-padding positions, recorded by forward hooks on the untouched base, not by
fisher_core) and an A with r rows of n:

    κ_D(A) = (tr(A S_D Aᵀ) / ‖A‖²_F) / (tr(S_D) / n)

is the energy A captures relative to a direction-blind A (κ = 1 in expectation for PEFT's Kaiming A). Printed per
layer kind (median over the 30 blocks) for PEFT's LoRA, the default and `keep_knowledge`, on: the task's held-out
test rows, the keep data `keep_knowledge` reads (the model's own answers to the 32 shipped instructions), and the
two forgetting probes of the smol protocol (own answers to 16 other instructions, general text). `keep/task`
below is κ on the own-answer probe over κ on the task: < 1 means A reaches the task's inputs more than the
inputs whose behaviour is probed.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.quality.output_scale import layer_inputs

INITS = ("lora", "fisher-zero", "fisher-keep")


def second_moments(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """`S_D = Xᵀ X / N` of every LoRA layer's inputs over the non-padding positions of `batches`."""
    return {name: x.T @ x / x.shape[0] for name, x in layer_inputs(model, batches).items()}


def captured(a: torch.Tensor, s: torch.Tensor) -> float:
    """κ_D(A) = (tr(A S Aᵀ)/‖A‖²_F) / (tr(S)/n)."""
    return float(((a @ s) * a).sum() / a.pow(2).sum() / (s.diagonal().sum() / s.shape[0]))


def _batches(tokenizer, pairs: list[tuple[list[int], list[int]]]) -> list[dict]:
    """(ids, labels) pairs collated 4 at a time."""
    from benchmarks.quality.completions import collate

    return [collate(pairs[i : i + 4], tokenizer.pad_token_id) for i in range(0, len(pairs), 4)]


def _row_batches(tokenizer, rows: list[dict]) -> list[dict]:
    """Rendered `{prompt, completion}` rows as batches of 4, the prompt unlabelled."""
    from benchmarks.quality.completions import encode

    return _batches(tokenizer, [encode(tokenizer, r["prompt"], r["completion"]) for r in rows])


def input_sets(tokenizer, model, rows: int) -> dict[str, list[dict]]:
    """The batches of each input set: task test rows, keep data, the own-answer and general-text probes."""
    from benchmarks.quality.smol import general_texts, own_answers, rendered, task_rows
    from fisher_core.keep.answers import instructions, own_answer_batches, prompt_ids

    test = rendered(tokenizer, task_rows("smol-dialogue", (4, 4, rows))["test"])
    text = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in general_texts()]
    keep = own_answer_batches(model, tokenizer, [prompt_ids(tokenizer, i) for i in instructions()])
    return {
        "task": _row_batches(tokenizer, test),
        "keep data": [{k: b[k] for k in ("input_ids", "attention_mask")} for b in keep],
        "own answers": _row_batches(tokenizer, own_answers()),
        "general text": _batches(tokenizer, [(ids, ids) for ids in text]),
    }


def init_a(init: str, base, calibration: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Each LoRA layer's A after `init` on a fresh r = 8 all-linear adapter (seed 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import fisher_core

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16,
                           target_modules="all-linear"))  # fmt: skip
    if init != "lora":
        config = fisher_core.FisherConfig(keep_knowledge=init == "fisher-keep", num_batches=len(calibration),
                                          stop_tol=None, progress=False)  # fmt: skip
        fisher_core.initialize(model, calibration, config=config, tokenizer=tokenizer)
    return {n: m.lora_A["default"].weight.detach().clone() for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}  # fmt: skip


def table(rows: int, calibration_rows: int) -> dict[str, dict[str, dict[str, float]]]:
    """{init: {input set: {layer kind: median κ}}} on SmolLM2 and the smol-dialogue task."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.quality.smol import rendered, task_rows
    from benchmarks.smollm2 import smollm2_dir

    base = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    calibration = _row_batches(
        tokenizer, rendered(tokenizer, task_rows("smol-dialogue", (calibration_rows, 4, 4))["train"])
    )
    probe = get_peft_model(AutoModelForCausalLM.from_pretrained(base).eval(), LoraConfig(r=8,
                           target_modules="all-linear"))  # B = 0: its layer inputs are the base's  # fmt: skip
    moments = {name: second_moments(probe, b) for name, b in input_sets(tokenizer, probe, rows).items()}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for init in INITS:
        a = init_a(init, base, calibration, tokenizer)
        for name, s in moments.items():
            kinds: dict[str, list[float]] = {}
            for layer, s_layer in s.items():
                kinds.setdefault(layer.rsplit(".", 1)[-1], []).append(captured(a[layer], s_layer))
            out.setdefault(init, {})[name] = {k: statistics.median(v) for k, v in kinds.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="held-out task rows (the smol test split's size)")
    parser.add_argument("--calibration-rows", type=int, default=32, help="training rows the inits read (8 × 4)")
    args = parser.parse_args(argv)
    result = table(args.rows, args.calibration_rows)
    sets = list(next(iter(result.values())))
    kinds = list(result["lora"][sets[0]])
    print("| init | layer | " + " | ".join(f"κ {s}" for s in sets) + " | keep/task |")
    print("|---|---|" + "---|" * (len(sets) + 1))
    for init, by_set in result.items():
        for kind in kinds:
            values = [by_set[s][kind] for s in sets]
            ratio = by_set["own answers"][kind] / by_set["task"][kind]
            print(f"| {init} | {kind} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {ratio:.2f} |")


if __name__ == "__main__":
    main()
