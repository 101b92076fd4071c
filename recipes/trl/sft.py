"""SFT with a Fisher-initialized LoRA adapter (TRL SFTTrainer; GPU; `torchrun` for several GPUs).

    python recipes/trl/sft.py --model Qwen/Qwen2.5-0.5B --data data.jsonl --output-dir out/sft \\
        --rank 16 --fisher-num-batches 32 --fisher-selector natural

Data: prompt/completion, messages, or text rows (whatever SFTTrainer reads). Every FisherConfig field
is a `--fisher-*` flag. The final `out/sft` adapter loads with plain PEFT on the original model (under
`--fisher-policy preserve` the model is handed back on the original base when training ends; each
`checkpoint-N/` keeps the raw adapter and its base offsets for resuming).
"""

from __future__ import annotations

import logging

import fisher_args
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from fisher_trl import FisherInitCallback


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = fisher_args.parser(__doc__).parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**fisher_args.training_options(args)),
        train_dataset=fisher_args.load_data(args),
        processing_class=tokenizer,
        peft_config=fisher_args.lora_config(args),
    )
    if not args.no_fisher:
        FisherInitCallback(**fisher_args.fisher_options(args)).attach(trainer)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model()


if __name__ == "__main__":
    main()
