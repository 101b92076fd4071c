"""DPO with a Fisher-initialized LoRA adapter (TRL DPOTrainer; GPU; `torchrun` for several GPUs).

    python recipes/trl/dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl --output-dir out/dpo \\
        --rank 16 --fisher-num-batches 32 --beta 0.1

Data: prompt/chosen/rejected rows. The statistics are those of the DPO loss (summed over pairs), or
with `--fisher-type true` of the policy's own next-token distribution on the completions.
The reference is the adapter-disabled model, which the default policy `zero` leaves as it is;
`--precompute-ref` computes reference log-probs before training, which allows `--fisher-policy preserve`.
"""

from __future__ import annotations

import logging

import fisher_args
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from fisher_trl import FisherInitCallback


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = fisher_args.parser(__doc__)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--precompute-ref", action="store_true", help="reference log-probs before training")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    config = DPOConfig(
        **fisher_args.training_options(args), beta=args.beta, precompute_ref_log_probs=args.precompute_ref
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
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
