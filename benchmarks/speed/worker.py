"""Measure ONE method in this (fresh) process and print one line `RESULT <json>`.

    python -m benchmarks.speed.worker --method fisher --preset small --batches 4 --batch-size 2 --seq-len 128

Set-up (model, batches, the method's own preparation and one no-grad warm-up forward) is not timed.
`--profile` also times where fisher_core spends its time: the statistics' outer-product updates
(`add_outer`) and every `torch.linalg.eigh` / `svd` / `qr` and `torch.svd_lowrank` call
(synchronized on CUDA, so it slows the run slightly; use it for the breakdown, not the headline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from benchmarks.speed.measure import measure, unmap_freed_blocks
from benchmarks.speed.methods import METHODS
from benchmarks.speed.workload import PRESETS, build_model, make_batches

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of blocks")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also time fisher_core's phases and linear algebra")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="enable transformers' gradient checkpointing (non-reentrant) on the model, as a memory-bound run would",
    )
    p.add_argument(
        "--exact-rss",
        action="store_true",
        help="CPU: unmap freed blocks of >= 64 KiB so the RSS peak follows the live tensors (slows every "
        "method by page faults: use for memory figures, not times)",
    )
    p.add_argument(
        "--fisher-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="FisherConfig overrides for the fisher methods, e.g. solver=lowrank memory_budget=100000000 "
        "(values parsed as JSON when they can be)",
    )
    return p.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    """`["solver=lowrank", "sketch_rank=64"]` → `{"solver": "lowrank", "sketch_rank": 64}`."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--fisher-set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> dict:
    """Build the workload, time the method once, return the result record."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available here; pass --device cpu")
    unmapped = args.exact_rss and not args.device.startswith("cuda") and unmap_freed_blocks()
    shape = PRESETS[args.preset]
    if args.layers is not None:
        from dataclasses import replace

        shape = replace(shape, layers=args.layers)
    model = build_model(shape, seed=args.seed, dtype=DTYPES[args.dtype], device=args.device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = make_batches(
        shape.vocab,
        num_batches=args.batches,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        device=args.device,
    )
    settings = {
        "rank": args.rank,
        "targets": list(shape.linears()),
        "fisher": overrides(args.fisher_set),
        "device": args.device,
    }
    timed = METHODS[args.method](model, batches, settings)
    with torch.no_grad():  # warm-up: first-call allocations and kernel selection, same for every method
        model(**{k: v for k, v in batches[0].items() if k != "labels"})
    timers: dict[str, float] = defaultdict(float)
    with profiled(timers, args.device) if args.profile else contextlib.nullcontext():
        m, extra = measure(timed, args.device)
    return {
        "method": args.method,
        "preset": args.preset,
        "params": shape.num_params(),
        "layers": shape.layers,
        "tokens": args.batches * args.batch_size * args.seq_len,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": torch.get_num_threads(),
        "seconds": m.seconds,
        "peak_bytes": m.peak_bytes,
        "peak_exact": m.exact,
        "freed_blocks_unmapped": unmapped,
        **({"fisher_set": settings["fisher"]} if settings["fisher"] and args.method.startswith("fisher") else {}),
        **extra,
        **({"profile": dict(timers)} if args.profile else {}),
    }


@contextlib.contextmanager
def profiled(timers: dict[str, float], device: str) -> Iterator[None]:
    """Accumulate the wall time of fisher_core's outer-product updates (every class of its estimate
    package that defines `add_outer`) and of the dense linear algebra (eigh, svd, qr, svd_lowrank)."""
    import importlib
    import pkgutil

    estimate_pkg = importlib.import_module("fisher_core.estimate")  # the package, not the function it exports
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    patched = [(torch.linalg, n, n) for n in ("eigh", "svd", "qr")] + [(torch, "svd_lowrank", "svd_lowrank")]
    for info in pkgutil.iter_modules(estimate_pkg.__path__):
        module = importlib.import_module(f"{estimate_pkg.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and obj.__module__ == module.__name__ and "add_outer" in vars(obj):
                patched.append((obj, "add_outer", "accumulate"))
    originals = [getattr(owner, attr) for owner, attr, _ in patched]

    def timed(fn, key):
        def wrapper(*a, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            timers[key] += time.perf_counter() - t
            return out

        return wrapper

    for (owner, attr, key), fn in zip(patched, originals, strict=True):
        setattr(owner, attr, timed(fn, key))
    try:
        yield
    finally:
        for (owner, attr, _), fn in zip(patched, originals, strict=True):
            setattr(owner, attr, fn)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("fisher_core").setLevel(logging.INFO)  # phase lines, also when a run is cut short
    print("RESULT " + json.dumps(run(parse(argv))), flush=True)


if __name__ == "__main__":
    main()
