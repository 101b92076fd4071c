"""Command-line flags shared by the TRL recipes: model, data, LoRA and the Fisher initializer's options."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig

from fisher_core import FisherConfig


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model path or hub id (causal LM with a tokenizer)")
    p.add_argument("--data", required=True, help="a .jsonl/.json/.parquet file, or a hub dataset name")
    p.add_argument("--split", default="train")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 × rank)")
    p.add_argument("--target-modules", default="all-linear", help="comma-separated names, or all-linear")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (bf16 autocast is the default)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-fisher", action="store_true", help="baseline: PEFT's default LoRA init")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    fisher = p.add_argument_group("Fisher initialization (fisher_core.FisherConfig)")
    for name, field in FisherConfig.model_fields.items():
        if name in ("progress", "force"):
            continue
        flag = "--" + ("" if name.startswith("fisher_") else "fisher-") + name.replace("_", "-")
        fisher.add_argument(flag, dest=f"fisher_{name}", default=None, help=field.description)
    fisher.add_argument("--fisher-report", default=None, help="write the InitReport JSON here")
    return p


def load_data(args: argparse.Namespace) -> Dataset:
    for ext, builder in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet")):
        if args.data.endswith(ext):
            return load_dataset(builder, data_files=args.data, split=args.split)
    return load_dataset(args.data, split=args.split)


def lora_config(args: argparse.Namespace) -> LoraConfig:
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    alpha = args.alpha if args.alpha is not None else 2 * args.rank
    return LoraConfig(r=args.rank, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")


def fisher_options(args: argparse.Namespace) -> dict[str, Any]:
    """The FisherConfig keywords given on the command line (pydantic converts and validates the strings)."""
    given = {k.removeprefix("fisher_"): v for k, v in vars(args).items() if k.startswith("fisher_") and v is not None}
    report = given.pop("report", None)
    return {**given, "report_path": report} if report is not None else given


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "output_dir": args.output_dir,
        "learning_rate": args.lr,
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "max_length": args.max_length,
        "bf16": not args.no_bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 200,
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),  # lets the recipes smoke-test on a CPU machine
    }
