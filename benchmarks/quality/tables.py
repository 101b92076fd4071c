"""Result records and the tables made from them.

A record is one run as a plain dict (JSON-ready): `task`, `label`, `method`, `seed`, `lr`, `steps`,
`curve` (list of `{step, test_loss, metric}`), `init_seconds`, `init_peak_mib`. Results files are
JSON lists of records, appended run by run so an interrupted suite keeps what it measured.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def append(path: Path, record: dict) -> None:
    """Add `record` to the JSON list in `path` (created if missing)."""
    records = load(path)
    records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def at_fraction(record: dict, fraction: float, key: str) -> float:
    """`key` of the curve point nearest to `fraction` of the run's steps."""
    target = fraction * record["steps"]
    return min(record["curve"], key=lambda p: abs(p["step"] - target))[key]


def by_label(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["label"]].append(r)
    return dict(groups)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def steps_to_reach(record: dict, target: float, key: str, higher_is_better: bool) -> int | None:
    """First evaluated step at which `key` is at least as good as `target` (None: never)."""
    for p in record["curve"]:
        if (p[key] >= target) if higher_is_better else (p[key] <= target):
            return p["step"]
    return None


def table(records: list[dict], metric: str, higher_is_better: bool, baseline: str = "lora") -> str:
    """Markdown: per label, test loss and `metric` at 10/25/50/100 % (mean ± std over seeds), the first
    evaluated step at which each seed reaches the baseline's mean final test loss and `metric`, init
    seconds and peak MiB (mean over seeds). Rows sorted by mean final test loss."""
    groups = by_label(records)
    targets = {}
    if baseline in groups:
        targets = {k: statistics.mean(r["curve"][-1][k] for r in groups[baseline]) for k in ("test_loss", metric)}
    head = ["method", "seeds"]
    head += [f"loss@{int(f * 100)}%" for f in FRACTIONS] + [f"{metric}@{int(f * 100)}%" for f in FRACTIONS]
    head += [f"steps to {baseline}'s final loss", f"… {metric}", "init s", "init MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(groups, key=lambda k: statistics.mean(r["curve"][-1]["test_loss"] for r in groups[k]))
    for label in order:
        runs = groups[label]
        row = [label, str(len(runs))]
        row += [mean_std([at_fraction(r, f, "test_loss") for r in runs]) for f in FRACTIONS]
        row += [mean_std([at_fraction(r, f, metric) for r in runs]) for f in FRACTIONS]
        for key, higher in (("test_loss", False), (metric, higher_is_better)):
            if key not in targets:
                row.append("–")
                continue
            reached = [steps_to_reach(r, targets[key], key, higher) for r in runs]
            row.append("/".join("never" if s is None else str(s) for s in reached))
        row.append(f"{statistics.mean(r['init_seconds'] for r in runs):.1f}")
        row.append(f"{statistics.mean(r['init_peak_mib'] for r in runs):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
