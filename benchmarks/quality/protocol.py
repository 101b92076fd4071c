"""The quality protocol, one command: does an init make fine-tuning better on tasks it was not tuned on?

    python -m benchmarks.quality.protocol                     # CPU preset, 2 worker processes
    python -m benchmarks.quality.protocol --preset gpu        # the larger version (one GPU)
    python -m benchmarks.quality.protocol --preset smol       # SmolLM2-135M-Instruct, chat tasks, forgetting (smol.py)
    python -m benchmarks.quality.protocol --preset smol-long  # 5× the steps, at the lrs `smol` chose
    python -m benchmarks.quality.protocol --tables-only       # rewrite the tables from what is recorded

Every method runs the same recipe on each of the four encoder tasks of `tasks.py` (MiniLM-L6, r = 8,
AdamW with warm-up and linear decay, the same 16 calibration batches for every data-driven init):
1. `grid`   seed 0 at every lr of `lr_grid`; a method whose best lr sits at an edge of what it ran gets
            the next lr beyond it (×2 or ×½), until its best lr is bracketed;
   With `lr_on_mean` (the `smol` preset) every seed runs at every lr and the lr is chosen on the mean over
   seeds; `first` names tiers of methods whose grid runs before every other's, tier by tier;
2. `seeds`  the remaining seeds at each method's own best lr;
3. `ablate` each Fisher variant of `VARIANTS` (whitening off, calibration size, sketched statistics, true
            Fisher, another selector) on every seed at `fisher`'s (policy preserve) best lr: which
            ingredient carries it;
4. `robust` the remaining seeds at 0.5×, 1× and 2× default LoRA's best lr (the lr-robustness table: the
            lr a user copies from a LoRA recipe).
A run's quality is read at its best validation checkpoint (validation-based stopping, the test split is
never used to choose) and at the end; the curve gives 10/25/50/75/100 % of the steps.

Runs append to `results/<preset>/protocol.jsonl` as they finish (a line per run, under a file lock, so
workers share one file and an interrupted protocol resumes where it stopped); `tables.md` and a plot
are written from that file.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# causal.py's tiny-Llama tasks and smol.py's SmolLM2 chat tasks; the others are tasks.py's encoder tasks
CAUSAL_TASKS = ("sft-tragedy", "dpo-tragedy", "smol-dialogue", "smol-docstring", "smol-docstring-dpo")
CHAT_TASKS = ("smol-dialogue", "smol-docstring", "smol-docstring-dpo")  # a chat model: the default keeps its answers
# Fisher variants by method name: `FisherConfig` fields (and calibration batches). `fisher` is the natural
# selector with policy `preserve` (the default until this protocol's robustness table chose `zero`);
# `fisher-zero` (the library default) keeps its A directions at default LoRA's scale, B = 0: subspace
# without scale; `fisher-random` (methods.py) is `fisher`'s scale without its subspace (random directions,
# the same norms). The others are the ablation of `fisher` (`ablations` of a preset), run at its own best
# lr on every seed.
PRESERVE = {"policy": "preserve"}
VARIANTS: dict[str, dict] = {
    "fisher": PRESERVE,
    "fisher-zero": {"policy": "zero"},
    # A's output scale matched to PEFT's default A (E‖A x‖²) instead of its row norm: the smol ablation of the
    # copied-lr gap (at the row norm, SmolLM2's attention layers get E‖A x‖² of 1–7 % of Kaiming A's)
    "fisher-zero-act": {"policy": "zero", "zero_scale": "activation"},
    # learn the task, keep what the model knew (issue 27): keep data = the model's own answers by default
    "fisher-keep": {"policy": "zero", "keep_knowledge": True},
    "fisher-random": PRESERVE,
    "fisher-nowhiten": {**PRESERVE, "damping": 1e6},  # S + λ·mean(diag S)·I, λ huge: no whitening (LoRA-GA-like)
    "fisher-all16": {**PRESERVE, "stop_tol": None},  # every calibration batch, no early stop
    "fisher-c4": {**PRESERVE, "stop_tol": None, "num_batches": 4},
    "fisher-lowrank": {**PRESERVE, "solver": "lowrank"},  # every statistic a rank-128 sketch (auto's choice > 2048)
    "fisher-true": {**PRESERVE, "fisher_type": "true"},
    "fisher-select": {**PRESERVE, "selector": "select"},  # W's singular directions scored by Fisher (seed paper)
    "fisher-fwsvd": {**PRESERVE, "selector": "fwsvd"},
    "fisher-subspace": {**PRESERVE, "selector": "subspace"},
}


@dataclass(frozen=True)
class Preset:
    """Sizes of one protocol. `cpu` fits a shared 2-core machine; `gpu` is the larger version."""

    device: str = "cpu"
    tasks: tuple[str, ...] = ("play-genre", "fortune-source", "docstring-library", "word-sentiment")
    # PEFT's CorDA cannot read BERT's pooler (methods.py): it does not run on the encoder tasks
    methods: tuple[str, ...] = (
        "lora", "fisher", "fisher-zero", "eva", "lora_ga", "pissa", "olora", "gaussian", "mica",
    )  # fmt: skip
    lr_grid: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3, 2e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 120
    batch_size: int = 16
    max_length: int = 32
    rank: int = 8
    warmup: float = 0.1
    head_warmup: int = 10
    calibration: int = 16
    sizes: tuple[int, int, int] = (200, 40, 64)  # rows per label: train, validation, test
    # seeded at 0.5×/1×/2× LoRA's best lr (the own-lr seeds of every method run first)
    robust: tuple[str, ...] = ("lora", "fisher", "fisher-zero", "eva", "lora_ga", "pissa", "olora", "gaussian", "mica")
    extend: int = 3  # how many halvings/doublings beyond the grid's edges a best lr at an edge may add
    eval_at: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
    pretrain_steps: int = 1500  # the causal-LM tasks' pre-trained Llama (causal.py)
    # most telling first (a protocol cut short has whole rows); `true` Fisher (no better, twice the init time),
    # `subspace` and `fwsvd` (lost everywhere) were settled on the older suite (BENCHMARKS): the GPU preset
    # repeats them
    ablations: tuple[str, ...] = (
        "fisher-random", "fisher-nowhiten", "fisher-c4", "fisher-all16", "fisher-select", "fisher-lowrank",
    )  # fmt: skip
    # True: every seed runs at every lr of the grid and the lr is chosen on the mean over seeds (a seed-0 choice
    # moved a result by 0.06 once); False: seed 0 chooses, the other seeds run at its choice
    lr_on_mean: bool = False
    # tiers of methods whose grid runs come before every other method's, tier by tier (within a tier task by task,
    # seed by seed): a protocol cut short has their whole comparison
    first: tuple[tuple[str, ...], ...] = ()
    # another preset whose records choose each method's lr: this one only runs every seed at those lrs (a longer
    # run of a short protocol's choices: does its verdict hold once validation loss stops improving?)
    lr_from: str | None = None


# causal-LM SFT and DPO (causal.py) on a small Llama pre-trained on other real text; DPO refuses the inits that
# write the base (its reference is the adapter-disabled model), recorded as failed runs. `lm-long`: SFT three
# times as long (4.5 passes over the training rows), where validation-based stopping has something to stop.
LM = Preset(
    tasks=("sft-tragedy", "dpo-tragedy"),
    methods=("lora", "fisher-zero", "fisher", "lora_ga", "eva"),
    lr_grid=(5e-4, 1e-3, 2e-3, 4e-3),
    steps=150,
    batch_size=8,
    calibration=8,
    head_warmup=0,
    sizes=(800, 96, 128),
    robust=("lora", "fisher-zero"),
    extend=2,
    ablations=(),
)

# SmolLM2-135M-Instruct through TRL on real chat tasks held out by source, with forgetting probes (smol.py).
# Sized to a 2-core CPU: a step of 4 rows is ≈ 3 s; the grid brackets LoRA's best lr of a 40-step run.
SMOL = Preset(
    tasks=("smol-dialogue", "smol-docstring", "smol-docstring-dpo"),
    methods=(
        "lora",
        "fisher-zero",
        "fisher-zero-act",
        "fisher",
        "fisher-keep",
        "corda-kpm",
        "lora-null",
        "eva",
        "lora_ga",
        "pissa",
        "corda",
        "olora",
    ),
    lr_grid=(5e-4, 1e-3, 2e-3),
    steps=40,
    batch_size=4,
    calibration=8,
    head_warmup=0,
    sizes=(400, 24, 32),
    eval_at=(0.1, 0.25, 0.5, 1.0),
    robust=("lora", "fisher-zero", "fisher-zero-act", "fisher"),
    extend=3,
    ablations=(),
    lr_on_mean=True,
    # the copied-lr question (LoRA, the default) and the forgetting question (issue 27: the knowledge-keeping mode
    # against CorDA's knowledge-preserved mode), task by task; then LoRA-Null's rule (issue 27); then the default's
    # scale ablation (`fisher-zero-act`: does matching A's output scale hold the copied-lr cells the default
    # misses? Not on either SFT task: it is behind LoRA at 1×)
    first=(("lora", "fisher-zero", "fisher-keep", "corda-kpm"), ("lora-null",), ("fisher-zero-act",)),
)

SMOKE = dict(lr_grid=(1e-3,), steps=2, calibration=1, sizes=(8, 4, 4), eval_at=(0.5, 1.0), extend=0)

PRESETS = {
    "cpu": Preset(),
    "gpu": Preset(
        device="cuda",
        methods=("lora", "fisher", "fisher-zero", "eva", "lora_ga", "pissa", "olora", "gaussian", "mica"),
        lr_grid=(1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
        seeds=(0, 1, 2, 3, 4),
        robust=("lora", "fisher", "fisher-zero", "eva", "lora_ga", "pissa"),
        ablations=tuple(v for v in VARIANTS if v not in ("fisher", "fisher-zero")),
        steps=400,
        max_length=64,
        sizes=(400, 96, 192),
    ),
    "lm": LM,
    "lm-long": replace(LM, tasks=("sft-tragedy",), lr_grid=(1e-3, 2e-3, 4e-3, 8e-3), steps=450),
    "smol": SMOL,
    # the first tier of `smol` on the dialogue task at 5× the steps (2 passes over the training rows), each method
    # at the lr `smol` chose for it: where validation-based stopping has something to stop
    "smol-long": replace(
        SMOL,
        tasks=("smol-dialogue",),
        methods=("lora", "fisher-keep", "fisher-zero", "corda-kpm"),  # two workers take the first two together
        steps=200,
        eval_at=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
        robust=(),
        first=(),
        lr_from="smol",
    ),
    # the smoke tests' size (tests/test_quality_protocol.py): seconds a run, not evidence
    "smol-tiny": replace(
        SMOL,
        **SMOKE,
        tasks=("smol-dialogue",),
        methods=("lora", "fisher-zero"),
        seeds=(0,),
        batch_size=2,
        first=(),
        robust=(),  # two runs, not six: the robustness stage has its smoke test at the `tiny` preset
    ),
    "tiny": Preset(
        **SMOKE,
        tasks=("word-sentiment",),
        methods=("lora", "fisher"),
        seeds=(0, 1),
        batch_size=4,
        head_warmup=1,
        ablations=("fisher-nowhiten",),
    ),
    "lm-tiny": replace(
        LM, **SMOKE, methods=("lora", "fisher-zero", "fisher"), seeds=(0,), batch_size=2, pretrain_steps=2
    ),
}


@dataclass(frozen=True, order=True)
class RunKey:
    """One run of the protocol."""

    task: str
    method: str
    lr: float
    seed: int

    def name(self) -> str:
        return f"{self.task}/{self.method}/lr{self.lr:g}/s{self.seed}"


# ---------------------------------------------------------------- what to run (pure functions of the records)


def stopped(record: dict) -> dict:
    """The curve point with the lowest validation loss: where validation-based stopping would stop."""
    return min(record["curve"], key=lambda p: p["val_loss"])


def best_lr(records: list[dict], task: str, method: str) -> float | None:
    """The lr of `method` on `task` with the lowest mean validation loss at the stopping point (seed-0 grid
    and whatever other seeds ran at that lr)."""
    by_lr: dict[float, list[float]] = {}
    for r in records:
        if r["task"] == task and r["method"] == method and "curve" in r:
            by_lr.setdefault(r["lr"], []).append(stopped(r)["val_loss"])
    return min(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr])) if by_lr else None


def reach(preset: Preset) -> tuple[float, float]:
    """The lowest and highest lr the grid may run: `extend` halvings/doublings beyond its edges (exact in floats)."""
    return preset.lr_grid[0] / 2**preset.extend, preset.lr_grid[-1] * 2**preset.extend


def competing(preset: Preset, records: list[dict], task: str, method: str) -> list[dict]:
    """The runs whose lrs compete for `method`'s lr on `task`: seed 0's, or with `lr_on_mean` those at the lrs
    that ran every seed of the preset (none yet: the lrs with the most seeds), so a one-seed mean never beats a
    three-seed one. Only lrs the grid can reach compete (`extend` halvings/doublings beyond its edges): a
    robustness run at ½× or 2× default LoRA's lr beyond that reach never moves LoRA's lr, so those cells are run once.
    """
    low, high = reach(preset)
    mine = [
        r for r in records if (r["task"], r["method"]) == (task, method) and "curve" in r and low <= r["lr"] <= high
    ]
    if not preset.lr_on_mean:
        return [r for r in mine if r["seed"] == preset.seeds[0]]
    seeds: dict[float, set[int]] = {}
    for r in mine:
        seeds.setdefault(r["lr"], set()).add(r["seed"])
    full = {lr for lr, ran in seeds.items() if ran >= set(preset.seeds)}
    most = max(map(len, seeds.values()), default=0)
    lrs = full or {lr for lr, ran in seeds.items() if len(ran) == most}
    return [r for r in mine if r["lr"] in lrs]


def chosen_lr(preset: Preset, records: list[dict], task: str, method: str) -> float | None:
    """The lr a method is read at on `task`: the lowest validation loss at the stopping point, averaged over the
    seeds of each competing lr (`competing`)."""
    return best_lr(competing(preset, records, task, method), task, method)


def grid_runs(preset: Preset, records: list[dict]) -> list[RunKey]:
    """Grid runs still missing (seed 0's, or every seed's with `lr_on_mean`), plus one lr beyond an edge where the
    chosen lr sits there; the `first` tiers first, then task by task, seed by seed."""
    seeds = preset.seeds if preset.lr_on_mean else preset.seeds[:1]
    done = {RunKey(r["task"], r["method"], r["lr"], r["seed"]) for r in records}
    low, high = reach(preset)
    todo = []
    for method in preset.methods:
        for task in preset.tasks:
            mine = [r for r in records if (r["task"], r["method"], r["seed"]) == (task, method, seeds[0])]
            ran = sorted({r["lr"] for r in mine} | set(preset.lr_grid))
            missing = [RunKey(task, method, lr, s) for lr in ran for s in seeds]
            if missing := [key for key in missing if key not in done]:
                todo += missing
                continue
            best = chosen_lr(preset, [r for r in records if r["seed"] in seeds and r["lr"] in ran], task, method)
            if best == ran[0] and best / 2 >= low:
                todo += [RunKey(task, method, best / 2, s) for s in seeds]
            elif best == ran[-1] and best * 2 <= high:
                todo += [RunKey(task, method, best * 2, s) for s in seeds]
    order = {name: i for i, name in enumerate(preset.methods)}
    tasks = {name: i for i, name in enumerate(preset.tasks)}
    tier = {method: i for i, methods in enumerate(preset.first) for method in methods}
    return sorted(todo, key=lambda k: (tier.get(k.method, len(preset.first)), tasks[k.task], k.seed, k.lr,
                                       order[k.method]))  # fmt: skip


def seed_runs(preset: Preset, records: list[dict]) -> list[RunKey]:
    """The other seeds at each method's own best lr (only seed 0's runs choose an lr)."""
    done = {RunKey(r["task"], r["method"], r["lr"], r["seed"]) for r in records}
    own = [
        RunKey(task, method, best, s)
        for task in preset.tasks
        for method in preset.methods
        if (best := chosen_lr(preset, records, task, method))
        for s in preset.seeds[1:]
    ]
    return [key for key in own if key not in done]


def robust_runs(preset: Preset, records: list[dict]) -> list[RunKey]:
    """The lr-robustness table: every seed at 0.5×/1×/2× default LoRA's best lr for the `robust` methods (seed 0
    usually ran them in the grid, but not an lr the grid added beyond its edge for LoRA alone). A `robust` method
    the preset does not run is skipped."""
    done = {RunKey(r["task"], r["method"], r["lr"], r["seed"]) for r in records}
    todo = []
    for task in preset.tasks:
        if lora := chosen_lr(preset, records, task, "lora"):
            lrs = (lora / 2, lora, lora * 2)
            methods = [m for m in preset.robust if m in preset.methods]
            todo += [RunKey(task, m, lr, s) for m in methods for lr in lrs for s in preset.seeds]
    return [key for key in dict.fromkeys(todo) if key not in done]


def ablation_runs(preset: Preset, records: list[dict]) -> list[RunKey]:
    """Every ablation variant on every seed at `fisher`'s (policy preserve) own best lr on each task."""
    done = {RunKey(r["task"], r["method"], r["lr"], r["seed"]) for r in records}
    lrs = {task: chosen_lr(preset, records, task, "fisher") for task in preset.tasks}
    todo = [RunKey(task, v, lr, s) for v in preset.ablations for s in preset.seeds for task, lr in lrs.items() if lr]
    return [key for key in todo if key not in done]


def follow_runs(preset: Preset, records: list[dict]) -> list[RunKey]:
    """Every seed (seed by seed) at the lr that the `lr_from` preset's records chose for each method and task; the
    methods already begun first (a run cut short then has their seeds complete, not more methods at one seed)."""
    source = PRESETS[preset.lr_from]
    theirs = load(results_path(preset.lr_from))
    done = {RunKey(r["task"], r["method"], r["lr"], r["seed"]) for r in records}
    begun = {(r["task"], r["method"]) for r in records}
    todo = [RunKey(task, method, lr, s) for s in preset.seeds for task in preset.tasks for method in preset.methods
            if (lr := chosen_lr(source, theirs, task, method))]  # fmt: skip
    return sorted((key for key in todo if key not in done), key=lambda k: (k.task, k.method) not in begun)


def plan(preset: Preset, records: list[dict]) -> list[RunKey]:
    """What to run next: the grid until it is bracketed everywhere, then the seeds at each method's own lr, the
    ablation, and the lr-robustness seeds (most telling first: a protocol cut short has whole tables); with
    `lr_from`, only every seed at the lrs another preset chose."""
    for stage in (follow_runs,) if preset.lr_from else (grid_runs, seed_runs, ablation_runs, robust_runs):
        if todo := stage(preset, records):
            return todo
    return []


# ---------------------------------------------------------------- running


def results_path(preset_name: str, out: Path | None = None) -> Path:
    """`out/protocol.jsonl`; by default `results/<preset>/protocol.jsonl` beside this module."""
    return (out or RESULTS / preset_name) / "protocol.jsonl"


def load(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock (workers share one results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def claim(path: Path, preset: Preset) -> RunKey | None:
    """The next planned run that neither is recorded nor claimed by another live worker; waits while every
    planned run is claimed (their results decide what comes next). None: nothing left to run."""
    claims = path.with_suffix(".claims")
    while True:
        with locked(path):
            taken = json.loads(claims.read_text()) if claims.is_file() else {}
            taken = {k: pid for k, pid in taken.items() if _alive(pid)}
            todo = plan(preset, load(path))
            for key in todo:
                if key.name() not in taken:
                    taken[key.name()] = os.getpid()
                    claims.write_text(json.dumps(taken))
                    return key
        if not todo:
            return None
        time.sleep(5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@dataclass
class Data:
    """Tokenized splits of one task, built once per worker."""

    splits: dict[str, tuple] = field(default_factory=dict)

    def get(self, task: str, preset: Preset) -> tuple:
        if task not in self.splits and task in CAUSAL_TASKS:
            from benchmarks.quality.causal import tragedy_data
            from benchmarks.quality.smol import smol_data

            lm = smol_data(task, preset) if task.startswith("smol-") else tragedy_data(task, preset)
            rows = {"train": lm.train, "val": lm.val, "test": lm.test}
            digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
            self.splits[task] = (lm, digest)
        if task not in self.splits:
            from benchmarks.quality.encoder import tokenize
            from benchmarks.quality.tasks import TASKS, fingerprint

            t = TASKS[task](sizes=preset.sizes)
            splits = tokenize([t.train, t.val, t.test], max_length=preset.max_length)
            self.splits[task] = (*splits, t.num_labels, fingerprint(t))
        return self.splits[task]


def run_one(key: RunKey, preset: Preset, data: Data) -> dict:
    """Run `key` and return its record."""
    from benchmarks.quality.methods import METHODS
    from benchmarks.quality.runner import RunSpec, run
    from fisher_core import FisherConfig

    method, fields, fisher, calibration = key.method, None, None, preset.calibration
    if key.method in VARIANTS:
        fields = dict(VARIANTS[key.method])
        calibration = min(calibration, fields.get("num_batches", calibration))
        method = key.method if key.method in METHODS else "fisher"
        # keep mode only where a variant asks for it (`keep_knowledge="auto"` would turn it on for SmolLM2)
        fisher = FisherConfig(progress=False, **{"keep_knowledge": False, **fields})
    if key.task in CAUSAL_TASKS:
        return _causal_record(key, preset, data, method, fisher, fields)
    train, val, test, num_labels, data_hash = data.get(key.task, preset)
    spec = RunSpec(
        method=method,
        seed=key.seed,
        lr=key.lr,
        steps=preset.steps,
        batch_size=preset.batch_size,
        rank=preset.rank,
        calibration_batches=calibration,
        head_warmup=preset.head_warmup,
        eval_at=preset.eval_at,
        warmup=preset.warmup,
        fisher=fisher,
        device=preset.device,
    )
    started = time.perf_counter()
    result = run(spec, train, test, num_labels, val=val)
    return {
        **asdict(key),
        "data": data_hash,
        "steps": preset.steps,
        "fisher": fisher.model_dump(mode="json", exclude={"cache_path", "progress", "force"}) if fisher else None,
        "init_batches": result.init_batches,
        "curve": [
            {
                "step": c.step,
                "test_loss": c.test_loss,
                "accuracy": c.test_accuracy,
                "val_loss": c.val_loss,
                "val_accuracy": c.val_accuracy,
                "train_loss": c.train_loss,
            }
            for c in result.curve
        ],
        "init_seconds": result.init_seconds,
        "init_peak_mib": result.init_peak_mib,
        "wall_seconds": time.perf_counter() - started,
    }


def _causal_record(key: RunKey, preset: Preset, data: Data, method: str, fisher, fields: dict | None) -> dict:
    """Run a causal-LM key (`causal.run_causal`; `fields`: the Fisher variant's, None for a PEFT init) and
    return its record."""
    from benchmarks.quality.causal import run_causal

    lm, data_hash = data.get(key.task, preset)
    started = time.perf_counter()
    result = run_causal(method, fields, key.lr, key.seed, preset, lm)
    return {
        **asdict(key),
        "data": data_hash,
        "steps": preset.steps,
        "fisher": fisher.model_dump(mode="json", exclude={"cache_path", "progress", "force"}) if fisher else None,
        **result,
        "wall_seconds": time.perf_counter() - started,
    }


def worker(preset_name: str, out: Path | None = None) -> None:
    """Claim, run and record runs until the plan is empty."""
    import torch

    torch.set_num_threads(1)
    import datasets

    datasets.disable_progress_bars()  # TRL's dataset preparation (causal-LM tasks), once per run
    preset, path, data = PRESETS[preset_name], results_path(preset_name, out), Data()
    while (key := claim(path, preset)) is not None:
        try:
            record = run_one(key, preset, data)
        except Exception as e:  # a PEFT init that does not run on a task is recorded as failed, not retried
            traceback.print_exc()  # the record keeps the message; the log keeps where it came from
            record = {**asdict(key), "failed": f"{type(e).__name__}: {str(e)[:300]}"}
        with locked(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if "failed" in record:
            print(f"{key.name()} failed: {record['failed']}", flush=True)
        else:
            point = stopped(record)
            print(
                f"{key.name():>44}  stopped@{point['step']} test loss {point['test_loss']:.4f} "
                f"acc {point['accuracy']:.3f}  final {record['curve'][-1]['test_loss']:.4f}  "
                f"{record['wall_seconds']:.0f}s",
                flush=True,
            )


def prepare(preset: Preset, path: Path) -> None:
    """Build what the workers share once, before they start: the pre-trained tiny Llama; SmolLM2's converted
    directory, its own answers to the generic instructions and the untuned model's forgetting probes
    (`untuned.json` beside the records `path`)."""
    if {"sft-tragedy", "dpo-tragedy"} & set(preset.tasks):
        from benchmarks.quality.causal import pretrained_lm

        pretrained_lm(preset.pretrain_steps)
    if any(t.startswith("smol-") for t in preset.tasks):
        from benchmarks.quality.smol import own_answers, untuned_probes
        from benchmarks.smollm2 import smollm2_dir

        smollm2_dir(), own_answers()  # converted and answered once here, not by every worker at once
        untuned = path.parent / "untuned.json"
        if not untuned.is_file() or "tasks" not in json.loads(untuned.read_text()):
            path.parent.mkdir(parents=True, exist_ok=True)
            untuned.write_text(json.dumps(untuned_probes(preset), indent=1))


def run_workers(cmd: list[str], count: int) -> None:
    """`count` worker processes until each is done; stopped (SIGTERM) if this process is interrupted, so a stop
    (Ctrl-C, `timeout --signal=INT`) ends this run's workers and no other's. A run a worker was in is not
    recorded and runs again on resume."""
    procs = [subprocess.Popen(cmd) for _ in range(count)]
    try:
        codes = [code for p in procs if (code := p.wait())]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    if codes:
        raise SystemExit(f"a worker failed (exit status {', '.join(map(str, codes))}); rerun to resume")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--tables-only", action="store_true", help="only rewrite tables.md from the records")
    parser.add_argument("--out", type=Path, help="results folder (default: results/<preset>/ beside this module)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.worker:
        worker(args.preset, args.out)
        return
    if not args.tables_only:
        prepare(PRESETS[args.preset], results_path(args.preset, args.out))
        cmd = [sys.executable, "-m", "benchmarks.quality.protocol", "--preset", args.preset, "--worker"]
        cmd += ["--out", str(args.out)] if args.out else []
        run_workers(cmd, args.workers)
    from benchmarks.quality.report import write

    write(results_path(args.preset, args.out), PRESETS[args.preset])


if __name__ == "__main__":
    main()
