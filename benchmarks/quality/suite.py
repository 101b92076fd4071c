"""The quality suite, one command: does Fisher init beat PEFT's inits at the same budget?

    python -m benchmarks.quality.suite                      # CPU preset (2 processes on 2 cores, ~60 min)
    python -m benchmarks.quality.suite --preset gpu         # the larger version (one GPU)
    python -m benchmarks.quality.suite --stages screen seeds # a subset of stages

Stages (each appends its runs to `results/<preset>/<stage>.json` as they finish, so an interrupted
suite keeps what it measured; a rerun skips runs already recorded):
- `screen`   encoder classification (MiniLM-L6, "which Shakespeare play?"), one seed, every method:
             PEFT's lora/gaussian/pissa/olora/eva/corda/lora_ga/mica and the four Fisher selectors
             (empirical, preserve); then the best selector with `true` Fisher and with policy `zero`.
- `seeds`    more seeds for default LoRA, the best Fisher config and the best other PEFT init.
- `lr`       every method that ran on the screen at lr/2, lr and 2·lr on one seed (extended by halving or
             doubling while the best sits at the edge), then at its own best lr on every seed (the
             "tuned lr" table); the selectors that lost at the shared lr at lr/4.
- `calib`    the best Fisher config on every seed with 1, 4, 8, 16 and 64 calibration batches, damping
             1e-2 and 1e-1 (1e-3 is the screen's), and early stopping (`stop_tol` 0.3/0.2/0.1, at most
             32 batches).
- `ablate`   the best Fisher config on every seed with sketched statistics (`solver="lowrank"`, k = 128
             and 32), under a `memory_budget` of LoRA-GA's memory and of 0.3× that, with rank allocation
             (`rank_budget` = the uniform total), with a quarter of the positions, and with `stable_gamma`
             4 and 64.
- `sft`      causal-LM SFT (TRL SFTTrainer) of a tiny Llama pre-trained on comedies, tuned on tragedies.
- `dpo`      DPO on the same model (chosen = the real next speech, rejected = its words shuffled).
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
STAGES = ("screen", "seeds", "lr", "calib", "ablate", "sft", "dpo")


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
    enc_rank: int = 8
    calib_sweep: tuple[int, ...] = (1, 4, 16, 64)
    damping_sweep: tuple[float, ...] = (1e-2, 1e-1)
    stop_sweep: tuple[float, ...] = (0.3, 0.2, 0.1)  # `stop_tol` values tried, reading at most `stop_max` batches
    stop_max: int = 32
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
        stop_sweep=(),
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
        stop_max=64,
        lm_steps=400,
        lm_seeds=(0, 1, 2),
        dpo_seeds=(0, 1, 2),
    ),
}


# The Fisher config every label is relative to: the screen's (the library default of 2026-11-28, pinned here so
# that a later change of `FisherConfig`'s defaults cannot relabel recorded runs). `num_batches` comes from the preset.
BASELINE = {
    "selector": "natural",
    "fisher_type": "empirical",
    "policy": "preserve",
    "damping": SCREEN_DAMPING,
    "stop_tol": None,
    "solver": "auto",
    "sketch_rank": None,
    "rank_budget": None,
    "position_fraction": 1.0,
    "stable_gamma": 16.0,
    "positions": "attention",
    "memory_budget": None,
}
# the library's default calibration since 2026-11-28 (session 2): up to 32 batches, stopping once converged
DEFAULT_STOP = {"num_batches": 32, "stop_tol": 0.2}
# label tags of the fields that vary: `-<tag><value>` where a run differs from BASELINE
TAGS = {
    "damping": "d",
    "solver": "",
    "sketch_rank": "k",
    "rank_budget": "rb",
    "stop_tol": "stop",
    "position_fraction": "pf",
    "stable_gamma": "g",
    "positions": "pos-",
    "memory_budget": "mb",
}


def fisher_config(**fields: object) -> FisherConfig:
    """`BASELINE` with `fields` (`num_batches` among them) over it, no progress bar."""
    return FisherConfig(**{**BASELINE, "progress": False, **fields})


def fisher_label(config: FisherConfig) -> str:
    """`fisher-<selector>`, plus `-true` / `-zero` / `-<tag><value>` where it differs from `BASELINE`."""
    label = f"fisher-{config.selector}"
    if config.fisher_type == "true":
        label += "-true"
    if config.policy == "zero":
        label += "-zero"
    for name, tag in TAGS.items():
        value = getattr(config, name)
        if value != BASELINE[name]:
            if name == "memory_budget" and isinstance(value, int):
                value = f"{value / 1e6:.3g}M"  # bytes, in MB
            label += f"-{tag}{value:g}" if isinstance(value, (int, float)) else f"-{tag}{value}"
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

    @property
    def adapted_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every linear layer the LoRA config adapts."""
        from benchmarks.quality.encoder import load_classifier
        from benchmarks.quality.methods import BERT_TARGETS
        from fisher_core.layers import base_layer, find_targets, layer_kind

        targets = find_targets(load_classifier(self.task.num_labels, 0), list(BERT_TARGETS))
        return [layer_kind(m).shape(base_layer(m)) for m in targets.values()]

    @property
    def lora_ga_bytes(self) -> int:
        """What PEFT's LoRA-GA holds above the floor: fp32 gradients of the adapted weights."""
        return sum(4 * m * n for m, n in self.adapted_shapes)

    def run_label(self, stage: str, label: str, *, seed: int, lr: float) -> dict:
        """`run` for a label of the tables: a PEFT method, or a Fisher config made by `fisher_label`."""
        if label.startswith("fisher-"):
            return self.run(stage, "fisher", seed=seed, lr=lr, **fisher_kwargs(label))
        return self.run(stage, label, seed=seed, lr=lr)

    def run(self, stage: str, method: str, *, seed: int = 0, lr: float | None = None, **fisher: object) -> dict:
        """One run, recorded in `<stage>.json`; an identical run already recorded there or in the screen is reused."""
        from benchmarks.quality.runner import RunSpec, run

        p = self.preset
        config = fisher_config(**{"num_batches": p.calibration, **fisher}) if method == "fisher" else None
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
            rank=p.enc_rank,
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
            "fisher": config.model_dump(mode="json", exclude={"cache_path", "progress", "force"}) if config else None,
            "init_batches": result.init_batches,
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
    if "lr" in stages:  # every method at its own best lr: tuned on seed 0, then run on every seed
        ran = tables.by_label(screen)
        for label in ("lora", top, *(m for m in PEFT_METHODS[1:] if m in ran)):
            lr = tune_lr(enc, label, seed0)
            for seed in preset.seeds[1:]:
                enc.run_label("lr", label, seed=seed, lr=lr)
        for selector in SELECTORS:  # does a selector that lost at the shared lr win at a smaller one?
            if f"fisher-{selector}" != top:
                enc.run("lr", "fisher", seed=seed0, lr=preset.enc_lr / 4, selector=selector)
    if "calib" in stages:
        for seed in preset.seeds:
            for n in sorted({*preset.calib_sweep, preset.calibration}):
                enc.run("calib", "fisher", seed=seed, num_batches=n, **fisher_kwargs(top))
            for damping in preset.damping_sweep:
                enc.run("calib", "fisher", seed=seed, damping=damping, **fisher_kwargs(top))
            for tol in preset.stop_sweep:  # early stopping: at most `stop_max` batches
                enc.run("calib", "fisher", seed=seed, num_batches=preset.stop_max, stop_tol=tol, **fisher_kwargs(top))
    if "ablate" in stages:
        for seed in preset.seeds:
            for fields in (
                {"solver": "lowrank"},  # every statistic a rank-128 sketch (the scale path)
                {"solver": "lowrank", "sketch_rank": 32},  # a cheap sketch
                {"rank_budget": preset.enc_rank * len(enc.adapted_shapes)},  # same total, allocated by Fisher mass
                # LoRA-GA's memory, and 0.3× that: at d = 384 a rank-128 sketch is hardly smaller than the dense
                # factor, so these budgets need k = 8r and 2r (what the planner now picks by itself; set here so
                # the recorded labels stay)
                {"memory_budget": enc.lora_ga_bytes, "sketch_rank": 8 * preset.enc_rank},
                {"memory_budget": int(0.3 * enc.lora_ga_bytes), "sketch_rank": 2 * preset.enc_rank},
                {"position_fraction": 0.25},  # statistics from a quarter of the positions
                {"stable_gamma": 4.0},  # larger data-scaled factors (γ: LoRA-GA's scale knob)
                {"stable_gamma": 64.0},  # smaller ones
            ):
                enc.run("ablate", "fisher", seed=seed, **{**fisher_kwargs(top), **fields})


def tune_lr(enc: Encoder, label: str, seed: int, extend: int = 2) -> float:
    """`label`'s best lr on `seed` (lowest `score`) over lr/2, lr, 2·lr, extended by halving or doubling
    (at most `extend` times) while the best sits at the grid's edge."""
    base = enc.preset.enc_lr
    scores = {lr: score([enc.run_label("lr", label, seed=seed, lr=lr)]) for lr in (base / 2, base, base * 2)}
    for _ in range(extend):
        top = min(scores, key=scores.get)
        if top not in (min(scores), max(scores)):
            break
        nxt = top / 2 if top == min(scores) else top * 2
        scores[nxt] = score([enc.run_label("lr", label, seed=seed, lr=nxt)])
    return min(scores, key=scores.get)


def tuned(records: list[dict], seed: int = 0) -> list[dict]:
    """The `lr` stage's records of each label at the lr that scored best on `seed`, labelled `label @ lr`."""
    out = []
    for label, runs in tables.by_label(records).items():
        on_seed = [r for r in runs if r["seed"] == seed]
        if not on_seed:
            continue
        lr = min(on_seed, key=lambda r: score([r]))["lr"]
        out += [{**r, "label": f"{label} @ {lr:g}"} for r in runs if r["lr"] == lr]
    return out


def write_tables(out: Path, enc_lr: float = PRESETS["cpu"].enc_lr) -> None:
    """`tables.md` and the curve PNGs from every results file in `out` (`enc_lr`: the lr of the lr table's baseline)."""
    from benchmarks.quality import plots

    sections = []
    for stage, metric, higher in (
        ("screen", "accuracy", True),
        ("seeds", "accuracy", True),
        ("lr", "accuracy", True),
        ("calib", "accuracy", True),
        ("ablate", "accuracy", True),
        ("sft", "token_accuracy", True),
        ("dpo", "reward_accuracy", True),
    ):
        records = tables.load(out / f"{stage}.json")
        if not records:
            continue
        if stage == "lr":  # one row per (method, lr), then each method at its best lr on every seed
            best_lr = tuned(records)
            records = [{**r, "label": f"{r['label']} lr={r['lr']:g}"} for r in records]
            baseline = f"lora lr={enc_lr:g}"
            lora_tuned = next((r["label"] for r in best_lr if r["label"].startswith("lora @")), "lora")
            sections.append(f"### tuned lr\n\n{tables.table(best_lr, metric, higher, lora_tuned)}\n")
        else:
            baseline = "lora"
        sections.append(f"### {stage}\n\n{tables.table(records, metric, higher, baseline)}\n")
        plots.curves(records, out / f"{stage}.png", title=f"{stage}: test loss", metric="test_loss")
    (out / "tables.md").write_text("\n".join(sections))


# Stages that may run side by side (`--jobs 2`): each phase's two groups in two processes, phases in order.
PHASES = ((("screen", "seeds"), ("sft", "dpo")), (("lr",), ("calib", "ablate")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/quality/results/<preset>)")
    parser.add_argument("--jobs", type=int, default=2, help="processes running independent stages side by side")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per process (default: cores / jobs)"
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = args.out or RESULTS / args.preset
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()
    if args.jobs > 1:
        for phase in PHASES:
            groups = [[s for s in group if s in args.stages] for group in phase]
            _side_by_side(args.preset, out, threads, [g for g in groups if g])
    else:
        _quiet()
        torch.set_num_threads(threads)
        run_stages(preset, out, args.stages)
    write_tables(out, preset.enc_lr)
    print(f"suite done in {time.perf_counter() - started:.0f}s; tables in {out / 'tables.md'}", flush=True)
    return 0


def run_stages(preset: Preset, out: Path, stages: list[str]) -> None:
    """The given stages, in order, in this process."""
    encoder = [s for s in stages if s in ("screen", "seeds", "lr", "calib", "ablate")]
    if encoder:
        encoder_stages(preset, out, encoder)
    if "sft" in stages or "dpo" in stages:
        lm_stages(preset, out, [s for s in stages if s in ("sft", "dpo")])


def lm_stages(preset: Preset, out: Path, which: list[str]) -> None:
    """The `sft` and `dpo` stages (`lm.py`) at `preset` sizes; records go to `<stage>.json` in `out`."""
    from benchmarks.quality import lm

    base = lm.base_model(steps=preset.pretrain_steps)
    train, test = lm.dialogue(n_train=preset.lm_train, n_test=preset.lm_test)
    plans = {
        "sft": [(m, None) for m in PEFT_METHODS]
        + [("fisher", {"selector": s}) for s in SELECTORS]
        + [("fisher", {"selector": "natural", "fisher_type": "true"})]
        + [
            ("fisher", {"selector": "natural", **DEFAULT_STOP}),
            ("fisher", {"selector": "natural", "solver": "lowrank"}),
            ("fisher", {"selector": "natural", "positions": "supervised"}),  # statistics from completions only
        ],
        # DPO's reference is the adapter-disabled model: only inits that leave the base alone (docs/trl.md)
        "dpo": [("lora", None), ("eva", None)]
        + [("fisher", {"selector": s, "policy": "zero"}) for s in ("natural", "subspace")]
        + [("fisher", {"selector": "natural", "policy": "zero", **DEFAULT_STOP})],
    }
    for stage in which:
        path = out / f"{stage}.json"
        for seed in preset.lm_seeds if stage == "sft" else preset.dpo_seeds:
            for method, fields in plans[stage]:
                spec = _lm_run(stage, method, fields, seed, preset)
                if preset.lm_only and spec.label not in preset.lm_only:
                    continue
                if any((r["label"], r["seed"]) == (spec.label, seed) for r in tables.load(path)):
                    continue
                try:
                    record = lm.run_lm(spec, base, train, test)
                except Exception as e:  # a PEFT init that does not run on this model is reported, not fatal
                    print(f"[{stage}] {spec.label} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                tables.append(path, record)
                last = record["curve"][-1]
                print(
                    f"[{stage}] {spec.label:>22} seed {seed}: "
                    + "  ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step")
                    + f"  init {record['init_seconds']:.1f}s  run {record['wall_seconds']:.0f}s",
                    flush=True,
                )


def _lm_run(stage: str, method: str, fields: dict | None, seed: int, preset: Preset):
    """The `lm.LMRun` of one plan entry: a PEFT init by name, or `fisher` with its whole config and label."""
    from benchmarks.quality.lm import LMRun

    common = dict(steps=preset.lm_steps, lr=preset.lm_lr, calibration=preset.calibration, device=preset.device)
    if method != "fisher":
        return LMRun(stage, method, method, seed, **common)
    config = fisher_config(**{"num_batches": preset.calibration, **(fields or {})})
    suffix = f"-c{config.num_batches}" if config.num_batches != preset.calibration else ""
    return LMRun(stage, method, fisher_label(config) + suffix, seed, fisher=config.model_dump(), **common)


def _side_by_side(preset: str, out: Path, threads: int, groups: list[list[str]]) -> None:
    """Run each group of stages in its own `--jobs 1` process, all at once; fail if any fails."""
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.quality.suite",
                "--preset",
                preset,
                "--stages",
                *group,
                "--out",
                str(out),
                "--jobs",
                "1",
                "--threads",
                str(threads),
            ],
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        for group in groups
    ]
    failed = [" ".join(g) for g, p in zip(groups, procs, strict=True) if p.wait() != 0]
    if failed:
        raise SystemExit(f"quality stages failed: {failed}")


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "trl", "fisher_core", "fisher_trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
