"""Run one (method, seed, lr, steps) configuration of an encoder classification task end to end.

The protocol every method shares (so the init is the only difference):
1. load MiniLM with a head seeded by `seed`; optionally train the head alone for `head_warmup` steps
   (its own batch stream), so gradient-based inits do not read a random head's noise;
2. build the adapter with `methods.build_adapter` from `calibration_batches` batches of the training
   stream; time it (wall seconds) and sample its peak memory;
3. train LoRA + head with AdamW, linear decay to 0, on the same seeded batch stream for `steps` steps,
   evaluating test loss and accuracy at the `eval_at` fractions of training.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch import nn

from benchmarks.quality.encoder import Split, batch_stream, evaluate, load_classifier
from benchmarks.quality.methods import Adapter, build_adapter, lora_kwargs
from fisher_core import FisherConfig

EVAL_AT = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class RunSpec:
    """One configuration. `fisher` configures method `fisher` only."""

    method: str = "lora"
    seed: int = 0
    lr: float = 2e-3
    steps: int = 100
    batch_size: int = 16
    rank: int = 8
    alpha: float = 16.0
    calibration_batches: int = 8
    head_warmup: int = 0
    head_lr: float = 2e-3
    eval_at: tuple[float, ...] = EVAL_AT
    warmup: float = 0.0  # fraction of `steps` with a linear warm-up before the linear decay
    fisher: FisherConfig | None = None
    device: str = "cpu"

    @property
    def label(self) -> str:
        return f"fisher-{(self.fisher or FisherConfig()).selector}" if self.method == "fisher" else self.method


@dataclass
class CurvePoint:
    step: int
    test_loss: float
    test_accuracy: float
    train_loss: float | None  # mean training loss since the previous point (None at step 0)
    val_loss: float | None = None  # on the validation split, when the run has one
    val_accuracy: float | None = None


@dataclass
class RunResult:
    """The test curve of one run plus what its init cost."""

    spec: RunSpec
    curve: list[CurvePoint]
    init_seconds: float
    init_peak_mib: float  # peak memory above the level at the start of the init (RSS on CPU)
    train_seconds: float
    eval_seconds: float
    trainable_params: int
    init_phases: dict[str, float] = field(default_factory=dict)  # the init's own split, e.g. estimate/select
    init_batches: int | None = None  # calibration batches the init read (early stopping may read fewer)

    @property
    def final(self) -> CurvePoint:
        return self.curve[-1]


def run(
    spec: RunSpec,
    train: Split,
    test: Split,
    num_labels: int,
    log: Callable[[str], None] | None = None,
    val: Split | None = None,
) -> RunResult:
    """Run `spec` on the tokenized `train`/`test` splits (and `val`, evaluated at the same points, for
    validation-based stopping); `log` receives one line per evaluation."""
    torch.manual_seed(spec.seed)
    device = torch.device(spec.device)
    model = load_classifier(num_labels, spec.seed).to(device)
    if spec.head_warmup:
        _train_head(model, _on(device, batch_stream(train, spec.batch_size, seed=10_000 + spec.seed)), spec)
    stream = _on(device, batch_stream(train, spec.batch_size, seed=spec.seed))
    adapter, init_seconds, init_peak_mib = _init_adapter(spec, model, train, device)
    model = adapter.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec.steps, spec.warmup))
    checkpoints = sorted({round(f * spec.steps) for f in spec.eval_at})
    curve: list[CurvePoint] = []
    train_seconds = eval_seconds = 0.0
    losses: list[float] = []
    model.train()
    for step in range(spec.steps + 1):
        if step in checkpoints:
            t = time.perf_counter()
            loss, acc = evaluate(model, test, device=device)
            val_loss, val_acc = evaluate(model, val, device=device) if val is not None else (None, None)
            eval_seconds += time.perf_counter() - t
            curve.append(CurvePoint(step, loss, acc, sum(losses) / len(losses) if losses else None, val_loss, val_acc))
            losses.clear()
            if log:
                log(f"{spec.label:>16} step {step:4d}  test loss {loss:.4f}  acc {acc:.3f}")
        if step == spec.steps:
            break
        t = time.perf_counter()
        out = model(**next(stream))
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        train_seconds += time.perf_counter() - t
    return RunResult(
        spec=spec,
        curve=curve,
        init_seconds=init_seconds,
        init_peak_mib=init_peak_mib,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        trainable_params=sum(p.numel() for p in params),
        init_phases=adapter.phases,
        init_batches=adapter.batches,
    )


def _init_adapter(spec: RunSpec, model: nn.Module, train: Split, device: torch.device) -> tuple[Adapter, float, float]:
    """(adapter, seconds, peak MiB above the start) of `spec.method`'s init from the first
    `calibration_batches` batches training will see (a fresh stream with the same seed)."""
    calibration = list(islice(_on(device, batch_stream(train, spec.batch_size, spec.seed)), spec.calibration_batches))
    torch.manual_seed(spec.seed)
    with peak_memory() as peak:
        started = time.perf_counter()
        lora = lora_kwargs(spec.rank, spec.alpha)
        adapter = build_adapter(spec.method, model, calibration, lora=lora, fisher=spec.fisher)
        seconds = time.perf_counter() - started
    return adapter, seconds, peak()


def lr_factor(steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear from 0 to 1 over `warmup·steps`, then linear to 0."""
    ramp = max(1, round(warmup * steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return max(0.0, 1.0 - (step - ramp) / max(1, steps - ramp))

    return factor


def _on(device: torch.device, batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


def _train_head(model: nn.Module, stream: Iterator[dict], spec: RunSpec) -> None:
    """`spec.head_warmup` AdamW steps on the classifier head alone (the encoder stays frozen)."""
    head = model.classifier
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=spec.head_lr, weight_decay=0.0)
    model.train()
    for batch in islice(stream, spec.head_warmup):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(frozen[n])


@contextmanager
def peak_memory() -> Iterator[Callable[[], float]]:
    """Yields a getter for the peak memory (MiB) above the level at entry: CUDA allocator stats on a
    GPU, else the process's resident set size sampled every 2 ms."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result: list[float] = []
        yield lambda: result[0]
        torch.cuda.synchronize()
        result.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    top = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            top[0] = max(top[0], proc.memory_info().rss)
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: (top[0] - base) / 2**20
    finally:
        stop.set()
        thread.join()
        top[0] = max(top[0], proc.memory_info().rss)
