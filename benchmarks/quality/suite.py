"""The quality suite, one command: does Fisher init beat PEFT's inits at the same budget?

    python -m benchmarks.quality.suite                      # CPU preset (2 cores, < ~60 min)
    python -m benchmarks.quality.suite --preset gpu         # the larger version (one GPU)
    python -m benchmarks.quality.suite --stages screen seeds # a subset of stages

Stages (each appends its runs to `results/<preset>/<stage>.json` as they finish, so an interrupted
suite keeps what it measured; a rerun skips runs already recorded):
- `screen`   encoder classification (MiniLM-L6, "which Shakespeare play?"), one seed, every method:
             PEFT's lora/gaussian/pissa/olora/eva/corda/lora_ga/mica and the four Fisher selectors
             (empirical, preserve); then the best selector with `true` Fisher and with policy `zero`.
- `seeds`    more seeds for default LoRA, the best Fisher config and the best other PEFT init.
- `lr`       default LoRA and the best Fisher config (over the `seeds` stage if it ran) at lr/2 and
             2·lr (each at its own best of 3), default LoRA also at 4·lr; then the other selectors at lr/4.
- `calib`    the best Fisher config with 1, 4 and 16 calibration batches (8 is the screen's), one seed;
             damping 1e-2 and 1e-1 (1e-3 is the screen's) on every seed.
- `sft`      causal-LM SFT (TRL SFTTrainer) of a tiny Llama pre-trained on comedies, tuned on tragedies.
- `dpo`      DPO on the same model (chosen = the real next speech, rejected = a random other speech).
Then `results/<preset>/tables.md` and the loss-curve PNGs are (re)written from everything recorded.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.quality import tables
from fisher_core import FisherConfig

RESULTS = Path(__file__).parent / "results"
PEFT_METHODS = ("lora", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga", "mica")
SELECTORS = ("natural", "subspace", "select", "fwsvd")
SCREEN_DAMPING = 1e-3  # the damping every stage uses unless it varies it (labels show other values)
STAGES = ("screen", "seeds", "lr", "calib", "sft", "dpo")


@dataclass(frozen=True)
class Preset:
    """Sizes of every stage. `cpu` fits a shared 2-core machine; `gpu` is the larger version."""

    device: str = "cpu"
    enc_steps: int = 60
    enc_batch: int = 16
    enc_max_length: int = 32
    enc_test_per_play: int = 32
    enc_lr: float = 2e-3
    enc_head_warmup: int = 10
    enc_train_per_play: int = 160
    enc_min_words: int = 12
    eval_at: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
    calibration: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    calib_sweep: tuple[int, ...] = (1, 4, 16)
    damping_sweep: tuple[float, ...] = (1e-2, 1e-1)
    lm_steps: int = 200
    lm_lr: float = 3e-3
    lm_seeds: tuple[int, ...] = (0, 1, 2)
    dpo_seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int = 600
    lm_train: int = 800
    lm_test: int = 96
    lm_only: tuple[str, ...] = ()  # run only these LM labels (empty: every planned method)


PRESETS = {
    "cpu": Preset(),
    # the smoke test's size (tests/test_quality_suite.py): seconds, not evidence
    "tiny": Preset(
        enc_steps=2,
        enc_batch=4,
        enc_test_per_play=2,
        enc_head_warmup=1,
        enc_train_per_play=8,
        enc_min_words=4,
        eval_at=(0.0, 1.0),
        calibration=1,
        seeds=(0,),
        calib_sweep=(),
        damping_sweep=(),
        lm_steps=2,
        lm_seeds=(0,),
        dpo_seeds=(0,),
        pretrain_steps=5,
        lm_train=48,
        lm_test=16,
        lm_only=("lora", "fisher-natural", "fisher-natural-zero"),
    ),
    "gpu": Preset(
        device="cuda",
        enc_steps=300,
        enc_batch=16,
        enc_max_length=64,
        enc_test_per_play=48,
        calibration=16,
        seeds=(0, 1, 2, 3, 4),
        calib_sweep=(1, 4, 64),
        lm_steps=400,
        lm_seeds=(0, 1, 2),
        dpo_seeds=(0, 1, 2),
    ),
}


def fisher_label(config: FisherConfig) -> str:
    """`fisher-<selector>`, plus `-true` / `-zero` / `-cN` where they differ from the screen's baseline."""
    label = f"fisher-{config.selector}"
    if config.fisher_type == "true":
        label += "-true"
    if config.policy == "zero":
        label += "-zero"
    if config.damping != SCREEN_DAMPING:
        label += f"-d{config.damping:g}"
    return label


class Encoder:
    """The encoder classification task at one preset: data loaded once, one call per run."""

    def __init__(self, preset: Preset, out: Path) -> None:
        from benchmarks.quality.encoder import encode
        from benchmarks.quality.shakespeare import play_task, texts_dir

        self.preset = preset
        self.task = play_task(
            train_per_play=preset.enc_train_per_play,
            test_per_play=preset.enc_test_per_play,
            min_words=preset.enc_min_words,
            texts=texts_dir(),
        )
        self.train, self.test = encode(self.task, max_length=preset.enc_max_length)
        self.out = out

    def run(self, stage: str, method: str, *, seed: int = 0, lr: float | None = None, **fisher: object) -> dict:
        """One run, recorded in `<stage>.json`; an identical run already recorded there or in the screen is reused."""
        from benchmarks.quality.runner import RunSpec, run

        p = self.preset
        options = {"num_batches": p.calibration, "damping": SCREEN_DAMPING, "progress": False, **fisher}
        config = FisherConfig(**options) if method == "fisher" else None
        label = fisher_label(config) if config else method
        if config and config.num_batches != p.calibration:
            label += f"-c{config.num_batches}"
        lr = lr or p.enc_lr
        path = self.out / f"{stage}.json"
        for source in (path, self.out / "screen.json", self.out / "seeds.json"):  # earlier stages' runs count
            for r in tables.load(source):
                if (r["label"], r["seed"], r["lr"]) == (label, seed, lr):
                    if source != path:
                        tables.append(path, r)
                    return r
        spec = RunSpec(
            method=method,
            seed=seed,
            lr=lr,
            steps=p.enc_steps,
            batch_size=p.enc_batch,
            calibration_batches=config.num_batches if config else p.calibration,
            head_warmup=p.enc_head_warmup,
            eval_at=p.eval_at,
            fisher=config,
            device=p.device,
        )
        started = time.perf_counter()
        result = run(spec, self.train, self.test, self.task.num_labels)
        record = {
            "task": "encoder",
            "label": label,
            "method": method,
            "seed": seed,
            "lr": lr,
            "steps": p.enc_steps,
            "fisher": config.model_dump(mode="json", include={"selector", "fisher_type", "policy", "num_batches"})
            if config
            else None,
            "curve": [{"step": c.step, "test_loss": c.test_loss, "accuracy": c.test_accuracy} for c in result.curve],
            "init_seconds": result.init_seconds,
            "init_peak_mib": result.init_peak_mib,
            "wall_seconds": time.perf_counter() - started,
        }
        tables.append(path, record)
        final = result.final
        print(
            f"[{stage}] {label:>22} seed {seed} lr {lr:g}: final test loss {final.test_loss:.4f} "
            f"acc {final.test_accuracy:.3f}  init {result.init_seconds:.1f}s  run {record['wall_seconds']:.0f}s",
            flush=True,
        )
        return record


def score(records: list[dict]) -> float:
    """Lower is better: mean test loss at 25 %, 50 % and 100 % of training (early and final quality)."""
    return statistics.mean(tables.at_fraction(r, f, "test_loss") for r in records for f in (0.25, 0.5, 1.0))


def best(records: list[dict], prefix: str, exclude: tuple[str, ...] = (), fallback: str = "fisher-natural") -> str:
    """The label starting with `prefix` (not in `exclude`) with the lowest `score`; `fallback` if none ran."""
    groups = {k: v for k, v in tables.by_label(records).items() if k.startswith(prefix) and k not in exclude}
    return min(groups, key=lambda k: score(groups[k])) if groups else fallback


def fisher_kwargs(label: str) -> dict:
    """FisherConfig fields from a label made by `fisher_label` (`-cN` suffixes are not parsed)."""
    parts = label.split("-")
    return {
        "selector": parts[1],
        "fisher_type": "true" if "true" in parts else "empirical",
        "policy": "zero" if "zero" in parts else "preserve",
    }


def encoder_stages(preset: Preset, out: Path, stages: list[str]) -> None:
    enc = Encoder(preset, out)
    seed0 = preset.seeds[0]
    if "screen" in stages:  # ours first, so a cut-short run still has the comparison that decides the default
        enc.run("screen", "lora", seed=seed0)
        for selector in SELECTORS:
            enc.run("screen", "fisher", seed=seed0, selector=selector)
        top = best(tables.load(out / "screen.json"), "fisher-")
        enc.run("screen", "fisher", seed=seed0, **{**fisher_kwargs(top), "fisher_type": "true"})
        enc.run("screen", "fisher", seed=seed0, **{**fisher_kwargs(top), "policy": "zero"})
        for method in PEFT_METHODS[1:]:
            try:
                enc.run("screen", method, seed=seed0)
            except Exception as e:  # a PEFT init that does not run on this model is reported, not fatal
                print(f"[screen] {method} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    screen = tables.load(out / "screen.json")
    top = best(screen, "fisher-")
    others = ("lora", *[k for k in tables.by_label(screen) if k.startswith("fisher-")])
    rival = best(screen, "", exclude=others, fallback="pissa")
    print(f"best Fisher config on the screen: {top}; best other PEFT init: {rival}", flush=True)
    if "seeds" in stages:
        for seed in preset.seeds:
            for label in ("lora", top, rival, *(f"fisher-{s}" for s in SELECTORS)):
                if label.startswith("fisher-"):
                    enc.run("seeds", "fisher", seed=seed, **fisher_kwargs(label))
                else:
                    enc.run("seeds", label, seed=seed)
    seeded = [r for r in tables.load(out / "seeds.json") if r["label"].startswith("fisher-")]
    if seeded:  # several seeds outrank the screen's one
        top = best(seeded, "fisher-")
        print(f"best Fisher config over {len(preset.seeds)} seeds: {top}", flush=True)
    if "lr" in stages:
        for lr in (preset.enc_lr / 2, preset.enc_lr, preset.enc_lr * 2):
            enc.run("lr", "lora", seed=seed0, lr=lr)
            enc.run("lr", "fisher", seed=seed0, lr=lr, **fisher_kwargs(top))
        enc.run("lr", "lora", seed=seed0, lr=preset.enc_lr * 4)  # default LoRA's best was at the grid's edge
    if "calib" in stages:
        for n in (*preset.calib_sweep, preset.calibration):
            enc.run("calib", "fisher", seed=seed0, num_batches=n, **fisher_kwargs(top))
        for seed in preset.seeds:
            enc.run("calib", "fisher", seed=seed, **fisher_kwargs(top))
            for damping in preset.damping_sweep:
                enc.run("calib", "fisher", seed=seed, damping=damping, **fisher_kwargs(top))
    if "lr" in stages:
        for selector in SELECTORS:  # does a selector that lost at the shared lr win at a smaller one?
            if f"fisher-{selector}" != top:
                enc.run("lr", "fisher", seed=seed0, lr=preset.enc_lr / 4, selector=selector)


def write_tables(out: Path, enc_lr: float = PRESETS["cpu"].enc_lr) -> None:
    """`tables.md` and the curve PNGs from every results file in `out` (`enc_lr`: the lr of the lr table's baseline)."""
    from benchmarks.quality import plots

    sections = []
    for stage, metric, higher in (
        ("screen", "accuracy", True),
        ("seeds", "accuracy", True),
        ("lr", "accuracy", True),
        ("calib", "accuracy", True),
        ("sft", "token_accuracy", True),
        ("dpo", "reward_accuracy", True),
    ):
        records = tables.load(out / f"{stage}.json")
        if not records:
            continue
        if stage == "lr":  # one row per (method, lr)
            records = [{**r, "label": f"{r['label']} lr={r['lr']:g}"} for r in records]
        baseline = f"lora lr={enc_lr:g}" if stage == "lr" else "lora"
        sections.append(f"### {stage}\n\n{tables.table(records, metric, higher, baseline)}\n")
        plots.curves(records, out / f"{stage}.png", title=f"{stage}: test loss", metric="test_loss")
    (out / "tables.md").write_text("\n".join(sections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/quality/results/<preset>)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = args.out or RESULTS / args.preset
    out.mkdir(parents=True, exist_ok=True)
    _quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    encoder = [s for s in args.stages if s in ("screen", "seeds", "lr", "calib")]
    if encoder:
        encoder_stages(preset, out, encoder)
    if "sft" in args.stages or "dpo" in args.stages:
        from benchmarks.quality import lm

        lm.stages(preset, out, [s for s in args.stages if s in ("sft", "dpo")])
    write_tables(out, preset.enc_lr)
    print(f"suite done in {time.perf_counter() - started:.0f}s; tables in {out / 'tables.md'}", flush=True)
    return 0


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "trl", "fisher_core", "fisher_trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
