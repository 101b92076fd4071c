"""Tiny CPU SFT or DPO run with a Fisher-initialized LoRA adapter (what the tests run; seconds on a laptop).

    python recipes/tiny/trl_tiny.py --task sft --model DIR --output-dir OUT [--num-batches 2] [--policy zero]
    python recipes/tiny/trl_tiny.py --task dpo --model DIR --output-dir OUT

`--model` is a small causal LM directory with a tokenizer (the tests use the tiny Llama of
`tests/tiny.py`); the data is the shipped `recipes/tiny/data/sft.jsonl` (prompt/completion) or
`dpo.jsonl` (prompt/chosen/rejected). The default policy `zero` leaves the base untouched (for DPO the
reference is the adapter-disabled model, which `preserve` would move: see docs/trl.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from fisher_trl import FisherInitCallback

DATA = Path(__file__).parent / "data"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = {"sft": (SFTTrainer, SFTConfig, "sft.jsonl"), "dpo": (DPOTrainer, DPOConfig, "dpo.jsonl")}


def build(
    task: str,
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    fisher: dict[str, Any] | None = None,
    rank: int = 4,
    steps: int = 2,
    batch_size: int = 4,
    save_steps: int | None = None,
    ref_model: Any = None,
    data_file: str | None = None,
    **training: Any,
) -> tuple[Trainer, FisherInitCallback | None]:
    """An SFT or DPO trainer on the tiny data; with `fisher` (FisherConfig keywords) a callback is attached.
    `ref_model` (DPO only) is a separate reference model; `data_file` another file of `data/` (e.g. `chat.jsonl`,
    conversational `messages` rows for SFT)."""
    trainer_cls, config_cls, default_data = TASKS[task]
    data_file = data_file or default_data
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(DATA / data_file), split="train")
    args = config_cls(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=training.pop("learning_rate", 1e-3),
        max_length=64,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=training.pop("use_cpu", True),
        disable_tqdm=True,
        **training,
    )
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    extra = {"ref_model": ref_model} if ref_model is not None else {}
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, **extra
    )
    callback = FisherInitCallback(**fisher).attach(trainer) if fisher is not None else None
    return trainer, callback


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="sft")
    parser.add_argument("--model", required=True, help="causal LM directory with a tokenizer")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-batches", type=int, default=2)
    parser.add_argument("--selector", default="natural")
    parser.add_argument("--fisher-type", default="empirical")
    parser.add_argument("--policy", default=None, help="zero (default) or preserve")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    fisher = {"num_batches": args.num_batches, "selector": args.selector, "fisher_type": args.fisher_type}
    if args.policy is not None:
        fisher["policy"] = args.policy
    trainer, _ = build(args.task, args.model, args.output_dir, fisher={**fisher, "progress": False}, steps=args.steps)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
