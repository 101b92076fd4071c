"""Print the results of `benchmarks/gpu/run.sh` (one JSON record per line, from the speed worker).

python -m benchmarks.gpu.summarize results.jsonl          # summary table with ratios
python -m benchmarks.gpu.summarize --line results.jsonl   # the last record as one line
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 2**30


def line(r: dict) -> str:
    """One method's result as a human line."""
    if "error" in r:
        return f"{r['method']}: FAILED ({r['error']})"
    text = f"{r['method']}: {r['seconds']:.1f} s, peak +{r['peak_bytes'] / GIB:.2f} GiB above model and batches"
    if "phases" in r:
        text += " (" + ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items()) + ")"
    if r.get("profile"):
        text += "; within: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["profile"].items())
    if "held_peak_bytes" in r:
        text += (
            f"; held for Ḡ {r['held_peak_bytes'] / GIB:.2f} GiB, get_peft_model +{r['wrapping_bytes'] / GIB:.2f} GiB"
        )
    return text


def summary(records: list[dict]) -> str:
    """A Markdown table: seconds, peak, and ratios to the floor and to LoRA-GA."""
    ok = {r["method"]: r for r in records if "error" not in r}
    floor, lora_ga = ok.get("floor"), ok.get("lora_ga")
    first = next(iter(ok.values()), None)
    head = ""
    if first:
        head = (
            f"{first['preset']} ({first['params'] / 1e9:.2f}B params, {first['layers']} blocks), {first['tokens']} "
            f"tokens, {first['dtype']} on {first['device_name'] or first['device']}, torch {first['torch']}\n\n"
        )
    rows = [
        "| method | seconds | × floor | × LoRA-GA | peak above start (GiB) | above the floor's peak, less "
        "get_peft_model's own (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['method']} | {r['error']} | | | | |")
            continue
        x_floor = f"{r['seconds'] / floor['seconds']:.2f}" if floor else "–"
        x_ga = f"{r['seconds'] / lora_ga['seconds']:.2f}" if lora_ga else "–"
        # what a memory_budget bounds: the init's own memory, not the LoRA model every method builds
        own = r["peak_bytes"] - floor["peak_bytes"] - r.get("wrapping_bytes", 0) if floor else None
        own_text = f"{own / GIB:.2f}" if own is not None and r["method"] != "floor" else "–"
        rows.append(
            f"| {r['method']} | {r['seconds']:.1f} | {x_floor} | {x_ga} | {r['peak_bytes'] / GIB:.2f} | {own_text} |"
        )
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path)
    p.add_argument("--line", action="store_true", help="print only the last record, as one line")
    args = p.parse_args(argv)
    records = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
    print(line(records[-1]) if args.line else summary(records), flush=True)


if __name__ == "__main__":
    main()
