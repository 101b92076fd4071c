"""Init cost against the floor, in one run: every method on the same model and batches.

    python -m benchmarks.speed.compare --presets small --tokens 1 4 16 --repeats 3 --out speed.json

For each (preset, token multiple) and each repeat, every method runs in its own fresh process (so
peak memory is that method's alone; on CPU a fork of this process, which has already imported
torch, transformers, peft and fisher_core; on CUDA a new interpreter), in an order rotated per
repeat (so slow drift of a shared machine does not favour one method). Token multiple k means
k × `--batches` batches of the same shape. Reported per method: the median seconds and peak memory
above the model and batches, and the median over repeats of the ratio to the floor measured in the
same repeat.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import peft  # noqa: F401  (imported once here, inherited by every forked worker)

import fisher_core  # noqa: F401
from benchmarks.speed import worker
from benchmarks.speed.methods import METHODS
from benchmarks.speed.workload import PRESETS

DEFAULT_METHODS = (
    "floor",
    "train_step",
    "lora",
    "fisher",
    "fisher-subspace",
    "fisher-fwsvd",
    "fisher-select",
    "lora_ga",
    "eva",
    "corda",
)
ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["small"], choices=sorted(PRESETS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1], help="token multiples (× --batches)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu or cuda (default: the worker's default)")
    p.add_argument("--profile", action="store_true", help="add fisher_core's time breakdown (slightly slower)")
    p.add_argument("--fisher-set", nargs="*", default=[], metavar="KEY=VALUE", help="FisherConfig overrides")
    p.add_argument("--gradient-checkpointing", action="store_true", help="every method's model checkpoints its blocks")
    p.add_argument(
        "--exact-rss", action="store_true", help="CPU peaks that follow live tensors (slower: not for times)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per method run")
    p.add_argument("--out", type=Path, default=None, help="write every raw result and the summary as JSON")
    return p.parse_args(argv)


def run_one(args: argparse.Namespace, method: str, preset: str, multiple: int) -> dict:
    """One method in a fresh worker process; returns its result record (or the error)."""
    argv = [
        "--method",
        method,
        "--preset",
        preset,
        "--batches",
        str(args.batches * multiple),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--rank",
        str(args.rank),
    ]
    if args.device:
        argv += ["--device", args.device]
    if args.profile and method.startswith("fisher"):
        argv.append("--profile")
    if args.fisher_set:
        argv += ["--fisher-set", *args.fisher_set]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    if args.exact_rss:
        argv.append("--exact-rss")
    if args.device and args.device.startswith("cuda"):  # CUDA cannot be forked: a new interpreter
        return _run_subprocess(argv, method, args.timeout)
    return _run_forked(argv, method, args.timeout)


def _run_forked(argv: list[str], method: str, timeout: float) -> dict:
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(argv, send), daemon=True)
    child.start()
    send.close()
    if not receive.poll(timeout):
        child.kill()
        child.join()
        return {"method": method, "error": f"timed out after {timeout:.0f}s"}
    try:
        result = receive.recv()
    except EOFError:
        result = {"method": method, "error": "the worker died without a result (out of memory?)"}
    child.join()
    return result


def _child(argv: list[str], send) -> None:
    try:
        send.send(worker.run(worker.parse(argv)))
    except Exception as e:  # reported as this method's result; the other methods still run
        traceback.print_exc()
        send.send({"method": argv[1], "error": f"{type(e).__name__}: {e}"})


def _run_subprocess(argv: list[str], method: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speed.worker", *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f}s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"method": method, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}


def summarize(records: list[dict], methods: list[str]) -> list[dict]:
    """Per method: median seconds/peak and median same-repeat ratios to the floor."""
    rows = []
    for method in methods:
        mine = [r for r in records if r["method"] == method and "error" not in r]
        if not mine:
            errors = [r["error"] for r in records if r["method"] == method]
            rows.append({"method": method, "error": errors[0] if errors else "not run"})
            continue
        time_ratios, peak_ratios = [], []
        for r in mine:
            floor = next((f for f in records if f["method"] == "floor" and f.get("repeat") == r["repeat"]), None)
            if floor and "error" not in floor:
                time_ratios.append(r["seconds"] / floor["seconds"])
                peak_ratios.append(r["peak_bytes"] / max(1, floor["peak_bytes"]))
        row = {
            "method": method,
            "seconds": statistics.median(r["seconds"] for r in mine),
            "peak_mib": statistics.median(r["peak_bytes"] for r in mine) / 2**20,
            "x_floor": statistics.median(time_ratios) if time_ratios else None,
            "peak_x_floor": statistics.median(peak_ratios) if peak_ratios else None,
            "repeats": len(mine),
        }
        if "phases" in mine[0]:
            row["phases"] = {k: statistics.median(r["phases"][k] for r in mine) for k in mine[0]["phases"]}
        if "profile" in mine[0]:
            keys = {k for r in mine for k in r["profile"]}
            row["profile"] = {k: statistics.median(r["profile"].get(k, 0.0) for r in mine) for k in sorted(keys)}
        rows.append(row)
    lora_ga = next((r for r in rows if r["method"] == "lora_ga" and "error" not in r), None)
    for row in rows:
        if lora_ga and "error" not in row:
            row["x_lora_ga"] = row["seconds"] / lora_ga["seconds"]
    return rows


def markdown(rows: list[dict]) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| method | seconds | × floor | × LoRA-GA | peak above start (MiB) | peak × floor's |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['seconds']:.2f} | {_fmt(r['x_floor'])} | {_fmt(r.get('x_lora_ga'))} | "
            f"{r['peak_mib']:.0f} | {_fmt(r['peak_x_floor'])} |"
        )
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for preset in args.presets:
        for multiple in args.tokens:
            records = []
            for repeat in range(args.repeats):
                shift = repeat % len(args.methods)
                for method in args.methods[shift:] + args.methods[:shift]:
                    record = {**run_one(args, method, preset, multiple), "repeat": repeat}
                    records.append(record)
                    status = record.get("error") or f"{record['seconds']:.2f}s"
                    print(f"[{preset} ×{multiple} rep {repeat}] {method}: {status}", file=sys.stderr, flush=True)
            rows = summarize(records, args.methods)
            tokens = args.batches * multiple * args.batch_size * args.seq_len
            print(f"\n### {preset} ({PRESETS[preset].num_params() / 1e6:.1f}M params), {tokens} tokens\n")
            print(markdown(rows), flush=True)
            for row in rows:
                if "phases" in row or "profile" in row:
                    print(
                        f"\n{row['method']}: phases {_seconds(row.get('phases'))}; "
                        f"linear algebra {_seconds(row.get('profile'))}"
                    )
            out["runs"].append(
                {"preset": preset, "multiple": multiple, "tokens": tokens, "records": records, "summary": rows}
            )
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


def _seconds(d: dict | None) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in (d or {}).items()) or "–"


if __name__ == "__main__":
    main()
